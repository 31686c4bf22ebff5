"""Bridge tokens against the chat templates themselves: prompt + model turn + bridge + next turn, as ids,
is the template's rendering of the whole conversation, for every family's template (the architecture
matrix's families all ship the toy template; tests/chat_templates holds our own templates reproducing the
Qwen2.5, Qwen3, Llama 3.1 and Gemma 2 token layouts)."""

from __future__ import annotations

import pytest
from chat_families import end_of_turn_id, family_tokenizer

from vllm_train.agents.bridge import DUMMY_PREFIX, bridge_ids, first_prompt_ids, render_ids
from vllm_train.agents.tool_calls import ToolCall

ADD_SCHEMA = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]

# family -> (what the template renders after a conversation's last end-of-turn token: the model never
# generates it; the text the model writes to call add(2, 3); the call's assistant message as the template takes it)
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
FAMILY_CASES = {
    "toy": ("", '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>',
            {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'}),
    "qwen2.5": ("\n", '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
                {"role": "assistant", "content": "", "tool_calls": [CALL]}),
    "qwen3": ("\n", '<think>\nI should add.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
                    '\n</tool_call>',
              {"role": "assistant", "content": "", "reasoning_content": "I should add.", "tool_calls": [CALL]}),
    "llama3.1": ("", '{"name": "add", "parameters": {"a": 2, "b": 3}}',
                 {"role": "assistant", "content": "", "tool_calls": [CALL]}),
    "gemma2": ("\n", None, None),  # no tool role: see test_a_template_without_tool_messages_falls_back
}


def model_turn(tok, family: str, text: str) -> list[int]:
    """A fake model's turn: the text's ids, then the end-of-turn token it stops on."""
    return tok(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok, family)]


def stitched(tok, family, prompt, turns, between, tools=None) -> list[int]:
    """prompt ids + turn 1 + bridge(between[0]) + turn 2 + ... -- what an episode holds."""
    ids = first_prompt_ids(tok, prompt, tools)
    for k, text in enumerate(turns):
        ids += model_turn(tok, family, text)
        if k < len(between):
            bridge = bridge_ids(tok, between[k], tools, end_of_turn_id=end_of_turn_id(tok, family))
            assert bridge.fallback is None
            ids += bridge.ids
    return ids


def assert_is_the_rendering(tok, family, ids, conversation, tools=None):
    full = render_ids(tok, conversation, tools)
    tail = tok(FAMILY_CASES[family][0], add_special_tokens=False)["input_ids"]
    assert full == ids + tail, (tok.decode(full), tok.decode(ids))


@pytest.mark.parametrize("family", ["toy", "qwen2.5", "qwen3", "llama3.1"])
def test_tool_result_bridge_rebuilds_the_rendered_conversation(family):
    tok = family_tokenizer(family)
    _, call_text, call_message = FAMILY_CASES[family]
    tool = [{"role": "tool", "name": "add", "content": "5"}]
    # Qwen3 thinks before every answer after the question (its template renders the block in)
    answer = "<think>\nDone.\n</think>\n\nThe sum is 5." if family == "qwen3" else "The sum is 5."
    ids = stitched(tok, family, QUESTION, [call_text, answer], [tool], [ADD_SCHEMA])
    conversation = QUESTION + [call_message] + tool + [{"role": "assistant", "content": answer}]
    assert_is_the_rendering(tok, family, ids, conversation, [ADD_SCHEMA])


@pytest.mark.parametrize("family", ["toy", "qwen2.5", "llama3.1", "gemma2"])
def test_user_reply_bridge_rebuilds_the_rendered_conversation(family):
    tok = family_tokenizer(family)
    reply = [{"role": "user", "content": "wrong, try again"}]
    ids = stitched(tok, family, QUESTION, ["4", "5"], [reply])
    conversation = QUESTION + [{"role": "assistant", "content": "4"}] + reply + [{"role": "assistant", "content": "5"}]
    assert_is_the_rendering(tok, family, ids, conversation)


def test_two_tool_results_in_one_bridge_qwen():
    # Qwen groups consecutive tool messages into one user turn: the bridge must carry both at once
    tok = family_tokenizer("qwen2.5")
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>')
    tools = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "2"}]
    ids = stitched(tok, "qwen2.5", QUESTION, [text, "5 and 2"], [tools], [ADD_SCHEMA])
    calls = [CALL, ToolCall("add", {"a": 1, "b": 1}).as_message_call()]
    conversation = QUESTION + [{"role": "assistant", "content": "", "tool_calls": calls}] + tools + [
        {"role": "assistant", "content": "5 and 2"}]
    assert_is_the_rendering(tok, "qwen2.5", ids, conversation, [ADD_SCHEMA])
    assert tok.decode(ids).count("<|im_start|>user") == 2  # the question, then one turn holding both results


