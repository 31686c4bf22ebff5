"""Preference losses: DPO (sigmoid, with optional label smoothing = conservative DPO), IPO, hinge, and
the Bradley-Terry loss of a reward model (and its base-preference distillation term), and RPO's NLL term.
The preference losses are pure functions of per-pair tensors returning ``(loss, metrics)``.

Inputs are sequence log-probs, shape (B,): the sum over completion tokens of log p(token | prefix), for
the policy and the reference, on the chosen and the rejected completion. With
``h = (logp_c - ref_c) - (logp_r - ref_r)``:

    sigmoid (DPO)   -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    ipo             (h - 1 / (2 * beta)) ** 2
    hinge           relu(1 - beta * h)

Metrics (floats): ``loss``, ``rewards/chosen`` and ``rewards/rejected`` (mean implicit rewards
beta * (logp - ref)), ``rewards/margin`` (their mean difference), ``rewards/accuracy`` (share of pairs
whose chosen reward is strictly higher), ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_train.config import DPO_LOSS_TYPES


def _implicit_rewards(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta):
    chosen_rewards_B = beta * (policy_chosen_B - ref_chosen_B)
    rejected_rewards_B = beta * (policy_rejected_B - ref_rejected_B)
    return chosen_rewards_B, rejected_rewards_B


def _metrics(loss, chosen_rewards_B, rejected_rewards_B, policy_chosen_B, policy_rejected_B) -> dict:
    with torch.no_grad():
        return {
            "loss": loss.item(),
            "rewards/chosen": chosen_rewards_B.mean().item(),
            "rewards/rejected": rejected_rewards_B.mean().item(),
            "rewards/margin": (chosen_rewards_B - rejected_rewards_B).mean().item(),
            "rewards/accuracy": (chosen_rewards_B > rejected_rewards_B).float().mean().item(),
            "logps/chosen": policy_chosen_B.mean().item(),
            "logps/rejected": policy_rejected_B.mean().item(),
        }


def dpo_sigmoid_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
                     beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023). `label_smoothing` eps > 0 assumes a share eps of the labels are
    flipped (conservative DPO): the loss then stops pushing once the margin is large enough."""
    chosen_B, rejected_B = _implicit_rewards(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta)
    margin_B = chosen_B - rejected_B  # = beta * h
    loss_B = -(1 - label_smoothing) * F.logsigmoid(margin_B) - label_smoothing * F.logsigmoid(-margin_B)
    loss = loss_B.mean()
    return loss, _metrics(loss, chosen_B, rejected_B, policy_chosen_B, policy_rejected_B)


def ipo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
             beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023): regress the log-ratio gap h onto 1 / (2 * beta) (beta plays tau)."""
    h_B = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
    loss = ((h_B - 1.0 / (2.0 * beta)) ** 2).mean()
    chosen_B, rejected_B = _implicit_rewards(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta)
    return loss, _metrics(loss, chosen_B, rejected_B, policy_chosen_B, policy_rejected_B)


def hinge_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
               beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Hinge (SLiC-style) on the implicit reward margin: zero once beta * h >= 1."""
    chosen_B, rejected_B = _implicit_rewards(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta)
    loss = F.relu(1.0 - (chosen_B - rejected_B)).mean()
    return loss, _metrics(loss, chosen_B, rejected_B, policy_chosen_B, policy_rejected_B)


def preference_loss(loss_type: str, policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B,
                    beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The loss named by `loss_type` (sigmoid | ipo | hinge). Label smoothing applies to sigmoid only."""
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta)
    if loss_type == "hinge":
        return hinge_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta)
    raise ValueError(f"unknown preference loss {loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")


def bradley_terry_loss(chosen_scores_B: torch.Tensor, rejected_scores_B: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Reward-model loss: -logsigmoid(r_chosen - r_rejected), averaged over pairs.

    Metrics: ``loss``, ``accuracy`` (chosen scored strictly higher), ``margin``, ``chosen_score``,
    ``rejected_score`` (means)."""
    margin_B = chosen_scores_B - rejected_scores_B
    loss = -F.logsigmoid(margin_B).mean()
    with torch.no_grad():
        metrics = {"loss": loss.item(), "accuracy": (margin_B > 0).float().mean().item(),
                   "margin": margin_B.mean().item(), "chosen_score": chosen_scores_B.mean().item(),
                   "rejected_score": rejected_scores_B.mean().item()}
    return loss, metrics


def rpo_chosen_nll(policy_chosen_B: torch.Tensor, chosen_tokens_B: torch.Tensor) -> torch.Tensor:
    """RPO's extra term: the chosen completions' NLL per token, averaged over pairs. Added to a preference
    loss (times ``rpo_alpha``) it keeps the chosen answers' likelihood from falling while the margin grows."""
    return (-policy_chosen_B / chosen_tokens_B).mean()


def preference_metrics(policy_chosen_N, policy_rejected_N, ref_chosen_N, ref_rejected_N, beta: float) -> dict:
    """Held-out preference metrics: implicit-reward accuracy/margin vs the reference (DPO's own
    measure) and ``logp_accuracy``, how often the policy itself gives `chosen` the higher log-prob."""
    _, m = preference_loss("sigmoid", policy_chosen_N, policy_rejected_N, ref_chosen_N, ref_rejected_N, beta)
    return {"reward_accuracy": m["rewards/accuracy"], "reward_margin": m["rewards/margin"],
            "logp_accuracy": (policy_chosen_N > policy_rejected_N).float().mean().item(),
            "dpo_loss": m["loss"], "num_pairs": len(policy_chosen_N)}


def base_preference_loss(aux_chosen_B: torch.Tensor, aux_rejected_B: torch.Tensor,
                         base_margin_B: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross-entropy of a second head's margin against the base LM's soft preference
    sigmoid(log p_base(chosen) - log p_base(rejected)).

    Why: on the toy world the base LM already ranks the +-1 and +10 mistakes (>= 0.95 of pairs by log-prob)
    but the reward head, read at the last token, learns "the larger answer wins" first and stalls near 0.8.
    Asking the same last-token state to also predict the base LM's preference makes the body carry that
    knowledge to the token the reward is read from. The second head is used in training only."""
    target = torch.sigmoid(base_margin_B)
    margin = aux_chosen_B - aux_rejected_B
    return -(target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin)).mean()


def sequence_logps(token_logps_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over the unmasked (completion) positions of each row: (B, T) -> (B,)."""
    return (token_logps_BT * mask_BT).sum(-1)


class DPOLoss(nn.Module):
    """Direct Preference Optimization loss (the seed's signature; returns the scalar loss).

    ``loss_type`` picks sigmoid (DPO, default), ipo or hinge; ``label_smoothing`` gives conservative
    DPO. The metrics of the last call are kept in ``self.last_metrics``.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown preference loss {loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.last_metrics: dict = {}

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> torch.Tensor:
        loss, self.last_metrics = preference_loss(self.loss_type, policy_chosen_logps, policy_rejected_logps,
                                                  ref_chosen_logps, ref_rejected_logps, self.beta,
                                                  self.label_smoothing)
        return loss
