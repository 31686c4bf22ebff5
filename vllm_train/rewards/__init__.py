"""Rewards for RL: plain callables, ours ``(prompt, completion, example) -> float`` or TRL's
``(completions, **kwargs) -> list[float]`` (loaded from ``module:function``; the toy world's checkable answer
is ``vllm_train.toy:correctness_reward``), and reward models (scored in-process, see
`vllm_train.rewards.model`)."""

from vllm_train.rewards.loading import (
    TOY_REWARD,
    RewardFn,
    load_reward_function,
    record_check,
    reward_name,
    reward_style,
    score_with_function,
)

__all__ = ["TOY_REWARD", "RewardFn", "load_reward_function", "record_check", "reward_name", "reward_style",
           "score_with_function"]
