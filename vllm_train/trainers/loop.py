"""The training loop SFT, DPO and reward models share.

Epochs of shuffled accumulation groups (the order depends only on seed and epoch, so a resumed run
sees the batches the interrupted one would have), one optimizer step per group, resume from a
checkpoint, logging every `logging_steps` (metrics.jsonl, TensorBoard, progress bar), atomic
checkpoints every `save_steps` (or at each epoch end), evaluation every `eval_steps` (or after each
epoch), a stop when the loss or the gradient norm stops being finite -- before the optimizer step
would spread it into the weights -- or when the step made the weights non-finite, and a divergence
watch at every logged step (`guards`: the metric ``diverged``, a warning, a stop if asked).

What differs between trainers is passed in: `step_fn(group, group_examples) -> stats` runs
forward/backward over this rank's share of one accumulation group (micro-batches of example indices;
`group_examples` counts the whole group's examples over all ranks, the normaliser of a mean loss) and
returns floats including "loss"; `summarize` turns a logging window's summed stats into the logged
metrics.

Data parallel (under torchrun, `vllm_train.distributed`): each rank takes its share of every global
micro-batch; after the group, one all-reduce sums the LoRA gradients and the step's stats over ranks,
so every rank takes the same optimizer step and sees the same loss. Rank 0 alone writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_train import distributed
from vllm_train.config import LoRATrainConfig, write_resolved_config
from vllm_train.metrics import MetricsLogger
from vllm_train.trainers import common, run_files
from vllm_train.trainers.common import Checkpointable
from vllm_train.trainers.guards import DivergenceWatch, guarded_step, stop_if_not_finite

StepFn = Callable[[list[list[int]], int], dict[str, float]]
Summarize = Callable[[dict[str, float], int, float], dict[str, float]]


def mean_per_step(sums: dict[str, float], steps: int, seconds: float) -> dict[str, float]:
    """Each stat's mean over the window's optimizer steps, and steps per second."""
    return {**{k: v / steps for k, v in sums.items()}, "steps_per_sec": steps / max(seconds, 1e-9)}


def run_evaluation(evaluate: Callable[[], dict], logger: MetricsLogger, step: int, model: torch.nn.Module) -> dict:
    """Evaluate, log the ``eval_*`` metrics at `step`, return them; the model goes back to training mode."""
    metrics = {f"eval_{k}": v for k, v in evaluate().items()}
    logger.log(step, metrics)
    model.train()
    return metrics


def optimizer_step(stats: dict[str, float], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler, max_grad_norm: float, step: int, run_dir: Path) -> tuple[dict[str, float], torch.Tensor]:
    """One update after an accumulation group: sum gradients and stats over ranks, clip, refuse a non-finite
    loss or gradient norm (naming `step`, before the weights take it), step, refuse weights the step made
    non-finite. Returns (stats, grad norm)."""
    stats = dict(zip(stats, distributed.all_reduce_grads(params, *stats.values())))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        stop_if_not_finite(step, stats["loss"], grad_norm, run_dir)
    guarded_step(optimizer, step, params, run_dir)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, grad_norm


class _Window:
    """Stats summed over the optimizer steps since the last log line."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run_epochs(step_fn: StepFn, *, model: torch.nn.Module, trainable: Checkpointable, optimizer: torch.optim.Optimizer,
               config: LoRATrainConfig, data: Any, model_name: str, kind: str, desc: str,
               summarize: Summarize = mean_per_step, postfix: Callable[[dict], dict] = lambda m: {},
               evaluate: Callable[[], dict] | None = None, on_checkpoint: Callable[[Path], None] | None = None,
               resolved: dict | None = None, tensorboard: bool = True, progress: bool = True) -> tuple[dict, int]:
    """Train until ``config.max_steps`` (or ``num_epochs``) optimizer steps; returns (last logged metrics
    with ``eval_*`` of the last evaluation, steps done). The caller saves the final adapter.

    `trainable` is what checkpoints hold; every parameter in `optimizer` is clipped to ``max_grad_norm``
    together. `kind` and `resolved` go into resolved_config.json; `desc` and `postfix(metrics)` label
    the progress bar; `on_checkpoint(path)` runs after each checkpoint is written. `data` (the training
    dataset) is fingerprinted with the config and model into each checkpoint; a resume must match it.
    """
    c, run_dir = config, Path(config.output_dir)
    num_examples = len(data)
    fingerprint = run_files.fingerprint(c, model_name, data, distributed.world_size())
    total_steps = common.total_optimizer_steps(num_examples, c)
    scheduler = common.make_schedule(optimizer, total_steps, c)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start_epoch, start_group, step = 0, 0, 0
    resume = common.resolve_resume(c.resume_from, run_dir)
    if resume is not None:
        meta = common.load_checkpoint(resume, trainable, optimizer, scheduler, fingerprint)
        start_epoch, start_group, step = meta["epoch"], meta["next_group"], meta["step"]
    write_resolved_config(c, run_dir, model=model_name, kind=kind, total_steps=total_steps, **(resolved or {}))
    watch = DivergenceWatch(params, c.stop_on_divergence, run_dir)

    def checkpoint(epoch: int, next_group: int) -> None:
        path = common.save_checkpoint(run_dir, step, trainable, optimizer, scheduler,
                                      {"epoch": epoch, "next_group": next_group, "fingerprint": fingerprint},
                                      model_name, c.save_total_limit)
        if on_checkpoint is not None and distributed.is_main():
            on_checkpoint(path)

    logger = MetricsLogger(run_dir, c.report_to, step if resume is not None else None, tensorboard=tensorboard)
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not (progress and distributed.is_main()),
               dynamic_ncols=True)
    model.train()
    last: dict = {}
    evals: dict = {}  # the newest evaluation's eval_* metrics
    window = _Window()
    epoch = start_epoch
    try:
        while step < total_steps:
            groups = common.epoch_groups(num_examples, c, epoch)
            for g in range(start_group if epoch == start_epoch else 0, len(groups)):
                stats = step_fn([distributed.local_share(micro) for micro in groups[g]],
                                sum(len(micro) for micro in groups[g]))
                step += 1
                stats, grad_norm = optimizer_step(stats, params, optimizer, scheduler, c.max_grad_norm, step, run_dir)
                window.add(stats)
                bar.update(1)
                if step % c.logging_steps == 0 or step == total_steps:
                    last = {**summarize(window.sums, window.steps, window.seconds()), "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm), "epoch": epoch + (g + 1) / len(groups)}
                    last.update(watch.check(step, last["loss"]))
                    logger.log(step, last)
                    bar.set_postfix(postfix(last))
                    window = _Window()
                if evaluate is not None and c.eval_steps and step % c.eval_steps == 0:
                    evals = run_evaluation(evaluate, logger, step, model)
                if c.save_steps and step % c.save_steps == 0 and step < total_steps:
                    checkpoint(epoch, g + 1)
                if step >= total_steps:
                    break
            epoch += 1
            if evaluate is not None and not (c.eval_steps and step % c.eval_steps == 0):  # not just done
                evals = run_evaluation(evaluate, logger, step, model)
            if not c.save_steps and step < total_steps:
                checkpoint(epoch, 0)
    finally:
        bar.close()
        logger.close()
    model.eval()
    return {**last, **evals}, step
