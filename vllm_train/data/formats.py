"""The record shapes users already have, read into the few that the datasets tokenize.

SFT records become ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` (`sft_record`):
  ShareGPT  ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}`` ->
            messages (human/user -> user; gpt/assistant/chatgpt/bing/bard -> assistant; system -> system)
  Alpaca    ``{"instruction", "input" (optional), "output"}`` -> prompt/completion: instruction and input
            joined by a blank line, as Alpaca does; with a chat template that prompt is one user turn and
            the output one assistant turn, without one they are plain text
Preference records become ``{"prompt", "chosen", "rejected"}`` (`preference_record`):
  conversations  "chosen"/"rejected" whole conversations (Anthropic HH as TRL ships it; UltraFeedback
                 binarized, whose string "prompt" repeats the first user turn and is not read): the prompt is
                 their longest shared message prefix, the completions the assistant turns after it
  texts          "chosen"/"rejected" strings without a "prompt": the prompt is their shared text up to its
                 last whitespace before they differ (TRL cuts at the first differing character, moving one
                 space to the completions; we cut at a word boundary so no word is split between prompt and
                 completion)
A bad record raises `RecordProblem`: one line naming the field (`load_records` adds file and line).
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_train.data.io import RecordProblem, check_messages, check_text_field

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SFT_SHAPES = ("expected a 'text', 'prompt'+'completion', 'messages', ShareGPT 'conversations' or Alpaca "
              "'instruction'+'output' field")


def _raise_if(problem: str | None) -> None:
    if problem:
        raise RecordProblem(problem)


def problem_of(read: Callable[[dict], dict], record: dict) -> str | None:
    """What `read` finds wrong with `record` (None: fine) -- a `load_records` check made of a reader."""
    try:
        read(record)
    except RecordProblem as exc:
        return str(exc)
    return None


# ---- SFT ------------------------------------------------------------------------------------------
def sft_record(record: dict, chat: bool = False) -> dict:
    """`record` as {"messages"} | {"prompt", "completion"} | {"text"} (a record of these shapes is returned as
    it is); `chat`: the tokenizer renders chat messages (an Alpaca prompt then becomes a user turn)."""
    if "messages" in record:
        _raise_if(check_messages(record["messages"], "messages"))
        _with_assistant(record["messages"], "messages")
        return record
    if "conversations" in record:
        return {"messages": _with_assistant(sharegpt_messages(record["conversations"]), "conversations")}
    if "prompt" in record or "completion" in record:
        for name in ("prompt", "completion"):
            _raise_if(check_text_field(record, name, allow_messages=True))
        return record
    if "instruction" in record or "output" in record:
        return alpaca_record(record, chat)
    if "text" in record:
        _raise_if(check_text_field(record, "text"))
        return record
    raise RecordProblem(SFT_SHAPES)


def _with_assistant(messages: list[dict], field_name: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordProblem(f"field '{field_name}' has no assistant message to learn from")
    return messages


def sharegpt_messages(turns) -> list[dict]:
    """ShareGPT turns ``[{"from", "value"}, ...]`` as chat messages ``[{"role", "content"}, ...]``."""
    if not isinstance(turns, list) or not turns:
        raise RecordProblem("field 'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordProblem(f"field 'conversations'[{j}] must be an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise RecordProblem(f"field 'conversations'[{j}].from: {turn['from']!r} is not a ShareGPT role "
                                f"({', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn["value"], str):
            raise RecordProblem(f"field 'conversations'[{j}].value must be a string")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def alpaca_record(record: dict, chat: bool) -> dict:
    """{"instruction", "input"?, "output"} -> {"prompt", "completion"} (one user and one assistant turn if `chat`)."""
    for name in ("instruction", "output"):
        _raise_if(check_text_field(record, name))
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordProblem("field 'input' must be a string")
    prompt = f"{record['instruction']}\n\n{extra}" if extra and extra.strip() else record["instruction"]
    if chat:
        return {"prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": record["output"]}]}
    return {"prompt": prompt, "completion": record["output"]}


# ---- preferences --------------------------------------------------------------------------------------
def preference_record(record: dict) -> dict:
    """`record` as {"prompt", "chosen", "rejected"}, the prompt taken out of the completions when implicit (an
    explicit record is returned as it is)."""
    for name in ("chosen", "rejected"):
        _raise_if(check_text_field(record, name, allow_messages=True))
        if isinstance(record[name], list) and not all(m["content"].strip() for m in record[name]):
            raise RecordProblem(f"field '{name}' has an empty message")
    chosen, rejected = record["chosen"], record["rejected"]
    if chosen == rejected:
        raise RecordProblem("fields 'chosen' and 'rejected' are identical (no preference to learn)")
    if any(_is_conversation(v) for v in (chosen, rejected)):
        prompt, chosen, rejected = implicit_chat_prompt(chosen, rejected)
    elif "prompt" not in record and isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = implicit_text_prompt(chosen, rejected)
    else:
        _raise_if(check_text_field(record, "prompt", allow_messages=True))
        if isinstance(record["prompt"], str) and any(isinstance(v, list) for v in (chosen, rejected)):
            raise RecordProblem("chat-message 'chosen'/'rejected' need a chat-message 'prompt'")
        return record
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _is_conversation(value) -> bool:
    """Chat messages that hold more than answers: a user or system turn (so the prompt is inside)."""
    return isinstance(value, list) and any(m["role"] in ("system", "user") for m in value)


def implicit_chat_prompt(chosen, rejected) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: the prompt is their longest
    shared message prefix; what follows it must be assistant turns on both sides."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise RecordProblem(f"field '{name}' must be chat messages too (the other is a whole conversation)")
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_message(chosen[n], rejected[n]):
        n += 1
    if n == 0:
        raise RecordProblem("fields 'chosen' and 'rejected' share no prompt: their first messages differ")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if n == len(value):
            raise RecordProblem(f"field '{name}' has no answer after the prompt it shares with the other side")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        odd = next((j for j in range(n, len(value)) if value[j]["role"] != "assistant"), None)
        if odd is not None:
            raise RecordProblem(f"field '{name}'[{odd}] is a {value[odd]['role']!r} message after the shared prompt "
                                f"(only the final assistant turn may differ)")
    return chosen[:n], chosen[n:], rejected[n:]


def _same_message(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def implicit_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of two texts that start alike: the prompt is their shared text up to its
    last whitespace before the first differing character; each completion starts with that whitespace."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = next((k for k in range(shared - 1, -1, -1) if chosen[k].isspace()), 0)
    if not chosen[:cut].strip():
        raise RecordProblem("fields 'chosen' and 'rejected' share no prompt (no 'prompt' field, and their texts "
                            "differ within the first word)")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value[cut:].strip():
            raise RecordProblem(f"field '{name}' has no answer after the prompt it shares with the other side")
    return chosen[:cut], chosen[cut:], rejected[cut:]
