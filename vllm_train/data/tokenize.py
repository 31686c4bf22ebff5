"""Turn prompts and completions (strings or chat messages) into token ids, the way vLLM will see them.

Prompts and completions are tokenized separately and concatenated: at inference vLLM tokenizes the
prompt alone and then *generates* the completion's tokens, so training on the same split keeps the
trainer's log-probs and vLLM's comparable token for token.
"""

from __future__ import annotations

from typing import Any

from vllm_train.errors import VllmTrainError

Messages = list[dict]

# The Jinja chat template every tokenizer of this process renders chat messages with, in place of the model's
# own: set once by a command's --chat-template FILE (`use_chat_template`); None: each tokenizer's own.
_TEMPLATE_OVERRIDE: dict[str, str | None] = {"template": None}
NO_TEMPLATE = ("the model's tokenizer has no chat template, so chat messages cannot be rendered: pass "
               "--chat-template FILE (a Jinja chat template, e.g. one of a model of the same family), or give "
               "plain-text prompt/completion records")


def use_chat_template(template: str | None) -> None:
    """Render every chat from now on with `template` (Jinja text), whatever the tokenizer's own (None: undo)."""
    _TEMPLATE_OVERRIDE["template"] = template


def apply_template(tokenizer, messages: Messages, **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)` with the --chat-template override;
    one clear line when there is no template at all."""
    override = _TEMPLATE_OVERRIDE["template"]
    if override:
        return tokenizer.apply_chat_template(messages, chat_template=override, tokenize=False, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise VllmTrainError(NO_TEMPLATE)
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def render_prompt(tokenizer, prompt: str | Messages) -> str:
    """Prompt text as it goes to the model: chat messages through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    return apply_template(tokenizer, prompt, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str | Messages) -> list[int]:
    """Token ids of a prompt. Plain strings get the tokenizer's special tokens (BOS), as vLLM adds
    them; chat-rendered text already carries whatever the template puts there."""
    text = render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]


def completion_ids(tokenizer, prompt: str | Messages, completion: str | Messages) -> list[int]:
    """Token ids of a completion that follows `prompt`, ending with the end-of-turn/EOS token."""
    if isinstance(completion, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return ids
    if isinstance(prompt, str):
        raise VllmTrainError("a chat-message completion needs a chat-message prompt")
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = apply_template(tokenizer, list(prompt) + list(completion))
    if not full_text.startswith(prompt_text):
        raise VllmTrainError("the chat template does not render the prompt as a prefix of prompt + completion")
    return tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]


def encode_messages(tokenizer, messages: Messages) -> tuple[list[int], list[bool]]:
    """(ids, trainable) for a conversation: every assistant turn is trainable, everything else is not."""
    if not any(m["role"] == "assistant" for m in messages):
        raise VllmTrainError("a 'messages' record needs at least one assistant message")
    ids: list[int] = []
    trainable: list[bool] = []
    done_text = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = apply_template(tokenizer, messages[:i], add_generation_prompt=True) if i > 0 else ""
        full_text = apply_template(tokenizer, messages[: i + 1])
        if not prompt_text.startswith(done_text) or not full_text.startswith(prompt_text):
            raise VllmTrainError("the chat template does not render earlier turns as a prefix of later ones")
        prompt_part = tokenizer(prompt_text[len(done_text):], add_special_tokens=False)["input_ids"]
        answer_part = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        ids += prompt_part + answer_part
        trainable += [False] * len(prompt_part) + [True] * len(answer_part)
        done_text = full_text
    return ids, trainable


def encode_example(tokenizer, record: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """(ids, trainable) for one SFT record: {"text"} | {"prompt","completion"} | {"messages"}."""
    if "messages" in record:
        return encode_messages(tokenizer, record["messages"])
    if "prompt" in record:
        p = prompt_ids(tokenizer, record["prompt"])
        c = completion_ids(tokenizer, record["prompt"], record["completion"])
        return p + c, [False] * len(p) + [True] * len(c)
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, [True] * len(ids)
