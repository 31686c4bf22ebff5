"""One step of a multi-turn episode, engine-agnostic: the model's new turn in, the next prompt out.

The trainer's rollout loop (turn-synchronous: every live episode's next prompt is ``episode.input_ids``,
generated from token ids, not text) calls `begin_episode` once per episode and `take_turn` after each
generation; `take_turn` says whether the episode goes on. Nothing here knows the engine: a turn is the
ids, log-probs, text and finish reason any engine returns, so the same code drives vLLM in-process, a
vLLM server, or the scripted fake model of the tests.

What a turn leads to, in order:
1. the turn is appended as generated (cut to the token budget: the episode ends truncated);
2. a turn that did not end with an end-of-turn token (``finish_reason="length"``) ends the episode,
   truncated -- appending a tool result after half a turn would show the model a context it never makes;
3. tool calls (read by the template family's parser): each runs in the environment, its result (or its
   error, which the model can recover from) becomes a tool message; a call that does not parse ends the
   episode (counted in ``parse_failures``);
4. no call: an environment with ``respond`` gets the text, and its reply becomes a user message (None:
   the episode is done); without ``respond`` the episode is done;
5. at ``max_turns`` model turns the episode ends truncated -- after the environment saw the last turn, so
   its state (and ``get_reward``) reflects every action the model took;
6. else the new messages' bridge tokens (`vllm_train.agents.bridge`) are appended, masked out of the loss;
   a template that cannot bridge them exactly ends the episode (counted in ``template_fallbacks``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

from vllm_train.agents.bridge import bridge_ids, first_prompt_ids
from vllm_train.agents.environment import EnvironmentInstance
from vllm_train.agents.episode import TOOL, USER, Episode, Segment
from vllm_train.agents.tool_calls import ParsedTurn, Parser, get_parser
from vllm_train.data.tokenize import Messages, active_chat_template
from vllm_train.errors import VllmTrainError


class ModelTurn(NamedTuple):
    """One generation as the engine returned it (the ids include the end-of-turn token it stopped on)."""
    token_ids: list[int]
    logprobs: list[float]  # the sampled token's log-prob, one per id
    text: str  # decoded without special tokens, as the engine's text
    finish_reason: str | None  # "stop" | "length" | ...


@dataclass(frozen=True)
class TurnRules:
    """What every turn of a run's episodes is judged by."""
    tokenizer: Any
    parser: Parser
    end_of_turn_ids: frozenset[int]  # the ids a turn may end on (the generation config's EOS ids)
    max_turns: int | None = None  # model turns per episode

    @staticmethod
    def for_tokenizer(tokenizer, parser: str | None = None, max_turns: int | None = None,
                      end_of_turn_ids: Collection[int] | None = None) -> TurnRules:
        """Rules with the tool-call parser the chat template implies (or `parser` by name) and the tokenizer's
        EOS as the end-of-turn token (or `end_of_turn_ids`: e.g. Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
        if max_turns is not None and max_turns < 1:
            raise VllmTrainError(f"TurnRules: max_turns must be >= 1 (or None), got {max_turns}")
        template = active_chat_template(tokenizer)
        if isinstance(template, dict):  # named templates: any of them may show the call format
            template = "\n".join(template.values())
        ends = frozenset(end_of_turn_ids) if end_of_turn_ids else frozenset({tokenizer.eos_token_id})
        return TurnRules(tokenizer, get_parser(parser, template), ends, max_turns)


def begin_episode(rules: TurnRules, prompt: Messages, row: dict | None = None,
                  env: EnvironmentInstance | None = None, max_episode_tokens: int | None = None) -> Episode:
    """A started episode: the environment reset with the prompt record `row` (its text appended to the last
    user message), the messages rendered with the environment's tool schemas and the generation prompt."""
    if not isinstance(prompt, list) or not prompt:
        raise VllmTrainError("begin_episode: a multi-turn episode needs a chat-message prompt (a list of messages)")
    messages = [dict(m) for m in prompt]
    extra = env.reset(dict(row or {})) if env is not None else None
    if extra:
        users = [m for m in messages if m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str):
            raise VllmTrainError(f"begin_episode: {env.kind.name}.reset returned text but the prompt has no "
                                 f"text user message to append it to")
        users[-1]["content"] += extra
    tools = env.tools if env is not None and env.tools else None
    episode = Episode(max_episode_tokens).start(first_prompt_ids(rules.tokenizer, messages, tools))
    episode.messages = messages
    return episode


def take_turn(episode: Episode, turn: ModelTurn, env: EnvironmentInstance | None, rules: TurnRules) -> bool:
    """Append the model's `turn` and whatever it leads to (see the module docstring); True: generate again
    from ``episode.input_ids`` (at most ``episode.tokens_left`` new tokens)."""
    segment = episode.add_model_turn(turn.token_ids, turn.logprobs, turn.finish_reason)
    ended_on_turn_end = turn.token_ids[-1] in rules.end_of_turn_ids
    parsed = rules.parser(turn.text) if ended_on_turn_end else ParsedTurn(turn.text, [])
    episode.messages.append(_assistant_message(ParsedTurn(turn.text, []) if parsed.error else parsed))
    if episode.done:  # cut by the token budget
        return False
    if not ended_on_turn_end:
        episode.end(turn.finish_reason or "no_end_of_turn", truncated=True)
        return False
    if parsed.error:
        segment.errors.append(f"bad tool call: {parsed.error}")
        episode.counters.parse_failures += 1
        episode.end("bad_tool_call")
        return False
    if parsed.calls:
        new_messages, kind = _run_tools(episode, segment, parsed, env), TOOL
    elif env is not None and env.can_respond:
        reply = env.respond(turn.text)
        if reply is None:
            episode.end("done")
            return False
        new_messages, kind = [{"role": "user", "content": reply}], USER
    else:
        episode.end("done")
        return False
    episode.messages.extend(new_messages)
    if rules.max_turns is not None and episode.counters.model_turns >= rules.max_turns:
        episode.end("max_turns", truncated=True)
        return False
    return _append_bridge(episode, new_messages, kind, env, rules, end_of_turn_id=turn.token_ids[-1])


def _assistant_message(parsed: ParsedTurn) -> dict:
    message: dict = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [call.as_message_call() for call in parsed.calls]
    return message


def _run_tools(episode: Episode, segment: Segment, parsed: ParsedTurn, env: EnvironmentInstance | None) -> Messages:
    """Each call run in order (a later call may depend on an earlier one's effect); one tool message each."""
    messages = []
    for call in parsed.calls:
        segment.tool_calls.append({"name": call.name, "arguments": call.arguments})
        episode.counters.tool_calls += 1
        if env is None:
            text, failed = f"Error: no tools are available (the model called {call.name!r})", True
        else:
            text, failed = env.call_tool(call.name, call.arguments)
        if failed:
            segment.errors.append(text)
            episode.counters.tool_errors += 1
        messages.append({"role": "tool", "name": call.name, "content": text})
    return messages


def _append_bridge(episode: Episode, new_messages: Messages, kind: str, env: EnvironmentInstance | None,
                   rules: TurnRules, end_of_turn_id: int) -> bool:
    tools = env.tools if env is not None and env.tools else None
    bridge = bridge_ids(rules.tokenizer, new_messages, tools, end_of_turn_id=end_of_turn_id)
    if bridge.ids is None:
        episode.counters.template_fallbacks += 1
        episode.last_model_turn.errors.append(f"no exact bridge: {bridge.fallback}")
        episode.end("template_fallback", truncated=True)
        return False
    episode.add_env_segment(bridge.ids, kind)
    return not episode.done
