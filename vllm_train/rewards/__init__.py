"""Rewards for RL: plain callables ``(prompt, completion, example) -> float`` (loaded from
``module:function``; the toy world's checkable answer is ``vllm_train.toy:correctness_reward``) and
reward models (scored in-process, see `vllm_train.rewards.model`)."""

from vllm_train.rewards.loading import TOY_REWARD, RewardFn, load_reward_function, reward_name, score_with_function

__all__ = ["TOY_REWARD", "RewardFn", "load_reward_function", "reward_name", "score_with_function"]
