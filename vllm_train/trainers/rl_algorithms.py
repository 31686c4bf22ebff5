"""The RL algorithms as (advantages, loss) pairs over the pure functions in `vllm_train.losses`.

`make_algorithm(config)` picks one at setup; the loop then calls ``advantages`` once per rollout and
``loss`` once per micro-batch, whatever the algorithm. The group-relative family (GRPO, Dr.GRPO, DAPO,
RLOO) differs only in its advantage function and loss aggregation; PPO adds GAE over KL-shaped
per-token rewards and a clipped value loss. PPO's sequence scores are whitened over the batch first
(``whiten_rewards``): a reward model's scale and per-prompt offset are arbitrary, and raw scores with a
spread of 10-20 made the KL penalty and the value loss irrelevant on the toy world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from vllm_train import distributed
from vllm_train.config import RLHFConfig
from vllm_train.losses import grpo, ppo


@dataclass
class UpdateTargets:
    """Per-sample tensors the loss compares the new forward with (rows = the batch's samples)."""
    advantages: torch.Tensor  # (S,) per sequence, or (S, T) per token (PPO)
    old_logps_BT: torch.Tensor
    ref_logps_BT: torch.Tensor | None
    old_values_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None


class GroupRelative:
    """GRPO / Dr.GRPO / DAPO / RLOO: advantages from each prompt's group of N rewards, no critic."""
    uses_values = False

    def __init__(self, config: RLHFConfig, advantage_fn, loss_fn):
        self.config, self.advantage_fn, self.loss_fn = config, advantage_fn, loss_fn

    def advantages(self, rewards_GN, keep_G, mask_BT, old_logps_BT, ref_logps_BT, old_values_BT) -> UpdateTargets:
        return UpdateTargets(self.advantage_fn(rewards_GN[keep_G]).flatten(), old_logps_BT, ref_logps_BT)

    def loss(self, logps_BT, values_BT, t: UpdateTargets, rows, mask_BT, size, is_weights_BT):
        c = self.config
        return self.loss_fn(logps_BT, t.old_logps_BT[rows], t.advantages[rows], mask_BT, clip_low=c.clip_range,
                            clip_high=c.clip_high, size=size, kl_coef=c.kl_coef, is_weights_BT=is_weights_BT,
                            ref_logps_BT=None if t.ref_logps_BT is None else t.ref_logps_BT[rows])


class PPO:
    """PPO with a value head: KL-shaped token rewards, GAE, whitened advantages, clipped value loss."""
    uses_values = True

    def __init__(self, config: RLHFConfig):
        self.config = config

    def advantages(self, rewards_GN, keep_G, mask_BT, old_logps_BT, ref_logps_BT, old_values_BT) -> UpdateTargets:
        c = self.config
        kl_BT = ppo.kl_per_token(old_logps_BT, ref_logps_BT, "k1") if ref_logps_BT is not None \
            else torch.zeros_like(old_logps_BT)
        scores_S = rewards_GN[keep_G].flatten()
        if c.whiten_rewards and distributed.all_reduce_sum({"n": len(scores_S)})["n"] > 1:
            scores_S = whiten_over_ranks(scores_S, torch.ones_like(scores_S))
        token_rewards_BT = ppo.kl_shaped_rewards(scores_S, kl_BT, mask_BT, c.kl_coef)
        advantages_BT, returns_BT = ppo.gae(token_rewards_BT, old_values_BT, mask_BT, c.gamma, c.gae_lambda)
        if c.whiten_advantages:
            advantages_BT = whiten_over_ranks(advantages_BT, mask_BT)
        return UpdateTargets(advantages_BT, old_logps_BT, ref_logps_BT, old_values_BT, returns_BT)

    def loss(self, logps_BT, values_BT, t: UpdateTargets, rows, mask_BT, size, is_weights_BT):
        c = self.config
        return ppo.ppo_loss(logps_BT, t.old_logps_BT[rows], t.advantages[rows], values_BT, t.old_values_BT[rows],
                            t.returns_BT[rows], mask_BT, clip=c.clip_range, value_clip=c.value_clip_range,
                            value_coef=c.value_loss_coef, num_tokens=size.tokens, is_weights_BT=is_weights_BT)


def whiten_over_ranks(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`ppo.masked_whiten` with the mean and variance of the whole step's batch: in a data-parallel run
    the moments are summed over the ranks' shares (two passes, as the one-process function does)."""
    if distributed.world_size() == 1:
        return ppo.masked_whiten(x_BT, mask_BT, eps=eps)
    m_BT = mask_BT.to(x_BT.dtype)
    first = distributed.all_reduce_sum({"n": m_BT.sum().item(), "sum": (x_BT * m_BT).sum().item()})
    n = max(first["n"], 1.0)
    mean = first["sum"] / n
    var = distributed.all_reduce_sum({"sq": (((x_BT - mean) ** 2) * m_BT).sum().item()})["sq"] / n
    return (x_BT - mean) * (var + eps) ** -0.5 * m_BT


def global_batch_size(mask_BT: torch.Tensor, max_new_tokens: int) -> grpo.BatchSize:
    """The minibatch's sequence and token counts over all ranks: the loss's normaliser."""
    counts = distributed.all_reduce_sum({"sequences": mask_BT.size(0), "tokens": int(mask_BT.sum())})
    return grpo.BatchSize(int(counts["sequences"]), int(counts["tokens"]), max_new_tokens)


def make_algorithm(config: RLHFConfig) -> GroupRelative | PPO:
    if config.algorithm == "ppo":
        return PPO(config)
    advantage_fn, loss_fn = {
        "grpo": (grpo.group_advantages, grpo.grpo_loss),
        "dr_grpo": (partial(grpo.group_advantages, scale_by_std=False), grpo.dr_grpo_loss),
        "dapo": (grpo.group_advantages, grpo.token_mean_loss),
        "rloo": (grpo.rloo_advantages, grpo.token_mean_loss),
    }[config.algorithm]
    return GroupRelative(config, advantage_fn, loss_fn)