def test_qwen3_user_reply_keeps_the_reasoning_the_model_saw():
    # Qwen3 drops an earlier answer's <think> block once a new user turn follows, so re-rendering the final
    # conversation is not what the model saw; the bridge is (the dummy assistant re-renders -- accepted)
    tok = family_tokenizer("qwen3")
    reply = [{"role": "user", "content": "wrong, try again"}]
    short = render_ids(tok, DUMMY_PREFIX)
    assert render_ids(tok, DUMMY_PREFIX + reply, add_generation_prompt=True)[:len(short)] != short  # no strict prefix
    first, second = "<think>\nadd\n</think>\n\n4", "<think>\nagain\n</think>\n\n5"
    ids = stitched(tok, "qwen3", QUESTION, [first, second], [reply])
    seen = ("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n" + first + "<|im_end|>\n"
            "<|im_start|>user\nwrong, try again<|im_end|>\n<|im_start|>assistant\n" + second + "<|im_end|>")
    assert ids == tok(seen, add_special_tokens=False)["input_ids"]
    rerendered = render_ids(tok, QUESTION + [{"role": "assistant", "content": first}] + reply + [
        {"role": "assistant", "content": second}])
    assert "add" not in tok.decode(rerendered)  # what training on a re-rendering would have taught


def test_strict_prefix_bridge_is_the_difference_of_renderings():
    tok = family_tokenizer("toy")  # the toy template puts nothing after <|end|>
    new = [{"role": "user", "content": "again"}]
    short = render_ids(tok, DUMMY_PREFIX)
    long = render_ids(tok, DUMMY_PREFIX + new, add_generation_prompt=True)
    assert long[:len(short)] == short
    assert bridge_ids(tok, new).ids == long[len(short):]
    assert tok.decode(bridge_ids(tok, new).ids) == "<|user|>again<|end|><|assistant|>"


def test_a_template_without_tool_messages_falls_back():
    tok = family_tokenizer("gemma2")
    bridge = bridge_ids(tok, [{"role": "tool", "content": "5"}], end_of_turn_id=end_of_turn_id(tok, "gemma2"))
    assert bridge.ids is None
    assert "cannot render tool messages" in bridge.fallback and "alternate" in bridge.fallback


def test_a_turn_end_the_template_never_writes_falls_back():
    tok = family_tokenizer("gemma2")  # Gemma's EOS <eos> is not how its template ends a turn
    bridge = bridge_ids(tok, [{"role": "user", "content": "again"}])  # end_of_turn_id defaults to the EOS
    assert bridge.ids is None and "does not end an assistant turn with the model's end-of-turn token" in bridge.fallback


def test_a_template_that_rewrites_earlier_turns_falls_back():
    tok = family_tokenizer("toy")
    # a system line that counts the messages changes once more messages follow
    tok.chat_template = ("<|system|>{{ messages | length }}<|end|>{% for m in messages %}<|{{ m['role'] }}|>"
                         "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    bridge = bridge_ids(tok, [{"role": "user", "content": "again"}])
    assert bridge.ids is None and "renders the earlier turns differently" in bridge.fallback
