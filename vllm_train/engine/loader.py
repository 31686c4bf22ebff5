"""`TrainableModelLoader`: vLLM's ``load_format="trainable"``.

The seed plan's loader injected trainable LoRA layers into vLLM's model and backpropagated through
vLLM's inference kernels. That cannot work on the CPU build (linear weights are packed into oneDNN
handles after loading; ``layer.weight`` is an empty tensor) and would fight vLLM's own LoRA layers,
CUDA graphs and KV cache on GPU. So this loader does what a loader should: it loads the weights exactly
as vLLM's default loader does, and then *publishes* the live model to the training side:

- ``live_model(path)`` returns the loaded vLLM model when the engine runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); `TrainableEngine` uses it to report what vLLM holds and, on
  CUDA, to check which base weights a training copy could share as views (DESIGN.md §2);
- `TrainableWorkerExtension` (pass its qualified name as ``worker_extension_cls``) imports this module
  inside vLLM's worker process, which is where ``register_model_loader`` must run for a multiprocess
  engine, and answers ``collective_rpc("trainable_loader_info")`` from there.

Training itself runs on a Hugging Face copy with our LoRA layers, and new adapter versions reach vLLM's
LoRA slots through `VLLMEngine.sync_adapter` (the fast path in `fast_sync.py`).
"""

from __future__ import annotations

import copy
import os

from torch import nn
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

LOAD_FORMAT = "trainable"
WORKER_EXTENSION = "vllm_train.engine.loader.TrainableWorkerExtension"

# model path -> the vLLM model loaded by `TrainableModelLoader` in this process (newest wins)
_LIVE_MODELS: dict[str, nn.Module] = {}


@register_model_loader(LOAD_FORMAT)
class TrainableModelLoader(DefaultModelLoader):
    """vLLM's default weight loading, plus a process-local handle on the loaded model.

    Accepts no ``model_loader_extra_config`` keys of its own; the default loader's keys pass through.
    """

    def __init__(self, load_config):
        default_config = copy.copy(load_config)
        default_config.load_format = "auto"  # the default loader picks weight files by format name
        super().__init__(default_config)

    def load_weights(self, model: nn.Module, model_config) -> None:
        super().load_weights(model, model_config)
        _LIVE_MODELS[str(model_config.model)] = model


def live_model(model_path: str) -> nn.Module | None:
    """The vLLM model that `TrainableModelLoader` loaded for `model_path` in this process, if any."""
    return _LIVE_MODELS.get(str(model_path))


def loader_info(model: nn.Module | None) -> dict:
    return {"pid": os.getpid(), "loaded_by_trainable_loader": model is not None,
            "model_class": type(model).__name__ if model is not None else None}


class TrainableWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``). Importing it registers the loader in
    the worker process; its methods are reachable with ``llm.collective_rpc(name)``."""

    def trainable_loader_info(self) -> dict:
        """Which process loaded which model class with `TrainableModelLoader` (pid, class name)."""
        loaded = list(_LIVE_MODELS.values())
        return loader_info(loaded[-1] if loaded else None)
