"""Causal LM loss and per-token log-probs: the building blocks every trainer shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_train.data.causal_lm import IGNORE_INDEX


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


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward and backward of `token_logprobs`, a chunk of rows at a time (see there). Each chunk costs
    few passes over its (C, V) logits: they are the largest tensors of an RL update on a big vocabulary."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, tokens_N, temperature, chunk_rows):
        weight_VH = weight_VH.to(hidden_NH.dtype)
        softmax_dtype = torch.promote_types(hidden_NH.dtype, torch.float32)  # float64 stays float64 (gradcheck)
        logps_N = torch.empty(len(tokens_N), dtype=softmax_dtype, device=hidden_NH.device)
        for start in range(0, len(tokens_N), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits_CV = (hidden_NH[rows] @ weight_VH.T).to(softmax_dtype)
            if temperature != 1.0:
                logits_CV.div_(temperature)
            logps_N[rows] = logits_CV.gather(-1, tokens_N[rows, None])[:, 0] - torch.logsumexp(logits_CV, dim=-1)
        ctx.save_for_backward(hidden_NH, weight_VH, tokens_N)
        ctx.temperature, ctx.chunk_rows, ctx.softmax_dtype = temperature, chunk_rows, softmax_dtype
        return logps_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, tokens_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        temperature, softmax_dtype = ctx.temperature, ctx.softmax_dtype
        grad_N = grad_N.to(softmax_dtype)
        grad_hidden_NH = torch.empty_like(hidden_NH) if need_hidden else None
        grad_weight_VH = torch.zeros(weight_VH.shape, dtype=softmax_dtype, device=weight_VH.device) \
            if need_weight else None
        for start in range(0, len(tokens_N), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits_CV = hidden_NH[rows] @ weight_VH.T  # recomputed: cheaper than keeping (N, V) floats
            if temperature != 1.0:
                logits_CV = logits_CV.to(softmax_dtype).div_(temperature)
            # d logp / d logits = onehot(token) - softmax, times the incoming gradient (and 1/temperature)
            probs_CV = torch.softmax(logits_CV, dim=-1, dtype=softmax_dtype)
            grad_logits_CV = probs_CV.mul_(-grad_N[rows, None]).scatter_add_(-1, tokens_N[rows, None],
                                                                              grad_N[rows, None])
            if temperature != 1.0:
                grad_logits_CV.div_(temperature)
            grad_logits_CV = grad_logits_CV.to(hidden_NH.dtype)
            if need_hidden:
                grad_hidden_NH[rows] = grad_logits_CV @ weight_VH
            if need_weight:
                grad_weight_VH += grad_logits_CV.T @ hidden_NH[rows]
        return grad_hidden_NH, grad_weight_VH, None, None, None


def token_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, tokens_N: torch.Tensor,
                   temperature: float = 1.0, max_chunk_elements: int = 1 << 29) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[token] for each row, float32, shape (N,).

    The same numbers as projecting to logits and taking a log-softmax, without ever holding the (N, V)
    logits of all rows: forward keeps one chunk's logits at a time (at most `max_chunk_elements`, 2 GiB
    of float32 by default) and saves none of them; backward recomputes each chunk's logits.
    For an RL batch on a 152k vocabulary (128 x 256 tokens) the full logits and their gradient are tens of
    GiB; chunked, the whole batch fits in one micro-batch. Matmuls run in `hidden_NH`'s dtype (bf16 on
    the GPU, like the unchunked head under autocast), the softmax in float32 (float64 for float64 input).
    """
    chunk_rows = max(1, max_chunk_elements // weight_VH.size(0))
    return _ChunkedTokenLogprobs.apply(hidden_NH, weight_VH, tokens_N, float(temperature), chunk_rows)
