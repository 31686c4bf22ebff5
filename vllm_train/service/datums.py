"""A forward/forward_backward request checked whole before anything runs: the loss and its config, every
datum's tokens against the vocabulary and context length, and each loss input's dtype, shape and
finiteness. The first problem is a `BadRequest` naming its field (``data[3].loss_fn_inputs.advantages``);
nothing is queued until every datum passes, so a bad request changes no adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vllm_train.losses.tinker import LOSS_INPUTS
from vllm_train.service.problems import BadRequest, LimitExceeded, NotSupported
from vllm_train.service.wire import ForwardBackwardRequest

FLOAT_INPUTS = ("weights", "logprobs", "advantages")


@dataclass
class CheckedDatum:
    tokens: list[int]
    targets_N: torch.Tensor  # int64
    inputs: dict[str, torch.Tensor]  # the loss's float inputs, (N,) each, float32


@dataclass
class CheckedBatch:
    loss_fn: str
    config: dict[str, float]  # every key the loss reads, defaults filled in
    data: list[CheckedDatum]

    @property
    def tokens(self) -> int:
        return sum(len(d.tokens) for d in self.data)


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_context: int  # tokens per datum
    max_batch_tokens: int  # tokens per request


def check_forward_backward(request: ForwardBackwardRequest, limits: Limits) -> CheckedBatch:
    if request.loss_fn == "custom":
        raise NotSupported("loss_fn: server-side custom losses are not supported here; forward_backward_custom "
                           "with a Python callable runs client-side and works")
    if request.loss_fn not in LOSS_INPUTS:
        raise BadRequest("loss_fn", f"unknown loss {request.loss_fn!r}; supported: {', '.join(LOSS_INPUTS)}")
    config = check_loss_config(request.loss_fn, request.config)
    if not request.data:
        raise BadRequest("data", "no datums")
    data = [_check_datum(d.tokens, d.inputs, request.loss_fn, f"data[{i}]", limits)
            for i, d in enumerate(request.data)]
    batch = CheckedBatch(request.loss_fn, config, data)
    if batch.tokens > limits.max_batch_tokens:
        raise LimitExceeded(f"data: {batch.tokens} tokens in one request, over this server's limit of "
                            f"{limits.max_batch_tokens} (--max-batch-tokens); send fewer datums per call")
    return batch


def check_loss_config(loss_fn: str, given: dict[str, float | str]) -> dict[str, float]:
    _, defaults = LOSS_INPUTS[loss_fn]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise BadRequest(f"loss_fn_config.{unknown[0]}", f"not a setting of {loss_fn} (its settings: {allowed})")
    config: dict[str, float] = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if value is None:
            raise BadRequest(f"loss_fn_config.{key}", f"required by {loss_fn}")
        if isinstance(value, str) or not math.isfinite(value):
            raise BadRequest(f"loss_fn_config.{key}", f"must be a finite number, got {value!r}")
        config[key] = float(value)
    if "clip_low_threshold" in config:
        low, high = config["clip_low_threshold"], config["clip_high_threshold"]
        if not 0 <= low <= high:
            raise BadRequest("loss_fn_config.clip_low_threshold", "need 0 <= clip_low_threshold <= "
                             f"clip_high_threshold (absolute ratios), got {low}, {high}")
    return config


def _check_datum(tokens: list[int], inputs: dict[str, np.ndarray], loss_fn: str, where: str,
                 limits: Limits) -> CheckedDatum:
    n = len(tokens)
    if n == 0:
        raise BadRequest(f"{where}.model_input", "no tokens")
    if n > limits.max_context:
        raise LimitExceeded(f"{where}.model_input: {n} tokens, over the model's context length {limits.max_context}")
    bad = next((t for t in tokens if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise BadRequest(f"{where}.model_input", f"token id {bad} outside the vocabulary (0..{limits.vocab_size - 1})")
    targets = inputs.get("target_tokens")
    if targets is None:
        raise BadRequest(f"{where}.loss_fn_inputs.target_tokens", f"required by {loss_fn}")
    _check_shape(targets, n, f"{where}.loss_fn_inputs.target_tokens")
    if targets.dtype.kind != "i":
        raise BadRequest(f"{where}.loss_fn_inputs.target_tokens", "must be int64 token ids")
    if targets.size and not ((targets >= 0) & (targets < limits.vocab_size)).all():
        raise BadRequest(f"{where}.loss_fn_inputs.target_tokens",
                         f"a token id outside the vocabulary (0..{limits.vocab_size - 1})")
    needed, _ = LOSS_INPUTS[loss_fn]
    checked: dict[str, torch.Tensor] = {}
    for name in needed:
        field = f"{where}.loss_fn_inputs.{name}"
        value = inputs.get(name)
        if value is None and name == "weights":
            value = np.ones(n, dtype=np.float32)  # cross_entropy without weights: every token counts once
        if value is None:
            raise BadRequest(field, f"required by {loss_fn}")
        _check_shape(value, n, field)
        if value.dtype.kind != "f":
            raise BadRequest(field, "must be float32")
        if not np.isfinite(value).all():
            raise BadRequest(field, "contains NaN or infinity")
        checked[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return CheckedDatum(list(tokens), torch.from_numpy(targets.astype(np.int64)), checked)


def _check_shape(value: np.ndarray, n: int, field: str) -> None:
    if value.shape != (n,):
        raise BadRequest(field, f"shape {list(value.shape)} does not match the {n} input tokens (expected [{n}]: "
                         "targets are pre-shifted, one per input position)")
