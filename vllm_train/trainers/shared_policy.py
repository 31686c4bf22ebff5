"""The training policy over the engine's base: `models.load_policy` whose frozen base weights are views of
the in-process vLLM engine's (`vllm_train.engine.shared_base`), so a GPU holds the base once; or, where
that is not possible, a separate copy. One line on stderr says which, and why."""

from __future__ import annotations

import sys

from vllm_train import distributed, models
from vllm_train.config import LoRATrainConfig
from vllm_train.engine import shared_base
from vllm_train.engine.llm import VLLMEngine


def load_policy_over_engine(model_path: str, lora_config: LoRATrainConfig, engine, adapter: str | None = None,
                            not_shared: str | None = None):
    """(model, tokenizer, injector, `SharedBase`). `engine`: the rollout engine (or None); `not_shared`:
    why the base cannot be shared, when the caller knows already (the engine is then not asked)."""
    reason = not_shared or _reason_not_to_try(engine, lora_config)
    report = shared_base.SharedBase(reason=reason)  # replaced by the outcome when sharing is tried

    def views(hf_model, device):
        nonlocal report
        report = shared_base.share_with_engine(engine, hf_model, device)
        return report.views

    model, tokenizer, injector = models.load_policy(model_path, lora_config, adapter,
                                                    base_views=None if reason else views)
    if distributed.is_main():
        print(report.summary(), file=sys.stderr, flush=True)
    return model, tokenizer, injector, report


def _reason_not_to_try(engine, lora_config: LoRATrainConfig) -> str | None:
    if engine is None:
        return "no vLLM engine in this process"
    if not isinstance(engine, VLLMEngine):
        return f"the rollout engine is a {type(engine).__name__}, not a vLLM engine in this process"
    return shared_base.reason_not_to_share(engine.options, lora_config.tensor_parallel_size,
                                           models.pick_device_and_dtype(lora_config.precision)[1])
