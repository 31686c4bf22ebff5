"""What vLLM, torch and transformers print, as a library and on the command line.

A user of vllm-train sees its own lines and progress bars; vLLM's start-up log (~35 lines per engine, one a
3 kB config dump), torch's C++ warnings (NUMA binding), transformers' weight-loading bars and the
libraries' FutureWarnings are not actionable for them. `import vllm_train` therefore folds them to errors
(`quiet_libraries`), and the engine and model loaders re-apply what must be set after a library is imported
(`settle`). ``VLLM_TRAIN_VERBOSE=1`` or ``vllm_train.set_verbose()`` (the CLI's ``--verbose``) shows them.

A setting the user made wins: an environment variable exported before (VLLM_LOGGING_LEVEL,
TRANSFORMERS_VERBOSITY, TORCH_CPP_LOG_LEVEL, ...), HF_HUB_DISABLE_PROGRESS_BARS, a level given to the
"vllm" logger. Only the variables this module set itself are changed again. The environment is read by
each library when it is imported, so the settings hold fully when vllm_train is imported first; vLLM's
engine processes inherit them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "VLLM_TRAIN_VERBOSE"
NOISY_MODULES = r"(vllm|torch|transformers|huggingface_hub|peft|tokenizers)(\.|$)"  # whose warnings are folded
_set_by_us: dict[str, str] = {}  # environment variables this module set (the user's are never touched)
_state = {"verbose": False}


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def verbose() -> bool:
    """Whether the libraries' own logs are shown (`quiet_libraries(True)`, VLLM_TRAIN_VERBOSE=1)."""
    return _state["verbose"]


def _default(name: str, value: str | None) -> None:
    """Set (None: unset) an environment variable, unless the user set it."""
    if name in os.environ and name not in _set_by_us:
        return
    if value is None:
        os.environ.pop(name, None)
        _set_by_us.pop(name, None)
    else:
        os.environ[name] = _set_by_us[name] = value


def quiet_libraries(verbose: bool, logs_to_files: bool = False) -> None:
    """Fold the libraries' info, warnings and loading bars to errors, or (`verbose`) leave them on.
    `logs_to_files`: vLLM's processes write their logs to files (`serve`): vLLM keeps its own level."""
    _state["verbose"] = verbose
    _default("TOKENIZERS_PARALLELISM", "false")
    _default("TRANSFORMERS_VERBOSITY", "warning" if verbose else "error")
    _default("HF_DATASETS_DISABLE_PROGRESS_BARS", None if verbose else "1")  # turning downloads into a cache
    _default("TORCH_CPP_LOG_LEVEL", None if verbose or logs_to_files else "ERROR")
    _default("VLLM_LOGGING_LEVEL", None if logs_to_files else "INFO" if verbose else "ERROR")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        if verbose:  # in front of the "ignore" below
            warnings.filterwarnings("default", category=category, module=NOISY_MODULES)
        else:  # after the filters already there: a user's own (warnings.simplefilter("error"), -W) win
            warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES, append=True)
    settle()


def settle() -> None:
    """What the environment cannot reach once a library is imported: vLLM's logger level, and transformers'
    weight-loading bars (off while quiet; hub download bars stay, unless the user turned them off)."""
    if "VLLM_LOGGING_LEVEL" in _set_by_us or "VLLM_LOGGING_LEVEL" not in os.environ:
        logger = logging.getLogger("vllm")
        if logger.level in (logging.NOTSET, logging.INFO, logging.ERROR):  # vLLM's own default, or ours
            logger.setLevel(logging.INFO if _state["verbose"] else logging.ERROR)
    if "transformers" in sys.modules and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as transformers_logging

        if _state["verbose"]:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()
            enable_progress_bars()  # transformers turned the hub's off too: downloads keep their bars
