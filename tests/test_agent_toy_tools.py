"""The shipped tiny-llama-tools: its chat template bridges tool and user turns token-exactly, and the base
model calls its calculator tool in a minority of answers, with the problem's own numbers, through the real
vLLM engine (what examples/agent_tools.py trains on)."""

from __future__ import annotations

import os

import pytest

from vllm_train.agents.bridge import bridge_ids, first_prompt_ids, render_ids
from vllm_train.agents.environment import load_environment
from vllm_train.agents.tool_calls import parser_for_template
from vllm_train.assets import TINY_TOOLS_MODEL
from vllm_train.toy import question

QUESTION = [{"role": "user", "content": question(47, 38)}]
CALL = '<tool_call>{"name": "add", "arguments": {"a": 47, "b": 38}}</tool_call>'


class Calculator:
    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        return a + b


@pytest.fixture(scope="module")
def tools_tokenizer():
    from vllm_train.models import load_tokenizer

    return load_tokenizer(str(TINY_TOOLS_MODEL))


def model_turn(tok, text: str) -> list[int]:
    """A turn's ids as the model generates them: the text's tokens, then its end-of-turn token."""
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_the_template_is_read_as_hermes_and_shows_the_tools_in_one_line(tools_tokenizer):
    tools = load_environment(Calculator).tools
    assert parser_for_template(tools_tokenizer.chat_template) == "hermes"
    text = tools_tokenizer.decode(first_prompt_ids(tools_tokenizer, QUESTION, tools))
    assert text == "<|system|>tools: add<|end|><|user|>What is 47 + 38?<|end|><|assistant|>"
    assert len(tools_tokenizer(CALL, add_special_tokens=False)["input_ids"]) <= 12  # merges keep the call short


def test_tool_and_user_bridges_rebuild_the_rendered_conversation(tools_tokenizer):
    tok, tools = tools_tokenizer, load_environment(Calculator).tools
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 47, "b": 38}}}
    conversation = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": "add", "content": "85"}, {"role": "assistant", "content": "85"},
                    {"role": "user", "content": "and again?"}, {"role": "assistant", "content": "85"}]
    tool_bridge = bridge_ids(tok, conversation[2:3], tools)
    user_bridge = bridge_ids(tok, conversation[4:5], tools)
    assert tool_bridge.fallback is None and user_bridge.fallback is None
    assert tok.decode(tool_bridge.ids) == "<|tool|>85<|end|><|assistant|>"
    stitched = (first_prompt_ids(tok, QUESTION, tools) + model_turn(tok, CALL) + tool_bridge.ids
                + model_turn(tok, "85") + user_bridge.ids + model_turn(tok, "85"))
    assert stitched == render_ids(tok, conversation, tools)  # token ids, not text


ENGINE_SCRIPT = '''
import json, os, re, sys
sys.path.insert(0, {tests_dir!r})
from vllm_train.agents.bridge import render_ids
from vllm_train.agents.environment import load_environment
from vllm_train.agents.turns import TurnRules
from vllm_train.assets import TINY_TOOLS_MODEL, data_file
from vllm_train.data.io import load_records
from vllm_train.engine.llm import EngineOptions, VLLMEngine
from vllm_train.models import load_tokenizer
from vllm_train.trainers.rl_sampling import Agent, sample_episodes
from test_agent_toy_tools import Calculator

def addends(record):
    a, b = map(int, re.findall(r"\\d+", record["prompt"][0]["content"]))
    return {{"a": a, "b": b}}

records = load_records(data_file("rl_eval.jsonl"))[:100]
tok = load_tokenizer(str(TINY_TOOLS_MODEL))
engine = VLLMEngine(str(TINY_TOOLS_MODEL), EngineOptions(dtype="float32"))
agent = Agent(load_environment(Calculator), TurnRules.for_tokenizer(tok, max_turns=2), 64, 10.0)
out = {{}}
for mode, n, temperature in (("greedy", 1, 0.0), ("sampled", 4, 1.0)):
    episodes, _ = sample_episodes(engine, agent, records, n, 24, 0, None, dict(temperature=temperature, top_p=1.0))
    called = [e for e in episodes if e.counters.tool_calls]
    expected = [records[i // n] for i, e in enumerate(episodes) if e.counters.tool_calls]
    out[mode] = dict(
        tool_rate=len(called) / len(episodes), calls=len(called),
        right_arguments=sum(e.segments[1].tool_calls[0]["arguments"] == addends(r) for e, r in zip(called, expected)),
        right_answers=sum(e.messages[-1]["content"].strip() == str(r["answer"]) for e, r in zip(called, expected)),
        rendered=sum(e.input_ids == render_ids(tok, e.messages, agent.environment.tools) for e in episodes),
        episodes=len(episodes), errors=sum(e.counters.tool_errors + e.counters.parse_failures
                                           + e.counters.template_fallbacks for e in episodes))
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)  # skip interpreter teardown, where vLLM's engine threads occasionally abort the process
'''


def test_the_base_model_calls_the_tool_in_a_minority_of_answers(tmp_path, run_result_script):
    script = tmp_path / "tools_engine.py"
    script.write_text(ENGINE_SCRIPT.format(tests_dir=os.path.dirname(__file__)))
    result = run_result_script(script, [], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=300)
    greedy, sampled = result["greedy"], result["sampled"]
    assert greedy["tool_rate"] <= 0.5 and 0.05 <= sampled["tool_rate"] <= 0.5, result  # a minority
    assert greedy["errors"] == sampled["errors"] == 0, result  # every call parsed, ran, and was bridged
    # a sampled call names the problem's own numbers, and the answer after the tool's result is that result
    assert sampled["right_arguments"] >= 0.9 * sampled["calls"], sampled
    assert sampled["right_answers"] >= 0.9 * sampled["calls"], sampled
    # greedy episodes are, token for token, the template's rendering of their messages (tool turns included)
    assert greedy["rendered"] == greedy["episodes"], greedy
    assert sampled["rendered"] >= 0.9 * sampled["episodes"], sampled
