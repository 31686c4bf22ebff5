"""The turn step with a scripted fake model (canned assistant texts, tokenized, ending on the end-of-turn
token): the finished episode's ids are the chat template's rendering of the whole conversation, and the
loss mask marks exactly the model's turns."""

from __future__ import annotations

import pytest
from chat_families import end_of_turn_id, family_tokenizer

from vllm_train.agents.bridge import render_ids
from vllm_train.agents.environment import load_environment
from vllm_train.agents.turns import ModelTurn, TurnRules, begin_episode, take_turn


class Calculator:
    def __init__(self):
        self.calls = []

    def reset(self, **row) -> str:
        self.answer = row["answer"]
        return " Use the tools."

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls.append((a, b))
        return a + b

    def divide(self, a: int, b: int) -> float:
        """Divide a by b.

        Args:
            a: The dividend.
            b: The divisor.
        """
        return a / b

    def get_reward(self) -> float:
        return float(any(a + b == self.answer for a, b in self.calls))


class GuessGame:
    def reset(self, **row) -> None:
        self.answer, self.solved = str(row["answer"]), False

    def respond(self, text: str) -> str | None:
        self.solved = text.strip() == self.answer
        return None if self.solved else "wrong, try again"

    def get_reward(self) -> float:
        return float(self.solved)


QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
HERMES_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
TAIL = {"toy": "", "qwen2.5": "\n", "llama3.1": "", "gemma2": "\n"}  # what the template writes after a last turn


def fake_turn(tok, family: str, text: str, finish_reason: str = "stop") -> ModelTurn:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if finish_reason == "stop":
        ids = ids + [end_of_turn_id(tok, family)]
    return ModelTurn(ids, [-0.25] * len(ids), text, finish_reason)


def play(tok, family, env_class, texts, parser=None, max_turns=None, budget=None, row=None):
    """Run the scripted turns until the episode stops; (episode, env, the turns played, what take_turn said)."""
    rules = TurnRules.for_tokenizer(tok, parser, max_turns, {end_of_turn_id(tok, family)})
    env = load_environment(env_class).create(tool_timeout=5.0)
    episode = begin_episode(rules, QUESTION, row or {"answer": 5}, env, budget)
    played, answers = [], []
    for text in texts:
        played.append(fake_turn(tok, family, text))
        answers.append(take_turn(episode, played[-1], env, rules))
        if not answers[-1]:
            break
    return episode, env, played, answers


def expected_mask(episode, played) -> list[int]:
    mask = [0] * len(episode.input_ids)
    for segment, turn in zip(episode.model_segments, played):
        assert episode.input_ids[segment.start:segment.end] == turn.token_ids  # the engine's ids, verbatim
        mask[segment.start:segment.end] = [1] * len(turn.token_ids)
    return mask


def assert_rendering(tok, family, episode, conversation, tools=None):
    tail = tok(TAIL[family], add_special_tokens=False)["input_ids"]
    assert episode.input_ids + tail == render_ids(tok, conversation, tools)


@pytest.mark.parametrize("family,parser,call_text,call_message", [
    ("toy", "hermes", HERMES_ADD, {"role": "assistant", "content": HERMES_ADD}),  # the toy template writes text
    ("qwen2.5", None, HERMES_ADD, {"role": "assistant", "content": "", "tool_calls": [CALL]}),
    ("llama3.1", None, '{"name": "add", "parameters": {"a": 2, "b": 3}}',
     {"role": "assistant", "content": "", "tool_calls": [CALL]}),
])
def test_calculator_episode_is_the_rendered_conversation(family, parser, call_text, call_message):
    tok = family_tokenizer(family)
    episode, env, played, answers = play(tok, family, Calculator, [call_text, "The sum is 5."], parser)
    assert answers == [True, False] and (episode.end_reason, episode.truncated) == ("done", False)
    tool = {"role": "tool", "name": "add", "content": "5"}
    conversation = [{"role": "user", "content": "What is 2 + 3? Use the tools."}, call_message, tool,
                    {"role": "assistant", "content": "The sum is 5."}]
    assert_rendering(tok, family, episode, conversation, env.tools)
    assert episode.loss_mask == expected_mask(episode, played)
    assert episode.sampled_logprobs == [-0.25 * m for m in episode.loss_mask]
    assert [s.kind for s in episode.segments] == ["prompt", "model", "tool", "model"]
    assert episode.model_segments[0].tool_calls == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    c = episode.counters
    assert (c.model_turns, c.tool_calls, c.tool_errors, c.parse_failures) == (2, 1, 0, 0)
    assert c.env_tokens == episode.segments[2].length and env.reward() == 1.0
    if family == "qwen2.5":  # the text log: the parsed call, the tool message, the answer
        assert episode.messages == conversation


