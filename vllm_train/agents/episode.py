"""A multi-turn episode as flat token arrays: what the model saw, what it generated, what it sampled.

An episode is built by appending, never by re-rendering: the prompt's ids, then each model turn's ids
exactly as the engine returned them, then each environment segment's ids (a tool result or a user
message, already rendered into "bridge" tokens by `vllm_train.agents.bridge`). Re-applying the chat
template to the final messages would drift from what the model saw (tool parsers edit content; decode
then encode is not the identity), which verl measured as PPO failing to converge even single-turn.

Three aligned arrays come out:
- ``input_ids``: everything, in order (the next turn's prompt is exactly this);
- ``loss_mask``: 1 on tokens the model generated (each turn's end-of-turn token included), 0 on the
  prompt and every environment segment -- the model is not trained to predict tool output or users;
- ``sampled_logprobs``: the engine's log-prob of each generated token, 0.0 elsewhere (the importance
  weights of the loss read it only where the mask is 1).

The token budget ``max_episode_tokens`` counts everything after the prompt (model and environment
tokens), as TRL's ``max_completion_length`` caps a whole tool-calling episode: it bounds the
completion tensors the trainer pads to. A model turn that would overflow is cut to the budget and the
episode ends truncated. An environment segment that would overflow is dropped whole, not cut: no model
token could follow it, so its tokens would only cost compute (TRL rolls such tool results back too).
A single-turn rollout is the one-segment case: ``start(prompt)``, one ``add_model_turn``, ``end``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_train.errors import VllmTrainError

PROMPT, MODEL, TOOL, USER = "prompt", "model", "tool", "user"
ENV_KINDS = (TOOL, USER)


@dataclass
class Segment:
    """One contiguous span ``input_ids[start:end]`` of the episode and what it was."""
    kind: str  # "prompt" | "model" | "tool" | "user"
    start: int
    end: int
    turn: int  # a model turn's own index (0-based); other segments: the model turn they follow (-1: none)
    finish_reason: str | None = None  # model turns: the engine's ("stop", "length")
    tool_calls: list[dict] = field(default_factory=list)  # model turns: [{"name", "arguments"}]
    errors: list[str] = field(default_factory=list)  # model turns: a bad tool call, tool errors

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Counters:
    model_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0  # a tool raised, timed out or was unknown (its text went back to the model)
    parse_failures: int = 0  # a turn's tool call could not be parsed (the episode ended)
    template_fallbacks: int = 0  # no exact bridge for an environment message (the episode ended)
    env_tokens: int = 0
    model_tokens: int = 0


class Episode:
    """Token arrays of one episode, appended turn by turn (see the module docstring)."""

    def __init__(self, max_episode_tokens: int | None = None):
        if max_episode_tokens is not None and max_episode_tokens < 1:
            raise VllmTrainError(f"Episode: max_episode_tokens must be >= 1 (or None), got {max_episode_tokens}")
        self.max_episode_tokens = max_episode_tokens
        self.input_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.sampled_logprobs: list[float] = []
        self.segments: list[Segment] = []
        self.counters = Counters()
        self.messages: list[dict] = []  # the conversation as text, for rewards and logs (never re-rendered)
        self.prompt_length = 0
        self.done = False
        self.truncated = False
        self.end_reason: str | None = None

    # ---- building -------------------------------------------------------------------------------
    def start(self, prompt_ids: list[int]) -> Episode:
        """The first segment: the rendered prompt (the generation prompt included)."""
        if self.segments:
            raise VllmTrainError("Episode.start: the episode has already started")
        if not prompt_ids:
            raise VllmTrainError("Episode.start: empty prompt_ids")
        self._append(PROMPT, list(prompt_ids), 0, [0.0] * len(prompt_ids))
        self.prompt_length = len(prompt_ids)
        return self

    def add_model_turn(self, token_ids: list[int], logprobs: list[float], finish_reason: str | None) -> Segment:
        """The model's generated ids and the engine's log-prob of each; cut to the budget (then the
        episode ends truncated)."""
        self._check_open("add_model_turn")
        if len(token_ids) != len(logprobs):
            raise VllmTrainError(f"Episode.add_model_turn: {len(token_ids)} token ids but {len(logprobs)} log-probs")
        if not token_ids:
            raise VllmTrainError("Episode.add_model_turn: empty turn (no generated token)")
        left = self.tokens_left
        cut = left is not None and len(token_ids) > left
        keep = left if cut else len(token_ids)
        segment = self._append(MODEL, list(token_ids[:keep]), 1, [float(x) for x in logprobs[:keep]])
        segment.finish_reason = finish_reason
        self.counters.model_turns += 1
        self.counters.model_tokens += keep
        if cut:
            self.end("max_episode_tokens", truncated=True)
        return segment

    def add_env_segment(self, token_ids: list[int], kind: str = TOOL) -> bool:
        """Environment tokens (a tool result or user message with the next generation prompt), masked out
        of the loss. False, and the episode ends truncated, when they do not fit the budget whole."""
        self._check_open("add_env_segment")
        if kind not in ENV_KINDS:
            raise VllmTrainError(f"Episode.add_env_segment: kind must be one of {ENV_KINDS}, got {kind!r}")
        left = self.tokens_left
        if left is not None and len(token_ids) > left:
            self.end("max_episode_tokens", truncated=True)
            return False
        self._append(kind, list(token_ids), 0, [0.0] * len(token_ids))
        self.counters.env_tokens += len(token_ids)
        if self.tokens_left == 0:  # no room left for a single model token
            self.end("max_episode_tokens", truncated=True)
        return True

    def end(self, reason: str, truncated: bool = False) -> None:
        """Close the episode (idempotent: the first reason stays)."""
        if self.done:
            return
        self.done, self.truncated, self.end_reason = True, truncated, reason

    # ---- reading --------------------------------------------------------------------------------
    @property
    def tokens_left(self) -> int | None:
        """Budget left after the prompt (None: no budget) -- the next turn's max_tokens at most."""
        if self.max_episode_tokens is None:
            return None
        return self.max_episode_tokens - (len(self.input_ids) - self.prompt_length)

    @property
    def model_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == MODEL]

    @property
    def last_model_turn(self) -> Segment | None:
        turns = self.model_segments
        return turns[-1] if turns else None

    @property
    def completion_ids(self) -> list[int]:
        """Everything after the prompt: model and environment tokens (the trainer's completion row)."""
        return self.input_ids[self.prompt_length:]

    @property
    def completion_mask(self) -> list[int]:
        return self.loss_mask[self.prompt_length:]

    @property
    def completion_logprobs(self) -> list[float]:
        return self.sampled_logprobs[self.prompt_length:]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``input_ids_T`` (long), ``loss_mask_T`` (bool), ``sampled_logprobs_T`` (float32)."""
        return {"input_ids_T": torch.tensor(self.input_ids, dtype=torch.long),
                "loss_mask_T": torch.tensor(self.loss_mask, dtype=torch.bool),
                "sampled_logprobs_T": torch.tensor(self.sampled_logprobs, dtype=torch.float32)}

    def stats(self) -> dict[str, float]:
        """The counters, and whether the episode was truncated, as numbers for metrics."""
        return {**vars(self.counters), "truncated": float(self.truncated)}

    # ---- internals ------------------------------------------------------------------------------
    def _check_open(self, method: str) -> None:
        if not self.segments:
            raise VllmTrainError(f"Episode.{method}: call start(prompt_ids) first")
        if self.done:
            raise VllmTrainError(f"Episode.{method}: the episode has ended ({self.end_reason})")

    def _append(self, kind: str, ids: list[int], mask: int, logprobs: list[float]) -> Segment:
        start = len(self.input_ids)
        self.input_ids += ids
        self.loss_mask += [mask] * len(ids)
        self.sampled_logprobs += logprobs
        turn = self.counters.model_turns - (kind != MODEL)
        segment = Segment(kind, start, len(self.input_ids), turn)
        self.segments.append(segment)
        return segment
