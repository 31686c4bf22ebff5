"""Turn prompts and completions (strings or chat messages) into token ids, the way vLLM will see them.

Prompts and completions are tokenized separately and concatenated: at inference vLLM tokenizes the
prompt alone and then *generates* the completion's tokens, so training on the same split keeps the
trainer's log-probs and vLLM's comparable token for token.
"""

from __future__ import annotations

from typing import Any

from vllm_train.errors import VllmTrainError
from vllm_train.loading import library_errors

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
    if not override and not getattr(tokenizer, "chat_template", None):
        raise VllmTrainError(NO_TEMPLATE)
    where = "--chat-template" if override else f"{getattr(tokenizer, 'name_or_path', 'the model')}: chat template"
    with library_errors(where):  # a template that raises on this chat (raise_exception, a missing key)
        return tokenizer.apply_chat_template(messages, chat_template=override, tokenize=False, **kwargs)


def active_chat_template(tokenizer) -> str | None:
    """The Jinja text chat messages are rendered with: the --chat-template override, else the tokenizer's own."""
    return _TEMPLATE_OVERRIDE["template"] or getattr(tokenizer, "chat_template", None)


def has_chat_template(tokenizer) -> bool:
    """Whether chat messages can be rendered: a --chat-template override, or the tokenizer's own template."""
    return bool(_TEMPLATE_OVERRIDE["template"] or getattr(tokenizer, "chat_template", None))


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


def encode_messages(tokenizer, messages: Messages) -> list[tuple[list[int], list[bool]]]:
    """[(ids, trainable)] for a conversation: every assistant turn trained once, everything else not.

    Each assistant turn i is rendered as vLLM would see it: its context ``messages[:i]`` with the generation
    prompt, then the turn. Most chat templates render each such context as a prefix of the next, so the
    conversation is one sequence (decoding to ``apply_chat_template(messages)``). Templates that rewrite
    earlier turns are not prefix-consistent: Qwen3-style reasoning templates drop an earlier answer's
    ``<think>`` block once a later user turn follows. Training the final rendering would then teach turns
    without the reasoning the model produces at inference, so such a conversation becomes one sequence per
    assistant turn instead: that turn's own context (rendered as at inference) + the turn, only the turn
    trained (as with DPO's prompt/completion pairs).
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise VllmTrainError("a 'messages' record needs at least one assistant message")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    texts = [(_context_text(tokenizer, messages[:i]), apply_template(tokenizer, messages[: i + 1])) for i in turns]
    for context, full in texts:
        if not full.startswith(context):
            raise VllmTrainError("the chat template does not render an assistant turn's context (with the generation "
                                 "prompt) as a prefix of context + turn")
    if all(texts[k][0].startswith(texts[k - 1][1]) for k in range(1, len(texts))):
        ids: list[int] = []
        trainable: list[bool] = []
        done = ""
        for context, full in texts:
            context_part = _tokens(tokenizer, context[len(done):])
            answer_part = _tokens(tokenizer, full[len(context):])
            ids += context_part + answer_part
            trainable += [False] * len(context_part) + [True] * len(answer_part)
            done = full
        return [(ids, trainable)]
    sequences = []
    for context, full in texts:  # not prefix-consistent: each turn in its own context
        context_ids, answer_ids = _tokens(tokenizer, context), _tokens(tokenizer, full[len(context):])
        sequences.append((context_ids + answer_ids, [False] * len(context_ids) + [True] * len(answer_ids)))
    return sequences


def _context_text(tokenizer, messages: Messages) -> str:
    return apply_template(tokenizer, messages, add_generation_prompt=True) if messages else ""


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, record: dict[str, Any]) -> list[tuple[list[int], list[bool]]]:
    """[(ids, trainable)] for one SFT record {"text"} | {"prompt","completion"} | {"messages"}: one sequence,
    or one per assistant turn of a conversation whose template is not prefix-consistent (`encode_messages`)."""
    if "messages" in record:
        return encode_messages(tokenizer, record["messages"])
    if "prompt" in record:
        p = prompt_ids(tokenizer, record["prompt"])
        c = completion_ids(tokenizer, record["prompt"], record["completion"])
        return [(p + c, [False] * len(p) + [True] * len(c))]
    ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return [(ids, [True] * len(ids))]
