"""PPO building blocks as pure functions on (B, T) tensors of completion tokens.

Shapes: ``B`` sequences, ``T`` completion positions (position 0 = first generated token), ``mask_BT``
True on real (non-padding) completion tokens. Every loss returns ``(loss, metrics)``, and takes the
normaliser (``num_tokens``) explicitly, so micro-batch losses add up to the minibatch loss.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance); padding comes back as 0."""
    mean = masked_mean(x_BT, mask_BT)
    var = masked_mean((x_BT - mean) ** 2, mask_BT)
    out = (x_BT - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask_BT


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each sequence's tokens. Returns (advantages, returns).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V after the last real token = 0),
    ``A_t = delta_t + gamma * lam * A_{t+1}``, returns = A + V. Masked positions come back as 0 and are
    skipped: t+1 is the next *unmasked* token, so environment tokens inside a multi-turn episode are not
    steps of the model's, and padding (after the last real token) leaves V_{t+1} = A_{t+1} = 0.
    """
    mask = mask_BT.to(values_BT.dtype)
    values = values_BT * mask
    advantages_BT = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        on = mask[:, t]
        delta = rewards_BT[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * on
        advantages_BT[:, t] = adv
        next_value = torch.where(on > 0, values[:, t], next_value)
        next_adv = torch.where(on > 0, adv, next_adv)
    return advantages_BT, (advantages_BT + values) * mask


def kl_per_token(logps_BT: torch.Tensor, ref_logps_BT: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = exp(q - p) - (q - p) - 1 (unbiased, >= 0).
    """
    diff = logps_BT - ref_logps_BT
    if estimator == "k1":
        return diff
    return torch.exp(-diff) + diff - 1.0


def kl_shaped_rewards(scores_B: torch.Tensor, kl_BT: torch.Tensor, mask_BT: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards: ``-kl_coef * KL_t`` on every token, plus the sequence score on its last
    (the last unmasked one: environment tokens may sit between the model's)."""
    mask = mask_BT.to(kl_BT.dtype)
    rewards_BT = -kl_coef * kl_BT * mask
    last = (torch.arange(mask.size(1), dtype=mask.dtype) * (mask > 0)).argmax(1)
    rewards_BT[torch.arange(len(scores_B)), last] += scores_B.to(rewards_BT.dtype)
    return rewards_BT


def clipped_policy_loss(logps_BT: torch.Tensor, old_logps_BT: torch.Tensor, advantages_BT: torch.Tensor,
                        weights_BT: torch.Tensor, clip_low: float, clip_high: float,
                        is_weights_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, summed with per-token ``weights_BT`` (which carry mask and normaliser).

    ``loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t)``, ratio = exp(logp - old);
    ``is_weights_BT`` (truncated importance weights pi_old/pi_sampler) multiply each token's loss.
    """
    ratio = torch.exp(logps_BT - old_logps_BT)
    unclipped = ratio * advantages_BT
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages_BT
    token_loss = -torch.minimum(unclipped, clipped)
    if is_weights_BT is not None:
        token_loss = token_loss * is_weights_BT
    loss = (token_loss * weights_BT).sum()
    with torch.no_grad():
        on = weights_BT != 0
        metrics = {"clipfrac": masked_mean((clipped < unclipped).float(), on).item(),
                   "ratio_mean": masked_mean(ratio, on).item()}
    return loss, metrics


def clipped_value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                       mask_BT: torch.Tensor, clip: float, num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """``0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)``, summed over tokens / ``num_tokens``."""
    mask = mask_BT.to(values_BT.dtype)
    clipped_values = old_values_BT + torch.clamp(values_BT - old_values_BT, -clip, clip)
    per_token = 0.5 * torch.maximum((values_BT - returns_BT) ** 2, (clipped_values - returns_BT) ** 2)
    denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        vclip = ((values_BT - returns_BT) ** 2 < (clipped_values - returns_BT) ** 2).float()
        metrics = {"value_loss": loss.item(), "value_clipfrac": masked_mean(vclip, mask).item()}
    return loss, metrics


def ppo_loss(logps_BT: torch.Tensor, old_logps_BT: torch.Tensor, advantages_BT: torch.Tensor,
             values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
             mask_BT: torch.Tensor, *, clip: float, value_clip: float, value_coef: float,
             num_tokens: int | None = None, is_weights_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO: token-mean clipped policy loss + ``value_coef`` * clipped value loss.

    Advantages come from `gae` on KL-shaped rewards (`kl_shaped_rewards`), whitened over the batch.
    """
    n = num_tokens if num_tokens is not None else int(mask_BT.sum().clamp(min=1))
    weights = mask_BT.to(logps_BT.dtype) / n
    pg_loss, pg_metrics = clipped_policy_loss(logps_BT, old_logps_BT, advantages_BT, weights, clip, clip,
                                              is_weights_BT)
    v_loss, v_metrics = clipped_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, value_clip, n)
    loss = pg_loss + value_coef * v_loss
    return loss, {"policy_loss": pg_loss.item(), **pg_metrics, **v_metrics}


def truncated_importance_weights(old_logps_BT: torch.Tensor, sampler_logps_BT: torch.Tensor, mask_BT: torch.Tensor,
                                 cap: float | None) -> torch.Tensor | None:
    """Truncated importance sampling: min(pi_trainer / pi_sampler, cap) per token (samples came from vLLM,
    maybe from weights one update older). None when not weighted."""
    if cap is None:
        return None
    return (torch.exp(old_logps_BT.double() - sampler_logps_BT).clamp(max=cap) * mask_BT).to(old_logps_BT.dtype)
