"""Bridge tokens: the ids the chat template puts between a model turn and the next one.

After the model's turn (its ids as generated, ending with its end-of-turn token) the next prompt needs
the environment's messages (tool results, a user reply) and the next generation prompt, as the chat
template renders them -- without re-rendering anything before. The template is asked for exactly that
difference, on a dummy conversation (TRL's `_get_tool_suffix_ids`, verifiers' token client):

    short = render([dummy user, dummy assistant])
    long  = render([dummy user, dummy assistant, *new_messages], add_generation_prompt=True)
    bridge = long after the dummy assistant's end-of-turn token

The cut is after the assistant's end-of-turn token, not at the end of `short`: templates put a
separator after it (ChatML's "<|im_end|>\\n") that the model never generates -- it stops at the token --
so the separator belongs to the bridge.

The cut is only trusted when the two renderings agree: `long` starts with `short` (the prefix property)
through the end-of-turn token, followed by `short`'s separator. One relaxation is accepted because real
templates need it: the dummy assistant turn *itself* may render differently once messages follow, as
long as every turn before it and everything after its end-of-turn token agree (Qwen3 writes an empty
``<think></think>`` block only into the last assistant turn). Anything else -- the template raises on
the new roles, does not end an assistant turn with the model's end-of-turn token, or renders earlier
turns differently -- is a fallback: `Bridge.ids` is None and `Bridge.fallback` says why; the caller
ends the episode and counts it, rather than train on tokens the model would not have seen.
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_train.data.tokenize import Messages, apply_template

DUMMY_PREFIX: Messages = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"}]


class Bridge(NamedTuple):
    ids: list[int] | None  # None: no exact bridge (see `fallback`)
    fallback: str | None = None  # why there is none


def render_ids(tokenizer, messages: Messages, tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> list[int]:
    """The chat template's rendering of `messages` as token ids (the template writes any BOS itself)."""
    extra = {"tools": tools} if tools else {}
    text = apply_template(tokenizer, messages, add_generation_prompt=add_generation_prompt, **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_prompt_ids(tokenizer, messages: Messages, tools: list[dict] | None = None) -> list[int]:
    """The episode's first prompt: the messages (and the tool schemas, if any) with the generation prompt."""
    return render_ids(tokenizer, messages, tools, add_generation_prompt=True)


def bridge_ids(tokenizer, new_messages: Messages, tools: list[dict] | None = None,
               end_of_turn_id: int | None = None) -> Bridge:
    """Ids of `new_messages` (tool or user messages) plus the next generation prompt, to append after a
    model turn that ended with `end_of_turn_id` (default: the tokenizer's EOS). See the module docstring."""
    end_id = tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id
    roles = "/".join(dict.fromkeys(m.get("role", "?") for m in new_messages))
    try:
        short = render_ids(tokenizer, DUMMY_PREFIX, tools)
        long = render_ids(tokenizer, DUMMY_PREFIX + list(new_messages), tools, add_generation_prompt=True)
    except Exception as exc:  # templates reject roles they do not know with raise_exception
        return Bridge(None, f"the chat template cannot render {roles} messages after an assistant turn: "
                            f"{type(exc).__name__}: {exc}")
    short_ends = [i for i, t in enumerate(short) if t == end_id]
    if not short_ends:
        token = tokenizer.convert_ids_to_tokens(end_id) if end_id is not None else None
        return Bridge(None, f"the chat template does not end an assistant turn with the model's end-of-turn "
                            f"token {end_id} ({token!r})")
    long_ends = [i for i, t in enumerate(long) if t == end_id]
    if len(long_ends) < len(short_ends):
        return Bridge(None, f"the chat template renders fewer turns once {roles} messages follow")
    cut_short, cut_long = short_ends[-1] + 1, long_ends[len(short_ends) - 1] + 1
    separator = short[cut_short:]
    before_short = short[:short_ends[-2] + 1] if len(short_ends) > 1 else []
    if long[:len(before_short)] != before_short or long[cut_long:cut_long + len(separator)] != separator:
        return Bridge(None, f"the chat template renders the earlier turns differently once {roles} messages "
                            f"follow (no exact bridge)")
    return Bridge(long[cut_long:])
