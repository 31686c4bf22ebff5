"""A rollout's rewards, from whichever source the run has: rewards recorded with the episodes
(`RLHFTrainer.train_on_episodes`), a reward model, a reward function (given the episodes' environments and
conversations in multi-turn runs), or the environment's own ``get_reward``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from vllm_train.errors import VllmTrainError
from vllm_train.rewards.loading import EpisodeContext, RewardFn, reward_name, score_with_function
from vllm_train.rewards.model import RewardModelScorer
from vllm_train.trainers.rl_rollouts import Rollout


def rollout_rewards(rollout: Rollout, reward_fn: RewardFn | None,
                    reward_model: RewardModelScorer | None) -> torch.Tensor:
    """One float per sample: those that came with the rollout, the reward model's or function's, else the
    environment's get_reward."""
    if rollout.given_rewards is not None:
        return torch.tensor(rollout.given_rewards, dtype=torch.float32)
    if reward_fn is None and reward_model is None:
        if rollout.environment_rewards is None:
            raise VllmTrainError("no reward: give a reward function or model, or an environment with get_reward")
        return torch.tensor(rollout.environment_rewards, dtype=torch.float32)
    episodes = None if rollout.environments is None else EpisodeContext(rollout.environments, rollout.messages)
    return score(reward_fn, reward_model, rollout.prompts, rollout.completions, rollout.examples,
                 rollout.completion_ids, episodes)


def score(reward_fn: RewardFn | None, reward_model: RewardModelScorer | None, prompts: Sequence[Any],
          responses: Sequence[str], examples: Sequence[dict] | None = None,
          completion_ids: Sequence[Sequence[int]] | None = None,
          episodes: EpisodeContext | None = None) -> torch.Tensor:
    """One float per (prompt, response): the reward model's scores, or the reward function's values."""
    examples = examples if examples is not None else [{"prompt": p} for p in prompts]
    if reward_model is not None:
        values = reward_model(prompts, responses, examples)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise VllmTrainError(f"reward model {reward_model.name} scored {values[bad]} for prompt "
                                 f"{str(prompts[bad])[:80]!r}: scores must be finite")
    else:
        values = score_with_function(reward_fn, prompts, responses, examples, completion_ids, episodes)
    return torch.tensor(values, dtype=torch.float32)


def reward_label(reward_fn: RewardFn | None, reward_model: RewardModelScorer | None,
                 environment_name: str | None) -> str:
    """What the run is rewarded by, for its config, model card and resume check."""
    if reward_fn is None and reward_model is None:
        return f"environment {environment_name}.get_reward"
    return f"reward model {reward_model.name}" if reward_model else reward_name(reward_fn)
