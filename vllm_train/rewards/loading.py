"""Reward callables ``(prompt, completion, example) -> float``, loaded from a ``module:function`` spec.

A spec names an importable module (``vllm_train.toy:correctness_reward``) or a Python file
(``my_rewards.py:score``). Every value a reward returns is checked: a non-number, NaN or inf stops the
run with an error naming the function and the prompt, instead of poisoning the advantages.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_train.errors import VllmTrainError

RewardFn = Callable[[Any, str, dict], float]

TOY_REWARD = "vllm_train.toy:correctness_reward"


def load_reward_function(spec: str) -> RewardFn:
    """The callable named by ``module:function`` (or ``path/to/file.py:function``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise VllmTrainError(f"reward {spec!r}: expected 'module:function', e.g. {TOY_REWARD}")
    module_name, func_name = spec.split(":")
    module = _import(module_name, spec)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise VllmTrainError(f"reward {spec!r}: module '{module_name}' has no attribute '{func_name}'")
    if not callable(fn):
        raise VllmTrainError(f"reward {spec!r}: '{func_name}' is a {type(fn).__name__}, not a function")
    return fn


def _import(module_name: str, spec: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise VllmTrainError(f"reward {spec!r}: file not found: {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        try:
            loaded.loader.exec_module(module)
        except Exception as exc:
            raise VllmTrainError(f"reward {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise VllmTrainError(f"reward {spec!r}: module '{module_name}' not found") from None
        raise VllmTrainError(f"reward {spec!r}: importing '{module_name}' failed: {exc}") from None
    except Exception as exc:
        raise VllmTrainError(f"reward {spec!r}: importing '{module_name}' failed: "
                             f"{type(exc).__name__}: {exc}") from None


def reward_name(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def score_with_function(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str],
                        examples: Sequence[dict]) -> list[float]:
    """Call `fn` on each (prompt, completion, example); every result must be a finite number."""
    out = []
    for i, (prompt, completion, example) in enumerate(zip(prompts, completions, examples)):
        try:
            value = fn(prompt, completion, example)
        except VllmTrainError:
            raise
        except Exception as exc:
            raise VllmTrainError(f"reward {reward_name(fn)} raised {type(exc).__name__}: {exc} "
                                 f"(completion {i}: {completion!r})") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise VllmTrainError(f"reward {reward_name(fn)} returned {value!r} ({type(value).__name__}), "
                                 f"expected a float (completion {i}: {completion!r})")
        if not math.isfinite(float(value)):
            raise VllmTrainError(f"reward {reward_name(fn)} returned {value} for completion {i} "
                                 f"({completion!r}); rewards must be finite")
        out.append(float(value))
    return out
