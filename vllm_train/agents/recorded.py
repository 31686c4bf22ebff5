"""Episodes recorded outside the trainer: an agent (any framework) talks to a `vllm-train serve` replica
through the `openai` client, and the trainer learns from what the server sampled.

The server returns token ids when asked (``extra_body={"return_token_ids": True, "logprobs": True}``, a
vLLM feature): the prompt's ids (``response.prompt_token_ids``) and each choice's sampled ids and
log-probs. `EpisodeRecorder` stitches one conversation's turns into one token array, as the in-process
episodes are built (`agents.episode`): turn k+1's prompt must *extend* turn k's prompt + sampled ids --
the new ids in between (tool results, user messages, the chat template's turn markers) are the
environment's, masked out of the loss. When a server re-renders an earlier turn differently from how it
was sampled (a chat template that edits assistant text, decode→encode drift), the prompt no longer
extends and the recorder refuses the turn instead of training on tokens the model never produced; send
the episode's own ids as the prompt (``/v1/completions`` with a token-id prompt) to avoid re-rendering.

`RecordedEpisode` is what `RLHFTrainer.train_on_episodes` takes, in groups of ``group_size`` episodes of
one prompt (their rewards are compared within the group, as GRPO does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vllm_train.errors import VllmTrainError


@dataclass
class RecordedEpisode:
    """One episode as token arrays (one entry per completion token) and its reward."""
    prompt_ids: list[int]
    completion_ids: list[int]  # everything after the prompt: the model's turns and the environment's segments
    completion_mask: list[int]  # 1 on the model's sampled tokens, 0 on the environment's
    logprobs: list[float]  # the sampler's log-prob of each model token (0.0 on environment tokens)
    reward: float
    turns: int = 1

    def check(self, where: str) -> None:
        """One line naming `where` and the field when the arrays do not fit together."""
        n = len(self.completion_ids)
        if not self.prompt_ids or not n:
            raise VllmTrainError(f"{where}: {'prompt_ids' if not self.prompt_ids else 'completion_ids'} is empty")
        for name in ("completion_mask", "logprobs"):
            if len(getattr(self, name)) != n:
                raise VllmTrainError(f"{where}: {name} has {len(getattr(self, name))} entries for {n} completion "
                                     f"tokens (one per token)")
        if any(m not in (0, 1) for m in self.completion_mask) or not any(self.completion_mask):
            raise VllmTrainError(f"{where}: completion_mask must be 0/1 with at least one model token (1)")
        if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
            raise VllmTrainError(f"{where}: reward must be a finite number, got {self.reward!r}")
        if any(not math.isfinite(x) or x > 0 for x in self.logprobs):
            raise VllmTrainError(f"{where}: logprobs must be finite log-probabilities (<= 0)")


@dataclass
class EpisodeRecorder:
    """One conversation's turns, as the server sampled them, stitched into a `RecordedEpisode`."""
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0

    def add_turn(self, prompt_token_ids: list[int], token_ids: list[int], logprobs: list[float]) -> None:
        """A model turn: the ids the server was prompted with, then its sampled ids and their log-probs."""
        if len(token_ids) != len(logprobs):
            raise VllmTrainError(f"turn {self.turns + 1}: {len(token_ids)} token ids but {len(logprobs)} log-probs")
        if self.turns == 0:
            self.prompt_ids = list(prompt_token_ids)
        else:
            sofar = self.prompt_ids + self.completion_ids
            if list(prompt_token_ids[:len(sofar)]) != sofar:
                at = next((i for i, (a, b) in enumerate(zip(prompt_token_ids, sofar)) if a != b),
                          len(prompt_token_ids))  # or the prompt is shorter than the episode so far
                raise VllmTrainError(f"turn {self.turns + 1}: its prompt does not extend the episode so far (ids "
                                     f"differ at position {at}): the server re-rendered an earlier turn; send the "
                                     f"episode's token ids as the prompt")
            environment = list(prompt_token_ids[len(sofar):])
            self._append(environment, 0, [0.0] * len(environment))
        self._append(list(token_ids), 1, [float(x) for x in logprobs])
        self.turns += 1

    def add_response(self, response: Any, choice: int = 0) -> str:
        """A turn from an `openai` chat or text completion asked with ``return_token_ids`` and ``logprobs``;
        returns the choice's text (the agent's next message)."""
        prompt_ids = getattr(response, "prompt_token_ids", None)
        picked = response.choices[choice]
        token_ids = getattr(picked, "token_ids", None)
        if prompt_ids is None or token_ids is None:
            raise VllmTrainError("the response has no prompt_token_ids/token_ids: ask with "
                                 "extra_body={'return_token_ids': True} (and logprobs)")
        self.add_turn(prompt_ids, token_ids, _choice_logprobs(picked, len(token_ids)))
        return picked.message.content if hasattr(picked, "message") else picked.text

    def episode(self, reward: float) -> RecordedEpisode:
        if not self.turns:
            raise VllmTrainError("EpisodeRecorder.episode: no turn recorded")
        return RecordedEpisode(self.prompt_ids, self.completion_ids, self.completion_mask, self.logprobs,
                               reward, self.turns)

    def _append(self, ids: list[int], mask: int, logprobs: list[float]) -> None:
        self.completion_ids += ids
        self.completion_mask += [mask] * len(ids)
        self.logprobs += logprobs


def _choice_logprobs(choice: Any, n: int) -> list[float]:
    """The sampled tokens' log-probs of a chat choice (``logprobs.content[i].logprob``) or a text choice
    (``logprobs.token_logprobs``)."""
    logprobs = getattr(choice, "logprobs", None)
    if logprobs is None:
        raise VllmTrainError("the response has no logprobs: ask with logprobs=True (chat) or logprobs=0 (text)")
    values = [entry.logprob for entry in logprobs.content] if getattr(logprobs, "content", None) is not None \
        else list(logprobs.token_logprobs)
    if len(values) != n:
        raise VllmTrainError(f"the response has {len(values)} log-probs for {n} sampled tokens")
    return values
