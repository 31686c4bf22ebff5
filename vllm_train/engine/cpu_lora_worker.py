"""Imported by vLLM inside its own worker process, as the module of the worker extension class that a
multiprocess CPU engine (`engine.llm`) and every `vllm-train serve` CPU replica (`engine.replicas`) name
with ``worker_extension_cls``: importing it installs our CPU LoRA ops there (`engine.cpu_lora_ops`: rows
of base-model requests get no adapter's weights). A version whose ops are not verified keeps vLLM's, with
one warning line in the engine's log."""

from __future__ import annotations

import sys

import vllm

from vllm_train.engine import cpu_lora_ops

NOT_INSTALLED = cpu_lora_ops.install(vllm.__version__)  # None: installed in this process
if NOT_INSTALLED:
    print(f"vllm-train: warning: vLLM's own CPU LoRA ops stay ({NOT_INSTALLED}): a batch that mixes base-model "
          f"and adapter requests may compute the base rows with an adapter's weights", file=sys.stderr, flush=True)


class CpuLoRAOps:
    """Mixed into vLLM's worker class; `collective_rpc("vllm_train_cpu_lora_ops")` asks each worker
    whether our ops are installed there."""

    def vllm_train_cpu_lora_ops(self) -> str | None:
        return NOT_INSTALLED
