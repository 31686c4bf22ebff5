"""Critic-free policy gradients on groups of completions: GRPO, Dr.GRPO, DAPO, RLOO.

Advantages: ``rewards_GN`` holds N completions' rewards for each of G prompts. Losses share PPO's
clipped surrogate (`vllm_train.losses.ppo.clipped_policy_loss`) and differ only in how token losses are
averaged, which each loss states in one line. All losses take the *minibatch's* size (`BatchSize`) so a
sum of micro-batch losses equals the minibatch loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_train.losses.ppo import clipped_policy_loss, kl_per_token


# ---- advantages ----------------------------------------------------------------------------------
def group_advantages(rewards_GN: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)``; Dr.GRPO: ``scale_by_std=False`` (no std division,
    which otherwise up-weights nearly-solved and nearly-failed prompts). std is the sample std (N-1)."""
    centred = rewards_GN - rewards_GN.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards_GN.std(dim=1, keepdim=True) + eps)


def rloo_advantages(rewards_GN: torch.Tensor) -> torch.Tensor:
    """RLOO: each completion's baseline is the mean reward of the *other* N-1 completions of its prompt,
    ``A_i = r_i - (sum_j r_j - r_i) / (N - 1)`` = ``N / (N - 1) * (r_i - mean)``."""
    n = rewards_GN.size(1)
    return (rewards_GN - (rewards_GN.sum(dim=1, keepdim=True) - rewards_GN) / (n - 1))


def informative_groups(rewards_GN: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: True for groups whose rewards are not all equal (all-equal groups
    have zero advantage everywhere and only dilute the batch)."""
    return (rewards_GN.max(dim=1).values - rewards_GN.min(dim=1).values) > tol


# ---- losses --------------------------------------------------------------------------------------
class BatchSize(NamedTuple):
    """Size of the minibatch an optimizer step averages over (not of one micro-batch)."""
    sequences: int
    tokens: int
    max_new_tokens: int

    @staticmethod
    def of(mask_BT: torch.Tensor, max_new_tokens: int | None = None) -> BatchSize:
        return BatchSize(mask_BT.size(0), int(mask_BT.sum()), max_new_tokens or mask_BT.size(1))


def _surrogate(logps_BT, old_logps_BT, advantages_B, weights_BT, clip_low, clip_high, ref_logps_BT, kl_coef,
               is_weights_BT):
    """Clipped surrogate with per-sequence advantages + optional k3 KL to the reference, same weights."""
    advantages_BT = advantages_B[:, None].expand_as(logps_BT)
    loss, metrics = clipped_policy_loss(logps_BT, old_logps_BT, advantages_BT, weights_BT, clip_low, clip_high,
                                        is_weights_BT)
    if ref_logps_BT is not None and kl_coef > 0:
        kl = (kl_per_token(logps_BT, ref_logps_BT, "k3") * weights_BT).sum()
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = kl.item()
    return loss, metrics


def grpo_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, *, clip_low=0.2, clip_high=0.2,
              size: BatchSize | None = None, ref_logps_BT=None, kl_coef=0.0, is_weights_BT=None):
    """GRPO: mean over each sequence's tokens, then mean over sequences (long answers count less per token)."""
    size = size or BatchSize.of(mask_BT)
    mask = mask_BT.to(logps_BT.dtype)
    weights_BT = mask / mask.sum(1, keepdim=True).clamp(min=1) / size.sequences
    return _surrogate(logps_BT, old_logps_BT, advantages_B, weights_BT, clip_low, clip_high, ref_logps_BT,
                      kl_coef, is_weights_BT)


def dr_grpo_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, *, clip_low=0.2, clip_high=0.2,
                 size: BatchSize | None = None, ref_logps_BT=None, kl_coef=0.0, is_weights_BT=None):
    """Dr.GRPO: token sum over a constant (sequences x max_new_tokens) -- no per-length normalisation."""
    size = size or BatchSize.of(mask_BT)
    weights_BT = mask_BT.to(logps_BT.dtype) / (size.sequences * size.max_new_tokens)
    return _surrogate(logps_BT, old_logps_BT, advantages_B, weights_BT, clip_low, clip_high, ref_logps_BT,
                      kl_coef, is_weights_BT)


def token_mean_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, *, clip_low=0.2, clip_high=0.28,
                    size: BatchSize | None = None, ref_logps_BT=None, kl_coef=0.0, is_weights_BT=None):
    """DAPO-style token-level loss: every token of the batch weighs the same (sum / total tokens).
    Used by DAPO (with asymmetric clip_high > clip_low) and RLOO."""
    size = size or BatchSize.of(mask_BT)
    weights_BT = mask_BT.to(logps_BT.dtype) / max(1, size.tokens)
    return _surrogate(logps_BT, old_logps_BT, advantages_B, weights_BT, clip_low, clip_high, ref_logps_BT,
                      kl_coef, is_weights_BT)