@pytest.mark.parametrize("family", ["toy", "qwen2.5", "gemma2"])
def test_respond_game_episode(family):
    tok = family_tokenizer(family)
    episode, env, played, answers = play(tok, family, GuessGame, ["4", "5"])
    assert answers == [True, False] and episode.end_reason == "done"
    conversation = QUESTION + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "wrong, try again"},
                               {"role": "assistant", "content": "5"}]
    assert_rendering(tok, family, episode, conversation)
    assert episode.loss_mask == expected_mask(episode, played)
    assert [s.kind for s in episode.segments] == ["prompt", "model", "user", "model"]
    assert env.reward() == 1.0 and episode.messages == conversation


def test_a_tool_exception_goes_back_to_the_model():
    tok = family_tokenizer("qwen2.5")
    call = '<tool_call>\n{"name": "divide", "arguments": {"a": 1, "b": 0}}\n</tool_call>'
    episode, _, _, answers = play(tok, "qwen2.5", Calculator, [call, "I cannot divide by zero."])
    assert answers == [True, False] and episode.end_reason == "done"
    assert "<tool_response>\nError: ZeroDivisionError: division by zero\n</tool_response>" in tok.decode(
        episode.input_ids)
    assert episode.counters.tool_errors == 1
    assert episode.model_segments[0].errors == ["Error: ZeroDivisionError: division by zero"]


def test_a_bad_call_ends_the_episode():
    tok = family_tokenizer("qwen2.5")
    episode, _, played, answers = play(tok, "qwen2.5", Calculator, ['<tool_call>\n{"name": add}\n</tool_call>', "x"])
    assert answers == [False] and (episode.end_reason, episode.truncated) == ("bad_tool_call", False)
    assert episode.counters.parse_failures == 1 and episode.model_segments[0].errors[0].startswith("bad tool call")
    assert episode.completion_ids == played[0].token_ids  # the bad turn is kept (its reward teaches)


def test_max_turns_ends_truncated_after_the_environment_saw_the_turn():
    tok = family_tokenizer("qwen2.5")
    episode, env, played, answers = play(tok, "qwen2.5", Calculator, [HERMES_ADD, "5"], max_turns=1)
    assert answers == [False] and (episode.end_reason, episode.truncated) == ("max_turns", True)
    assert env.instance.calls == [(2, 3)] and env.reward() == 1.0  # the tool ran
    assert episode.completion_ids == played[0].token_ids  # its result was not appended: no turn would read it


def test_the_token_budget_cuts_the_last_turn():
    tok = family_tokenizer("qwen2.5")
    full, *_ = play(tok, "qwen2.5", Calculator, [HERMES_ADD, "The sum is 5."])
    first_and_bridge = full.segments[2].end - full.prompt_length
    episode, _, played, answers = play(tok, "qwen2.5", Calculator, [HERMES_ADD, "The sum is 5."],
                                       budget=first_and_bridge + 3)
    assert answers == [True, False] and (episode.end_reason, episode.truncated) == ("max_episode_tokens", True)
    assert episode.completion_ids == full.completion_ids[:first_and_bridge + 3]
    assert sum(episode.loss_mask) == len(played[0].token_ids) + 3


def test_a_turn_without_its_end_token_ends_truncated():
    tok = family_tokenizer("qwen2.5")
    rules = TurnRules.for_tokenizer(tok)
    env = load_environment(Calculator).create()
    episode = begin_episode(rules, QUESTION, {"answer": 5}, env)
    half_call = '<tool_call>\n{"name": "add", "argu'
    assert take_turn(episode, fake_turn(tok, "qwen2.5", half_call, "length"), env, rules) is False
    assert (episode.end_reason, episode.truncated, episode.counters.parse_failures) == ("length", True, 0)


def test_the_models_own_ids_are_kept_not_retokenized():
    # the toy BPE merges "a"+"n" into one token; a model may still sample them apart
    tok = family_tokenizer("toy")
    a, n = tok.convert_tokens_to_ids(["a", "n"])
    assert tok("an", add_special_tokens=False)["input_ids"] != [a, n]
    rules = TurnRules.for_tokenizer(tok)
    env = load_environment(GuessGame).create()
    episode = begin_episode(rules, QUESTION, {"answer": 5}, env)
    assert take_turn(episode, ModelTurn([a, n, tok.eos_token_id], [-1.0, -2.0, -0.1], "an", "stop"), env, rules)
    assert episode.input_ids[episode.prompt_length:episode.prompt_length + 3] == [a, n, tok.eos_token_id]


def test_no_exact_bridge_ends_the_episode_and_is_counted():
    tok = family_tokenizer("gemma2")  # Gemma's template has no tool messages
    episode, env, _, answers = play(tok, "gemma2", Calculator, [HERMES_ADD, "5"], parser="hermes")
    assert answers == [False] and (episode.end_reason, episode.truncated) == ("template_fallback", True)
    assert episode.counters.template_fallbacks == 1 and "alternate" in episode.model_segments[0].errors[0]
