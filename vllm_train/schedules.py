"""Learning-rate schedules by name, and the optimizer names a config may give.

Three schedules are ours (``cosine``, ``linear``, ``constant``: linear warmup, then decay to 0 or a constant
rate); every other name of ``transformers.SchedulerType`` (``constant_with_warmup``, ``cosine_with_restarts``,
``polynomial``, ``inverse_sqrt``, ``cosine_with_min_lr``, ``warmup_stable_decay``, ...) is built by
``transformers.get_scheduler``, with ``lr_scheduler_kwargs`` as its extra arguments, as TRL's trainers do. Each
is a `LambdaLR`, so a checkpoint resumes it from the step alone. The two that follow a metric
(``reduce_lr_on_plateau``, ``greedy``) are refused: a step here has no metric to give them.

The optimizer is torch's AdamW; ``optim`` accepts the names TRL / transformers give it.
"""

from __future__ import annotations

import json
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from vllm_train.errors import VllmTrainError

OWN_SCHEDULES = ("cosine", "linear", "constant")
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")  # stepped with a metric (eval loss): not here
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")  # transformers' names of torch's AdamW (fused on CUDA here)


def schedule_names() -> list[str]:
    """Every schedule `lr_scheduler` may name: ours, then transformers' others."""
    from transformers import SchedulerType

    return [*OWN_SCHEDULES, *(s.value for s in SchedulerType if s.value not in (*OWN_SCHEDULES, *METRIC_SCHEDULES))]


def scheduler_kwargs(value) -> dict:
    """`lr_scheduler_kwargs` as a dict: a mapping, or its JSON text (a flag's value); None is {}."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise VllmTrainError(f"config field 'lr_scheduler_kwargs': {value!r} is invalid (a JSON object, e.g. "
                                 f"'{{\"min_lr_rate\": 0.1}}')") from None
    if not isinstance(value, dict):
        raise VllmTrainError(f"config field 'lr_scheduler_kwargs': {value!r} is invalid (a mapping of argument: value)")
    return value


def check_schedule(name, kwargs: dict, warmup_steps: float | None) -> None:
    """One line for a schedule name we cannot build, or arguments it does not take (tried on a stand-in
    optimizer now: `transformers.get_scheduler` says what is missing only when the run builds it)."""
    if not isinstance(name, str):
        raise VllmTrainError(f"config field 'lr_scheduler': {name!r} is invalid (a schedule's name)")
    if warmup_steps is not None and not (warmup_steps >= 0 and (warmup_steps < 1 or float(warmup_steps).is_integer())):
        raise VllmTrainError(f"config field 'warmup_steps': {warmup_steps!r} is invalid (an integer >= 0, or a "
                             f"ratio of the run's steps below 1)")
    if name in METRIC_SCHEDULES:
        raise VllmTrainError(f"config field 'lr_scheduler': {name} is not supported (it is stepped with an eval "
                             f"metric); one of {', '.join(schedule_names())}")
    if name in OWN_SCHEDULES:
        if kwargs:
            raise VllmTrainError(f"config field 'lr_scheduler_kwargs': {kwargs} is invalid ({name} takes none)")
        return
    if name not in schedule_names():
        raise VllmTrainError(f"config field 'lr_scheduler': {name!r} is invalid (one of {', '.join(schedule_names())})")
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        _transformers_schedule(stand_in, name, 1, 10, kwargs)
    except (TypeError, ValueError) as exc:
        raise VllmTrainError(f"config field 'lr_scheduler_kwargs': {kwargs} does not suit {name}: {exc}") from None


def warmup_count(total_steps: int, warmup_ratio: float, warmup_steps: float | None) -> int:
    """Warmup steps of a run: `warmup_steps` when set above 0 (below 1: a ratio of the run, as transformers
    reads it), else ``warmup_ratio`` of the run."""
    if warmup_steps:
        return int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * total_steps)
    return int(warmup_ratio * total_steps)


def make_schedule(optimizer, name: str, warmup: int, total_steps: int, kwargs: dict) -> LambdaLR:
    """The schedule `name` over `total_steps` optimizer steps, the first `warmup` of them warming up."""
    if name not in OWN_SCHEDULES:
        return _transformers_schedule(optimizer, name, warmup, total_steps, kwargs)
    return LambdaLR(optimizer, lambda step: own_multiplier(name, step, warmup, total_steps))


def own_multiplier(name: str, step: int, warmup: int, total_steps: int) -> float:
    """Ours: linear warmup over `warmup` steps, then cosine/linear decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _transformers_schedule(optimizer, name: str, warmup: int, total_steps: int, kwargs: dict):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=dict(kwargs))


def check_optimizer(name) -> None:
    """`optim` (None: AdamW) must name AdamW: no other optimizer is implemented."""
    if name is not None and name not in ADAMW_NAMES:
        raise VllmTrainError(f"config field 'optim': {name!r} is not supported (the optimizer is torch's AdamW: "
                             f"{' or '.join(ADAMW_NAMES)})")
