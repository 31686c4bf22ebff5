"""The training runs the service holds: one LoRA adapter per run in a slot of the shared `TenantModel`, its
own AdamW, and the two training operations -- a forward/backward over requests of many runs in one batch,
and an optimizer step that touches one run's adapter only. Called from the worker thread only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_train.losses.tinker import datum_loss
from vllm_train.service.datums import CheckedBatch
from vllm_train.service.problems import BadRequest, LimitExceeded, NotFound
from vllm_train.service.tenants import TenantModel
from vllm_train.service.wire import encode_forward_backward_output

LORA_ALPHA = 32.0  # Tinker's LoRA alpha (SkyRL tx's reading of it): scaling = 32 / rank


@dataclass
class Run:
    model_id: str
    owner: str  # digest of the API key that created it
    slot: int
    rank: int
    targets: tuple[str, ...]
    optimizer: torch.optim.AdamW
    seed: int | None = None
    steps: int = 0
    user_metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdamSettings:
    """The SDK's AdamParams (its defaults: Tinker's, weight decay 0)."""
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def check(self) -> AdamSettings:
        for name in ("learning_rate", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BadRequest(f"adam_params.{name}", f"must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise BadRequest(f"adam_params.{name}", f"must be in [0, 1), got {value!r}")
        return self


class Trainer:
    def __init__(self, tenants: TenantModel, base_model: str, max_adapters: int):
        self.tenants = tenants
        self.base_model = base_model
        self.max_adapters = max_adapters
        self.runs: dict[str, Run] = {}

    # ---- runs ---------------------------------------------------------------------------------------
    def free_slot(self) -> int:
        taken = {run.slot for run in self.runs.values()}
        slot = next((s for s in range(self.max_adapters) if s not in taken), None)
        if slot is None:
            raise LimitExceeded(f"create_model: all {self.max_adapters} adapter slots are in use (--max-adapters); "
                                "unload a model first")
        return slot

    def create_run(self, model_id: str, owner: str, rank: int, seed: int | None, targets: tuple[str, ...],
                   user_metadata: dict | None = None) -> Run:
        slot = self.free_slot()
        seed = self.tenants.add_adapter(slot, rank, LORA_ALPHA, seed, targets)
        params = self.tenants.parameters_of(slot)
        optimizer = torch.optim.AdamW(params, lr=AdamSettings.learning_rate, weight_decay=0.0)
        run = Run(model_id, owner, slot, rank, targets, optimizer, seed, user_metadata=dict(user_metadata or {}))
        self.runs[model_id] = run
        return run

    def run_for(self, model_id: str, owner: str) -> Run:
        run = self.runs.get(model_id)
        if run is None or run.owner != owner:
            raise NotFound(f"model_id: no model {model_id!r} for this API key")
        return run

    def unload(self, run: Run) -> None:
        self.tenants.remove_adapter(run.slot)
        self.runs.pop(run.model_id, None)

    # ---- forward / backward --------------------------------------------------------------------------
    def forward_backward(self, jobs: list[tuple[Run, CheckedBatch, bool]]) -> list[bytes | BadRequest]:
        """One pass over every datum of `jobs` ((run, batch, forward_only) each): per-datum log-probs and
        summed losses; the backward of the jobs that are not forward-only accumulates each run's gradients
        into its own adapter. Returns each job's ForwardBackwardOutput (protobuf), or the problem that failed
        it alone (a non-finite loss: that job adds no gradient). Gradients are written only after every
        job's loss is computed, by one backward."""
        rows = [(run.slot, d.tokens, d.targets_N) for run, batch, _ in jobs for d in batch.data]
        training = any(not forward_only for _, _, forward_only in jobs)
        with torch.set_grad_enabled(training):
            logps = iter(self.tenants.token_logprobs(rows))
            results, total = [], None
            for _, batch, forward_only in jobs:
                job_logps, job_loss, metric_sums = [], torch.zeros(()), {}
                for datum in batch.data:
                    logps_N = next(logps)
                    loss, metrics = datum_loss(batch.loss_fn, logps_N, datum.inputs, batch.config)
                    job_loss = job_loss + loss
                    job_logps.append(logps_N.detach().cpu().numpy().astype(np.float32))
                    for key, value in metrics.items():
                        metric_sums[key] = metric_sums.get(key, 0.0) + value / len(batch.data)
                if not torch.isfinite(job_loss):  # this job fails alone; the others' step goes on
                    results.append(BadRequest("data", "the loss is not finite (NaN or infinity); no gradients "
                                              "were kept"))
                    continue
                if not forward_only:
                    total = job_loss if total is None else total + job_loss
                reported = {"loss:sum": float(job_loss.detach())} | {f"{k}:mean": v for k, v in metric_sums.items()}
                results.append(encode_forward_backward_output(job_logps, reported))
            if total is not None and total.requires_grad:
                total.backward()
        return results

    def restore(self, run: Run, state: dict[str, torch.Tensor], optimizer_state: dict | None, steps: int) -> None:
        """A checkpoint's adapter (and optimizer state, else a fresh AdamW) into `run`; every tensor is
        checked against the run's before anything is written."""
        params = self.tenants.parameters_of(run.slot)
        if optimizer_state is not None:
            for index, values in optimizer_state["state"].items():
                ok = 0 <= index < len(params) and all(values[k].shape == params[index].shape
                                                      for k in ("exp_avg", "exp_avg_sq") if k in values)
                if not ok:
                    raise BadRequest("path", "the checkpoint's optimizer state does not fit this adapter")
        self.tenants.load_peft_state_dict(run.slot, state)  # checked whole first
        run.optimizer = torch.optim.AdamW(params, lr=AdamSettings.learning_rate, weight_decay=0.0)
        if optimizer_state is not None:
            run.optimizer.load_state_dict(optimizer_state)
        run.optimizer.zero_grad(set_to_none=True)
        run.steps = steps

    # ---- optimizer ----------------------------------------------------------------------------------
    def optim_step(self, run: Run, settings: AdamSettings) -> dict:
        """torch's AdamW over this run's parameters only, with the step's settings; then clear its grads."""
        params = self.tenants.parameters_of(run.slot)
        for group in run.optimizer.param_groups:
            group.update(lr=settings.learning_rate, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                         weight_decay=settings.weight_decay)
        metrics = {}
        if settings.grad_clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip_norm)
            metrics["grad_norm:mean"] = float(norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.steps += 1
        return {"metrics": metrics}
