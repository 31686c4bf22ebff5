"""Pieces every training loop uses: optimizer + schedule, data order, atomic checkpoints, resume.

Checkpoints hold only safetensors and JSON (no pickle): the adapter in PEFT format, the optimizer's
moment tensors, and a JSON state with the step, epoch, batch position and RNG state.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from vllm_train import distributed, schedules
from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.trainers import run_files


@runtime_checkable
class Checkpointable(Protocol):
    """The trainable state a checkpoint saves and a resume restores. `LoRAInjector` is one; a trainer
    with more state (a reward head, a value head) wraps the injector in its own."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates, always in the same order (optimizer state is saved by index)."""
        ...

    def save(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the state as a PEFT-format adapter directory `path` (plus any extra files)."""
        ...

    def load(self, path: str | Path) -> None:
        """Load what `save` wrote into the live parameters."""
        ...


def make_optimizer(params, config: LoRATrainConfig) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (a LoRA on every linear layer is hundreds of small tensors)."""
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) \
        else params
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def total_optimizer_steps(num_examples: int, config: LoRATrainConfig) -> int:
    """Optimizer steps of a run: max_steps if set, else num_epochs x accumulation groups per epoch."""
    world = distributed.world_size()
    usable = num_examples - num_examples % world
    groups_per_epoch = math.ceil(math.ceil(usable / (config.batch_size * world)) / config.gradient_accumulation_steps)
    return config.max_steps if config.max_steps > 0 else groups_per_epoch * config.num_epochs


def epoch_groups(num_examples: int, config: LoRATrainConfig, epoch: int) -> list[list[list[int]]]:
    """This epoch's shuffled example indices as accumulation groups of *global* micro-batches
    (``batch_size`` x world size examples; each rank trains on its share, `distributed.local_share`).
    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the interrupted
    one would have. With several ranks the epoch drops its last ``num_examples % world_size``
    examples (a different few each epoch), so every rank has examples in every micro-batch."""
    generator = torch.Generator().manual_seed(config.seed + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    world = distributed.world_size()
    order = order[:len(order) - len(order) % world]
    size = config.batch_size * world
    micro = [order[i:i + size] for i in range(0, len(order), size)]
    accum = config.gradient_accumulation_steps
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


def make_schedule(optimizer, total_steps: int, config: LoRATrainConfig):
    """The config's learning-rate schedule over `total_steps` optimizer steps (`vllm_train.schedules`)."""
    warmup = schedules.warmup_count(total_steps, config.warmup_ratio, config.warmup_steps)
    return schedules.make_schedule(optimizer, config.lr_scheduler, warmup, total_steps,
                                   schedules.scheduler_kwargs(config.lr_scheduler_kwargs))


# ---- checkpoints --------------------------------------------------------------------------------
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, injector: Checkpointable, optimizer, scheduler, state: dict,
                    base_model: str, keep: int) -> Path:
    """Write run_dir/checkpoints/step-N atomically (temp dir + rename) and keep the newest `keep`.
    Under torchrun every rank calls it: with tensor parallelism the adapter and the optimizer moments
    are gathered from the ranks' shards (collectives); rank 0 alone writes."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    if not distributed.is_main():
        injector.save(root / ".not-written", base_model)  # takes part in the gather, writes nothing
        _optimizer_tensors(optimizer, injector.get_trainable_params())
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    try:
        injector.save(tmp / "adapter", base_model)
        tensors, opt_meta = _optimizer_tensors(optimizer, injector.get_trainable_params())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        meta = {**state, "step": step, "scheduler_last_epoch": scheduler.last_epoch, "optimizer": opt_meta}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run starting in `run_dir` resumes from (None: a fresh start). Called when a run
    starts, it first removes what a killed run left behind (`run_files.clean_leftovers`)."""
    run_files.clean_leftovers(run_dir)
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise VllmTrainError(f"resume_from: {resume_from} is not a checkpoint (no trainer_state.json)")
    return path


def load_checkpoint(path: Path, injector: Checkpointable, optimizer, scheduler,
                    fingerprint: dict | None = None) -> dict:
    """Restore adapter, optimizer moments, schedule position and RNG; returns the saved state dict.
    With `fingerprint` (`run_files.fingerprint` of this run), a checkpoint of another run is refused first."""
    meta = json.loads((path / "trainer_state.json").read_text())
    if fingerprint is not None:
        run_files.check_fingerprint(meta.get("fingerprint"), fingerprint, path)
    injector.load(path / "adapter")
    params = injector.get_trainable_params()
    tensors = load_file(str(path / "optimizer.safetensors"))
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in tensors:
            # the fused (CUDA) AdamW keeps its step count on the parameters' device, the plain one on the CPU
            step_device = p.device if optimizer.defaults.get("fused") else None
            optimizer.state[p] = {"step": torch.tensor(float(meta["optimizer"]["steps"][str(i)]), device=step_device),
                                  "exp_avg": _like(p, tensors[f"{i}.exp_avg"]),
                                  "exp_avg_sq": _like(p, tensors[f"{i}.exp_avg_sq"])}
    scheduler.last_epoch = meta["scheduler_last_epoch"]
    for group, base_lr, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["cpu"])
    return meta


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel (DTensor) moment's full value, gathered from the ranks; a plain one as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A saved full moment placed like `param`: its device, and its shard of it under tensor parallelism."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


def _optimizer_tensors(optimizer, params) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, steps = {}, {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p)
        if not st:
            continue
        tensors[f"{i}.exp_avg"] = _full(st["exp_avg"]).detach().cpu().contiguous()
        tensors[f"{i}.exp_avg_sq"] = _full(st["exp_avg_sq"]).detach().cpu().contiguous()
        steps[str(i)] = float(st["step"])
    if not tensors:
        tensors["empty"] = torch.zeros(1)
    return tensors, {"steps": steps}
