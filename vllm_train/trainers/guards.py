"""Stops and warnings for training that has gone wrong, shared by the SFT/DPO/RM loop and RL.

* A loss or gradient norm that is NaN or infinite stops the run before the optimizer step would spread
  it into the weights (`stop_if_not_finite`); weights that the step itself made NaN or infinite (a
  learning rate so large that the update overflows) stop it right after (`stop_if_weights_not_finite`).
  Either way nothing non-finite is saved: the files are guarded too (`vllm_train.outputs.save_weights`).
* Divergence with finite numbers (`DivergenceWatch`): the logged loss far above its best for several
  logged steps in a row, or the trainable weights grown by orders of magnitude since the start. It is
  logged as the metric ``diverged`` (0/1) at every logged step, warned about once per episode, and with
  ``stop_on_divergence`` it stops the run (one line, exit status 2, the checkpoints kept).

The thresholds are far from what healthy runs do: the shipped recipes (`vllm-train demo`, the examples,
the README's commands) lower their loss and move their weights by a few times at most, while a learning
rate of 1e4 grows the weights ten-thousandfold in one step and pins the loss at log(vocabulary).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from vllm_train import distributed
from vllm_train.errors import VllmTrainError
from vllm_train.trainers import common

LOSS_RISE = 3.0  # a logged loss above this many times its best so far ...
LOSS_MARGIN = 1.0  # ... and this much above it (a loss near zero may triple harmlessly) ...
LOSS_PATIENCE = 5  # ... for this many logged steps in a row
WEIGHT_GROWTH = 100.0  # or the trainable weights' norm this many times its value at the start of the run


def kept_checkpoint(run_dir: str | Path) -> str:
    kept = common.list_checkpoints(run_dir)
    return f"The last good checkpoint is kept: {kept[-1]}" if kept else "No checkpoint was written yet."


def stop_if_not_finite(step: int, loss: float, grad_norm: float | torch.Tensor, run_dir: str | Path) -> None:
    """Raise `VllmTrainError` naming the step when the loss or gradient norm is NaN or infinite."""
    for name, value in (("loss", float(loss)), ("grad_norm", float(grad_norm))):
        if not math.isfinite(value):
            raise VllmTrainError(f"step {step}: {name} is {value}; stopping. {kept_checkpoint(run_dir)}")


def weight_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of all `params` together (tensor-parallel shards gathered: a collective of the group)."""
    total = torch.nn.utils.get_total_norm([p.detach() for p in params])
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


def guarded_step(optimizer: torch.optim.Optimizer, step: int, params: list[torch.Tensor], run_dir: str | Path) -> None:
    """`optimizer.step()`, refusing (one line naming `step`) an update too large for the weights' dtype and
    weights the update left NaN or infinite (`stop_if_weights_not_finite`)."""
    try:
        optimizer.step()
    except RuntimeError as exc:  # AdamW's step size lr / (1 - beta1^t) does not fit a float32
        if "overflow" not in str(exc):
            raise
        lr = max(group["lr"] for group in optimizer.param_groups)
        raise VllmTrainError(f"step {step}: the update overflows the weights' dtype (learning rate {lr:.3g}); "
                             f"stopping. {kept_checkpoint(run_dir)}") from None
    stop_if_weights_not_finite(step, params, run_dir)


def stop_if_weights_not_finite(step: int, params: list[torch.Tensor], run_dir: str | Path) -> None:
    """After an optimizer step: raise `VllmTrainError` when it left a weight NaN or infinite (one norm per
    step; the exact tensor is looked for only then)."""
    if math.isfinite(weight_norm(params)):
        return
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in local)
    what = f"{bad} weight value(s) are NaN or infinite" if bad else "the weights' norm overflows"
    raise VllmTrainError(f"step {step}: after the update {what} (the learning rate is far too high); stopping. "
                         f"{kept_checkpoint(run_dir)}")


class DivergenceWatch:
    """Watches a run's logged loss and its trainable weights for divergence (see the module's doc)."""

    def __init__(self, params: list[torch.Tensor], stop: bool, run_dir: str | Path):
        self.params, self.stop, self.run_dir = params, stop, run_dir
        self.start_norm = weight_norm(params)
        self.best = math.inf
        self.high = 0  # logged steps in a row with the loss far above its best
        self.warned = False  # in this episode of divergence

    def check(self, step: int, loss: float | None = None) -> dict[str, int]:
        """At a logged step: {"diverged": 0 or 1}; warns once per episode, or stops with `stop`. `loss`: the
        logged loss (None where a loss says nothing about divergence: RL's policy loss)."""
        reasons = []
        if loss is not None and math.isfinite(loss):
            far = loss > max(LOSS_RISE * self.best, self.best + LOSS_MARGIN)
            self.high = self.high + 1 if far else 0
            if self.high >= LOSS_PATIENCE:
                reasons.append(f"the loss {loss:.4g} has stayed far above its best {self.best:.4g} for "
                               f"{self.high} logged steps")
            self.best = min(self.best, loss)
        norm = weight_norm(self.params)
        if self.start_norm > 0 and not norm <= WEIGHT_GROWTH * self.start_norm:
            reasons.append(f"the trainable weights' norm grew {norm / self.start_norm:.3g}x since the start "
                           f"({self.start_norm:.3g} -> {norm:.3g})")
        if reasons and self.stop:
            raise VllmTrainError(f"step {step}: training diverged: {'; '.join(reasons)}; stopping "
                                 f"(--stop-on-divergence). {kept_checkpoint(self.run_dir)}")
        if reasons and not self.warned and distributed.is_main():
            print(f"warning: step {step}: training is diverging: {'; '.join(reasons)} (lower --learning-rate; "
                  f"--stop-on-divergence stops such a run)", file=sys.stderr, flush=True)
        self.warned = bool(reasons)
        return {"diverged": int(bool(reasons))}
