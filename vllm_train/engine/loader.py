"""`TrainableModelLoader`: vLLM's ``load_format="trainable"``, which loads exactly as vLLM's default loader.

What it does, plainly: it is vLLM's `DefaultModelLoader` registered under the name ``trainable`` and
nothing more. It reads the same weight files into the same vLLM model, and keeps no reference to it.
`TrainableEngine` builds its engine through it, and the name stays so that the seed plan's
``load_format="trainable"`` keeps working.

What it does not do: make vLLM's model trainable. The seed plan's loader injected LoRA layers into vLLM's
modules and backpropagated through its inference kernels. That cannot work on the CPU build (linear
weights are packed into oneDNN handles after loading; ``layer.weight`` is an empty tensor) and would fight
vLLM's own LoRA layers, CUDA graphs and KV cache on GPU. Training runs on a Hugging Face copy with our
LoRA layers (`models.load_policy`); on CUDA that copy's frozen base weights are views of the engine's own
tensors, found through vLLM's ``apply_model`` (`engine/shared_base.py`), not through this loader; new
adapter versions reach vLLM's LoRA slots through `VLLMEngine.sync_adapter`.

A multiprocess engine loads in vLLM's worker process, where ``register_model_loader`` must have run:
`TrainableWorkerExtension` (its qualified name as ``worker_extension_cls``) imports this module there, and
``collective_rpc("trainable_loader_info")`` says which process loaded which model class through it.
"""

from __future__ import annotations

import copy
import os

from torch import nn
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

LOAD_FORMAT = "trainable"
WORKER_EXTENSION = "vllm_train.engine.loader.TrainableWorkerExtension"
# the same with our CPU LoRA ops (a multiprocess CPU engine with LoRA; vLLM takes one extension class)
CPU_LORA_WORKER_EXTENSION = "vllm_train.engine.trainable_cpu_worker.TrainableCpuLoRAWorker"

_LOADED: dict[str, str] = {}  # model path -> the class this process's TrainableModelLoader loaded (no model kept)


@register_model_loader(LOAD_FORMAT)
class TrainableModelLoader(DefaultModelLoader):
    """vLLM's default weight loading under ``load_format="trainable"`` (see the module docstring: the
    model it loads is vLLM's inference model, not trained through).

    Accepts no ``model_loader_extra_config`` keys of its own; the default loader's keys pass through.
    """

    def __init__(self, load_config):
        default_config = copy.copy(load_config)
        default_config.load_format = "auto"  # the default loader picks weight files by format name
        super().__init__(default_config)

    def load_weights(self, model: nn.Module, model_config) -> None:
        super().load_weights(model, model_config)
        _LOADED[str(model_config.model)] = type(model).__name__


class TrainableWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``). Importing it registers the loader in
    the worker process; its methods are reachable with ``llm.collective_rpc(name)``."""

    def trainable_loader_info(self) -> dict:
        """Which process loaded which model class through `TrainableModelLoader` (pid, class name)."""
        loaded = list(_LOADED.values())
        return {"pid": os.getpid(), "loaded_by_trainable_loader": bool(loaded),
                "model_class": loaded[-1] if loaded else None}
