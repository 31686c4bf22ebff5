"""The worker extension of a `TrainableEngine` whose engine core is another process on CPU with LoRA.
vLLM takes one ``worker_extension_cls``, and such an engine needs two of ours in its worker: the CPU LoRA
ops (`cpu_lora_worker`, installed when imported) and the ``trainable`` load format registered (`loader`).
Its own module: `cpu_lora_worker` installs the ops when imported, which only vLLM's worker may do."""

from __future__ import annotations

from vllm_train.engine.cpu_lora_worker import CpuLoRAOps
from vllm_train.engine.loader import TrainableWorkerExtension


class TrainableCpuLoRAWorker(TrainableWorkerExtension, CpuLoRAOps):
    """Both extensions' RPCs: ``trainable_loader_info`` and ``vllm_train_cpu_lora_ops``."""
