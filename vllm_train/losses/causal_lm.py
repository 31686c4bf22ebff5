"""Causal LM loss and per-token log-probs: the building blocks every trainer shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def shifted_token_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token. Returns (logps_BT1, mask_BT1) for positions 1..T-1.

    ``logps[b, t]`` = log p(labels[b, t+1] | tokens <= t); ``mask`` is False where the label is -100
    (prompt or padding), and those log-probs are 0. Computed with cross_entropy, so no (B, T, V)
    log-softmax tensor is kept around.
    """
    logits = logits_BTV[:, :-1, :].float()
    targets = labels_BT[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return -nll * mask, mask


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the non-masked tokens of the batch.

    Metrics: ``loss``, ``num_tokens`` and ``token_accuracy`` (argmax == label on those tokens).
    """
    logps, mask = shifted_token_logprobs(logits_BTV, labels_BT)
    num_tokens = mask.sum()
    loss = -logps.sum() / num_tokens.clamp(min=1)
    with torch.no_grad():
        hits = (logits_BTV[:, :-1, :].argmax(-1) == labels_BT[:, 1:]) & mask
        metrics = {"loss": loss.item(), "num_tokens": int(num_tokens),
                   "token_accuracy": (hits.sum() / num_tokens.clamp(min=1)).item()}
    return loss, metrics


class CausalLMLoss(nn.Module):
    """Standard causal language modeling loss: mean over tokens whose label is not -100.

    ``attention_mask`` (optional) additionally masks out padding positions even if their label was
    left as a token id, so padding is never trained on.
    """

    def forward(self, logits, labels, attention_mask=None):
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        loss, _ = causal_lm_loss(logits, labels)
        return loss
