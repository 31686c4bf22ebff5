"""Reward functions loaded from a ``module:function`` spec, in either of two shapes, told apart by signature:

* ours, one sample at a time: ``(prompt, completion, example) -> float``; ``example`` is the prompt record;
* TRL's (`GRPOTrainer`), one batch at a time: ``(completions, **kwargs) -> list[float]``, called by keyword
  with ``prompts``, ``completions``, ``completion_ids`` and every other field of the records as a list.
  As in TRL, a chat prompt's completion is given as ``[{"role": "assistant", "content": text}]``.

Multi-turn episodes (an ``--environment``) give a reward more: ours gets ``environment=`` (the episode's
environment instance) and ``messages=`` (the whole conversation, tool and user turns included) by keyword
when its signature names them (or takes ``**kwargs``); TRL's gets ``environments=`` (one instance per
completion, as TRL's ``environment_factory`` does), ``messages=``, and a chat completion is every message
after the prompt (assistant, tool and user turns), not only the last.

Either may be ``async def``. A spec names an importable module (``vllm_train.toy:correctness_reward``) or
a Python file (``my_rewards.py:score``). A function of neither shape is refused when it is loaded, before
any model. The record fields a reward reads are checked on a first pass over the data (`record_check`): a
TRL function's named parameters must be fields of every record, and a function of ours may carry its own
``check_record(record) -> str | None``. Every value a reward returns is checked: a non-number, NaN or inf
stops the run with an error naming the function and the completion, instead of poisoning the advantages.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_train.errors import VllmTrainError

RewardFn = Callable[..., Any]

TOY_REWARD = "vllm_train.toy:correctness_reward"
SAMPLE_SIGNATURE = "(prompt, completion, example) -> float"
BATCH_SIGNATURE = "(completions, **kwargs) -> list[float]"
# What a batch (TRL) reward is called with besides the records' fields; TRL's trainer_state is not passed.
BATCH_ARGUMENTS = ("prompts", "completions", "completion_ids", "environments", "messages")
NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # record fields TRL does not pass on as columns
EPISODE_KEYWORDS = ("environment", "messages")  # what ours may also take, by keyword, in multi-turn runs


@dataclass(frozen=True)
class EpisodeContext:
    """Per completion of a multi-turn rollout: the environment instance (the user's object) and the whole
    conversation as messages (the prompt's first)."""
    environments: Sequence[Any]
    messages: Sequence[list[dict]]


def _accepted(fn: RewardFn, kwargs: dict) -> dict:
    """The keyword arguments `fn` names (all of them when it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


def episode_parameters(fn: RewardFn) -> list[str]:
    """The episode-only arguments (`EPISODE_KEYWORDS`, TRL's ``environments``) `fn` cannot run without."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in (*EPISODE_KEYWORDS, "environments")
            if name in parameters and parameters[name].default is parameters[name].empty]


def load_reward_function(spec: str) -> RewardFn:
    """The callable named by ``module:function`` (or ``path/to/file.py:function``), of either shape."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise VllmTrainError(f"reward {spec!r}: expected 'module:function', e.g. {TOY_REWARD}")
    module_name, func_name = spec.split(":")
    module = _import(module_name, spec)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise VllmTrainError(f"reward {spec!r}: module '{module_name}' has no attribute '{func_name}'")
    if not callable(fn):
        raise VllmTrainError(f"reward {spec!r}: '{func_name}' is a {type(fn).__name__}, not a function")
    reward_style(fn)
    return fn


def reward_function(fn: RewardFn | str | None) -> RewardFn | None:
    """A reward given as a callable or a ``module:function`` spec, checked to be of an accepted shape."""
    if isinstance(fn, str):
        return load_reward_function(fn)
    if fn is not None:
        reward_style(fn)
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


def reward_style(fn: RewardFn) -> str:
    """"batch" for TRL's shape (a parameter named ``completions``, or only ``**kwargs``), "sample" for ours
    (three positional arguments bind); one line naming both signatures for anything else."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a C callable without a signature: only ours can be called blind
        return "sample"
    try:
        signature.bind(None, None, None, **{k: None for k in EPISODE_KEYWORDS if k in signature.parameters})
        takes_three = True
    except TypeError:
        takes_three = False
    keywords = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if "completions" in signature.parameters or (keywords and not takes_three):
        return "batch"
    if takes_three:
        return "sample"
    raise VllmTrainError(f"reward {reward_name(fn)}{signature}: takes neither {SAMPLE_SIGNATURE} (one sample) nor "
                         f"TRL's {BATCH_SIGNATURE} (a batch, by keyword: prompts, completions, completion_ids and "
                         f"the records' fields)")


def _batch_columns(fn: RewardFn) -> list[str]:
    """The record fields a batch reward cannot run without: its required parameters besides `BATCH_ARGUMENTS`."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in kinds and p.default is p.empty and p.name not in BATCH_ARGUMENTS]


def record_check(fn: RewardFn | None) -> Callable[[dict], str | None] | None:
    """The first-pass check of a prompt record for what `fn` reads (None: nothing to check), so that a
    missing or unusable field stops the run at its file and line instead of scoring every sample 0."""
    if fn is None:
        return None
    if reward_style(fn) == "sample":
        return getattr(fn, "check_record", None)
    needed = _batch_columns(fn)

    def check(record: dict) -> str | None:
        missing = next((name for name in needed if name not in record), None)
        return None if missing is None else (f"missing field '{missing}' (reward {reward_name(fn)} takes it as a "
                                             f"parameter)")

    return check if needed else None


def score_with_function(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str], examples: Sequence[dict],
                        completion_ids: Sequence[Sequence[int]] | None = None,
                        episodes: EpisodeContext | None = None) -> list[float]:
    """`fn`'s reward for each (prompt, completion, example), in its shape (`reward_style`); every result
    must be a finite number. `completion_ids` (token ids) is passed on to a batch reward (None if not given);
    `episodes` (multi-turn only) as the module docstring says."""
    if reward_style(fn) == "batch":
        values = _call_batch(fn, prompts, completions, examples, completion_ids, episodes)
    else:
        values = _call_each(fn, prompts, completions, examples, episodes)
    out = []
    for i, (value, completion) in enumerate(zip(values, completions)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise VllmTrainError(f"reward {reward_name(fn)} returned {value!r} ({type(value).__name__}), "
                                 f"expected a float (completion {i}: {completion!r})")
        if not math.isfinite(float(value)):
            raise VllmTrainError(f"reward {reward_name(fn)} returned {value} for completion {i} "
                                 f"({completion!r}); rewards must be finite")
        out.append(float(value))
    return out


def _call_each(fn: RewardFn, prompts, completions, examples, episodes: EpisodeContext | None) -> list:
    """Ours: one call per sample (an async function's calls awaited together)."""
    values = []
    for i, (prompt, completion, example) in enumerate(zip(prompts, completions, examples)):
        extra = {} if episodes is None else _accepted(fn, {"environment": episodes.environments[i],
                                                            "messages": episodes.messages[i]})
        with _reward_errors(fn, f"completion {i}: {completion!r}"):
            values.append(fn(prompt, completion, example, **extra))
    if not any(inspect.isawaitable(v) for v in values):
        return values
    results = _run_async(_gather(values))
    for i, result in enumerate(results):
        if isinstance(result, Exception):
            with _reward_errors(fn, f"completion {i}: {completions[i]!r}"):
                raise result
    return results


def _call_batch(fn: RewardFn, prompts, completions, examples, completion_ids,
                episodes: EpisodeContext | None) -> list:
    """TRL's: one call, by keyword; only the arguments it names unless it takes ``**kwargs``."""
    chat = [isinstance(p, list) for p in prompts]
    names = dict.fromkeys(k for e in examples for k in e if k not in NOT_COLUMNS)
    kwargs = {name: [e.get(name) for e in examples] for name in names}
    kwargs.update(prompts=list(prompts), completion_ids=None if completion_ids is None else list(completion_ids),
                  completions=[[{"role": "assistant", "content": c}] if is_chat else c
                               for c, is_chat in zip(completions, chat)])
    if episodes is not None:  # an episode's completion: every message after its prompt's
        kwargs.update(environments=list(episodes.environments), messages=list(episodes.messages),
                      completions=[m[len(p):] for p, m in zip(prompts, episodes.messages)])
    kwargs = _accepted(fn, kwargs)
    with _reward_errors(fn, f"a batch of {len(completions)} completions"):
        values = fn(**kwargs)
        values = _run_async(_value(values)) if inspect.isawaitable(values) else values
        values = list(values)
    if len(values) != len(completions):
        raise VllmTrainError(f"reward {reward_name(fn)} returned {len(values)} values for {len(completions)} "
                             f"completions (one float per completion)")
    return values


@contextlib.contextmanager
def _reward_errors(fn: RewardFn, where: str):
    """A reward's own exception -> one line naming the function and `where` (our errors pass as they are)."""
    try:
        yield
    except VllmTrainError:
        raise
    except Exception as exc:
        raise VllmTrainError(f"reward {reward_name(fn)} raised {type(exc).__name__}: {exc} ({where})") from None


async def _value(value):
    return await value if inspect.isawaitable(value) else value


async def _gather(values: list) -> list:
    """Each value awaited (together); an exception in place of the value it stopped."""
    return await asyncio.gather(*[_value(v) for v in values], return_exceptions=True)


def _run_async(coroutine):
    """Run `coroutine` to its end on an event loop of its own thread: the caller may already be inside
    a running loop (a notebook), where ``asyncio.run`` refuses."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
