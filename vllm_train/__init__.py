"""vllm-train: fine-tune LoRA adapters (SFT, DPO, reward models, PPO/GRPO) and serve them with vLLM
the moment they are trained.

Public API (the seed plan's contract). Importing this package does not import vLLM; only
`vllm_train.engine` does, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vllm_train import quiet as _quiet

__version__ = "0.1.0"

# Before torch, transformers or vLLM is imported (they read these settings once): only our own lines show.
_quiet.quiet_libraries(_quiet.verbose_requested())


def set_verbose(verbose: bool = True) -> None:
    """Show vLLM's, torch's and transformers' own logs, warnings and loading bars (False: fold them again).
    ``VLLM_TRAIN_VERBOSE=1`` does the same from the start; settings the user exported always win."""
    _quiet.quiet_libraries(verbose)


_EXPORTS = {
    "LoRATrainConfig": "vllm_train.config",
    "LoRATrainer": "vllm_train.trainers.sft",
    "CausalLMDataset": "vllm_train.data.causal_lm",
    "collate_causal_lm": "vllm_train.data.causal_lm",
    "PreferenceDataset": "vllm_train.data.preference",
    "HubDataset": "vllm_train.data.io",
    "CausalLMLoss": "vllm_train.losses.causal_lm",
    "DPOLoss": "vllm_train.losses.dpo",
    "RLHFConfig": "vllm_train.config",
    "RLHFTrainer": "vllm_train.trainers.rl",
    "TrainableLoRALinear": "vllm_train.lora.layers",
    "LoRAInjector": "vllm_train.lora.injector",
    "TrainableModelLoader": "vllm_train.engine.loader",
    "TrainableEngine": "vllm_train.trainers.trainable",
    "VLLMEngine": "vllm_train.engine.llm",
    "EngineOptions": "vllm_train.engine.llm",
    "VllmTrainError": "vllm_train.errors",
}

__all__ = sorted([*_EXPORTS, "set_verbose"])


def __getattr__(name: str):
    # Lazy: `import vllm_train` stays cheap, and names whose module needs vLLM import it only when used.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vllm_train' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from vllm_train.config import LoRATrainConfig, RLHFConfig  # noqa: F401
    from vllm_train.data.causal_lm import CausalLMDataset, collate_causal_lm  # noqa: F401
    from vllm_train.data.io import HubDataset  # noqa: F401
    from vllm_train.data.preference import PreferenceDataset  # noqa: F401
    from vllm_train.engine.llm import EngineOptions, VLLMEngine  # noqa: F401
    from vllm_train.engine.loader import TrainableModelLoader  # noqa: F401
    from vllm_train.errors import VllmTrainError  # noqa: F401
    from vllm_train.lora.injector import LoRAInjector  # noqa: F401
    from vllm_train.lora.layers import TrainableLoRALinear  # noqa: F401
    from vllm_train.losses.causal_lm import CausalLMLoss  # noqa: F401
    from vllm_train.losses.dpo import DPOLoss  # noqa: F401
    from vllm_train.trainers.rl import RLHFTrainer  # noqa: F401
    from vllm_train.trainers.sft import LoRATrainer  # noqa: F401
    from vllm_train.trainers.trainable import TrainableEngine  # noqa: F401
