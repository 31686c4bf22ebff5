"""Tool-call parsers, table-driven, and checked against the chat templates' own rendering of calls."""

from __future__ import annotations

import pytest
from chat_families import TEMPLATES, family_tokenizer

from vllm_train.agents.tool_calls import ToolCall, get_parser, parse_hermes, parse_llama3_json, parser_for_template
from vllm_train.errors import VllmTrainError

ADD = ToolCall("add", {"a": 2, "b": 3})

HERMES_CASES = [  # text, content, calls, error (a substring of it)
    ("The answer is 5.", "The answer is 5.", [], None),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', "", [ADD], None),
    ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', "Let me add.",
     [ADD], None),
    ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>\n'
     '<tool_call>{"name": "neg", "arguments": {"x": 1}}</tool_call>', "", [ADD, ToolCall("neg", {"x": 1})], None),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}</tool_call>', "", [ADD], None),
    ('<tool_call>{"name": "now"}</tool_call>', "", [ToolCall("now", {})], None),
    ('<tool_call>{"name": add}</tool_call>', "", [], "not JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', "", [], '"name"'),
    ('<tool_call>{"name": "add", "arguments": [2, 3]}</tool_call>', "", [], "must be an object"),
    ('<tool_call>{"name": "add", "arguments": {"a": 2', "", [], "1 <tool_call> but 0 </tool_call>"),
]

LLAMA_CASES = [
    ("The answer is 5.", "The answer is 5.", [], None),
    ('{"name": "add", "parameters": {"a": 2, "b": 3}}', "", [ADD], None),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}', "", [ADD], None),
    ('{"name": "add", "arguments": {"a": 2, "b": 3}}', "", [ADD], None),
    ('{"name": "say", "parameters": {"s": "a;b}"}}; {"name": "add", "parameters": {"a": 2, "b": 3}}', "",
     [ToolCall("say", {"s": "a;b}"}), ADD], None),
    ("{not a call}", "{not a call}", [], None),  # no "name": plain text
    ('{"name": "add", "parameters": {"a": 2,}}', "", [], "not JSON"),
    ("<|python_tag|>add(2, 3)", "", [], "not JSON"),
]


@pytest.mark.parametrize("text,content,calls,error", HERMES_CASES)
def test_hermes(text, content, calls, error):
    parsed = parse_hermes(text)
    assert (parsed.content, parsed.calls) == (content, calls)
    assert (parsed.error is None) if error is None else (error in parsed.error)


@pytest.mark.parametrize("text,content,calls,error", LLAMA_CASES)
def test_llama3_json(text, content, calls, error):
    parsed = parse_llama3_json(text)
    assert (parsed.content, parsed.calls) == (content, calls)
    assert (parsed.error is None) if error is None else (error in parsed.error)


@pytest.mark.parametrize("family,parser,generation_prompt", [
    ("qwen2.5", "hermes", "<|im_start|>assistant\n"),
    ("qwen3", "hermes", "<|im_start|>assistant\n"),
    ("llama3.1", "llama3_json", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_a_call_the_template_renders_parses_back_to_itself(family, parser, generation_prompt):
    # the oracle: the template's own rendering of an assistant message carrying the call
    tok = family_tokenizer(family)
    assert parser_for_template(tok.chat_template) == parser
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    context = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "", "tool_calls": [
        ADD.as_message_call()]}], tokenize=False)
    assert context.endswith(generation_prompt) and full.startswith(context)
    turn = full[len(context):].split(tok.eos_token)[0]  # what the model writes before its end-of-turn token
    parsed = get_parser(None, tok.chat_template)(turn)
    assert parsed.calls == [ADD] and parsed.error is None


def test_template_choice_and_override():
    assert parser_for_template((TEMPLATES / "gemma2.jinja").read_text()) == "none"
    assert parser_for_template(None) == "none"
    assert get_parser("hermes", (TEMPLATES / "gemma2.jinja").read_text()) is parse_hermes
    assert get_parser(None, "{{ '<tool_call>' }}") is parse_hermes
    with pytest.raises(VllmTrainError, match="tool-call parser 'xml': unknown"):
        get_parser("xml")
