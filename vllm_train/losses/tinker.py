"""The Tinker API's built-in losses, as its documentation defines them (tinker-docs `losses`, `losses/cispo`,
`losses/dro`), on one datum's tokens.

Conventions of that API: targets are pre-shifted (position i of the input predicts ``target_tokens[i]``), so
every tensor here is per input position, shape (N,); ``logps_N`` are the trained model's log-probs of the
targets (with autograd), ``sampling_logps_N`` the sampler's (``loss_fn_inputs["logprobs"]``). Losses are
**sums** over tokens, never means: a client that wants a mean scales its weights or advantages. Ratio clips
are absolute thresholds on ``p / q`` (ppo 0.8 / 1.2, cispo 0.0 / 4.0), not offsets ``1 +- eps``.

Each function returns ``(loss, metrics)``: a 0-d tensor to differentiate, and floats to report.
"""

from __future__ import annotations

import torch

PPO_CLIP = (0.8, 1.2)
CISPO_CLIP = (0.0, 4.0)


def cross_entropy(logps_N: torch.Tensor, weights_N: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted negative log-likelihood ``sum(-logp * w)``. Arbitrary float weights are allowed:
    `forward_backward_custom` sends ``w = -dC/dlogp`` of a client-side loss C, so that this loss's gradient
    is C's."""
    loss = -(logps_N * weights_N).sum()
    return loss, {}


def importance_sampling(logps_N, sampling_logps_N, advantages_N) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE corrected for the sampler: ``-sum(p/q * A)``, ratio ``p/q = exp(logp - logq)``."""
    ratio_N = torch.exp(logps_N - sampling_logps_N)
    loss = -(ratio_N * advantages_N).sum()
    return loss, {}


def ppo(logps_N, sampling_logps_N, advantages_N, clip_low: float = PPO_CLIP[0],
        clip_high: float = PPO_CLIP[1]) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate: ``-sum(min(r A, clamp(r, low, high) A))`` with ``r = p/q``."""
    ratio_N = torch.exp(logps_N - sampling_logps_N)
    unclipped_N = ratio_N * advantages_N
    clipped_N = ratio_N.clamp(clip_low, clip_high) * advantages_N
    loss = -torch.minimum(unclipped_N, clipped_N).sum()
    clipped_frac = (clipped_N < unclipped_N).float().mean().item() if logps_N.numel() else 0.0
    return loss, {"clipped_fraction": clipped_frac}  # reported as "clipped_fraction:mean"


def cispo(logps_N, sampling_logps_N, advantages_N, clip_low: float = CISPO_CLIP[0],
          clip_high: float = CISPO_CLIP[1]) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO: the clipped ratio is a constant weight on the policy gradient, so every token keeps a gradient
    (unlike PPO, where clipped tokens lose theirs): ``-sum(sg(clamp(r, low, high)) * logp * A)``."""
    weight_N = torch.exp(logps_N - sampling_logps_N).clamp(clip_low, clip_high).detach()
    loss = -(weight_N * logps_N * advantages_N).sum()
    return loss, {}


def dro(logps_N, sampling_logps_N, advantages_N, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DRO: ``-sum(logp * A - beta / 2 * (logp - logq)^2)``: a policy gradient with a quadratic penalty
    that keeps the policy near the sampler."""
    penalty_N = (logps_N - sampling_logps_N) ** 2
    loss = -(logps_N * advantages_N - 0.5 * beta * penalty_N).sum()
    return loss, {}


# loss name -> (the loss_fn_inputs it reads besides target_tokens, its loss_fn_config keys with defaults;
# None: required)
LOSS_INPUTS: dict[str, tuple[tuple[str, ...], dict[str, float | None]]] = {
    "cross_entropy": (("weights",), {}),
    "importance_sampling": (("logprobs", "advantages"), {}),
    "ppo": (("logprobs", "advantages"), {"clip_low_threshold": PPO_CLIP[0], "clip_high_threshold": PPO_CLIP[1]}),
    "cispo": (("logprobs", "advantages"),
              {"clip_low_threshold": CISPO_CLIP[0], "clip_high_threshold": CISPO_CLIP[1]}),
    "dro": (("logprobs", "advantages"), {"beta": None}),
}


def datum_loss(loss_fn: str, logps_N: torch.Tensor, inputs: dict[str, torch.Tensor],
               config: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss `loss_fn` of one datum: `inputs` holds its loss_fn_inputs as tensors (N,), `config` every
    key of ``LOSS_INPUTS[loss_fn]`` resolved (defaults filled in; validated by the caller)."""
    if loss_fn == "cross_entropy":
        return cross_entropy(logps_N, inputs["weights"])
    q_N, a_N = inputs["logprobs"], inputs["advantages"]
    if loss_fn == "importance_sampling":
        return importance_sampling(logps_N, q_N, a_N)
    if loss_fn == "ppo":
        return ppo(logps_N, q_N, a_N, config["clip_low_threshold"], config["clip_high_threshold"])
    if loss_fn == "cispo":
        return cispo(logps_N, q_N, a_N, config["clip_low_threshold"], config["clip_high_threshold"])
    if loss_fn == "dro":
        return dro(logps_N, q_N, a_N, config["beta"])
    raise ValueError(f"unknown loss {loss_fn!r}")
