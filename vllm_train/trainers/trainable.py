"""`TrainableEngine`: train a LoRA adapter and generate with it, on one vLLM engine.

The seed plan shares one model between training and inference. The engine here is the one vLLM engine
(loaded through `TrainableModelLoader`, ``load_format="trainable"``: vLLM's default loading, see
`engine/loader.py`), and training runs on a Hugging Face
model with our LoRA layers, because vLLM's inference modules cannot be trained through: on CPU its
linear weights are packed into oneDNN handles, and on GPU vLLM's LoRA kernels, CUDA graphs and KV cache
are inference-only. On CUDA that model's frozen base weights are views of vLLM's own tensors, so the
base is held once (`engine/shared_base.py`; elsewhere a separate copy, and one stderr line says which).
The adapter is shared too: after a `train_step` the next `generate` serves the new weights, written
straight into the adapter's vLLM LoRA slot (`VLLMEngine.sync_adapter`, fast path: ~0.5 ms CPU, ~1.2 ms
H200 for a 0.5B model's r=16 all-linear adapter, no files).

    engine = TrainableEngine("path/to/model", LoRATrainConfig(rank=8))
    stats = engine.train_step([{"prompt": "2+2=", "completion": "4"}])   # {"loss": ..., ...}
    outputs = engine.generate(["2+2="], max_tokens=4)                     # vLLM RequestOutputs

Under torchrun (``torchrun --nproc-per-node N script.py``) every rank makes its own TrainableEngine (its
own vLLM engine, vLLM's external launcher) and passes its own share of each batch to `train_step`
(`vllm_train.distributed.local_share`): the loss is normalised by the token count of all ranks' shares and
the LoRA gradients are summed over ranks, so every rank holds the same adapter, the one a single process
would train on the whole batch. `save_lora` writes from rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vllm_train import distributed, hub, models
from vllm_train.config import LoRATrainConfig
from vllm_train.data.causal_lm import CausalLMDataset, collate_causal_lm
from vllm_train.engine import cpu_lora_ops
from vllm_train.engine.llm import AdapterRef, EngineOptions, VLLMEngine
from vllm_train.trainers import common
from vllm_train.trainers.shared_policy import load_policy_over_engine


class TrainableEngine:
    """One vLLM engine + a trainable LoRA policy whose newest weights that engine always serves."""

    family = "trainable"

    def __init__(self, model_name: str, train_config: LoRATrainConfig, engine_options: EngineOptions | None = None):
        from vllm_train.engine import loader  # registers load_format="trainable" in this process

        self.model_name = hub.model_reference(model_name)  # the base a saved adapter names: hub id or absolute path
        self.model_path = models.resolve_model(model_name)  # the local directory HF and vLLM load
        self.config = train_config
        distributed.init()  # under torchrun: join the ranks' group and take this rank's GPU before vLLM starts
        torch.manual_seed(train_config.seed)
        options = engine_options or EngineOptions(max_lora_rank=train_config.engine_max_lora_rank,
                                                  seed=train_config.seed)
        # the worker extension imports the loader module inside vLLM's worker (a multiprocess engine); on
        # CPU with LoRA the one that also installs our LoRA ops there (vLLM takes one extension class)
        extension = loader.CPU_LORA_WORKER_EXTENSION if cpu_lora_ops.needs_worker_extension(options) \
            else loader.WORKER_EXTENSION
        options.extra = {"load_format": loader.LOAD_FORMAT, "worker_extension_cls": extension, **options.extra}
        self.engine = VLLMEngine(self.model_path, options)
        # after the engine: on CUDA the policy's frozen base is a view of the engine's weights (held once)
        self.model, self.tokenizer, self.injector, self.shared_base = load_policy_over_engine(
            self.model_path, train_config, self.engine)
        self.params = self.injector.get_trainable_params()
        self.optimizer = common.make_optimizer(self.params, train_config)
        self.peft_config = self.injector.peft_config(self.model_name)
        self.step = 0
        self._served: tuple[int, AdapterRef] | None = None  # (step, adapter) the engine serves

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _as_batch(self, batch: Any) -> dict[str, torch.Tensor]:
        """A collated batch (input_ids, attention_mask, labels), or SFT records to tokenize and collate."""
        if isinstance(batch, dict) and "input_ids" in batch:
            return {k: v.to(self.device) for k, v in batch.items()}
        dataset = CausalLMDataset(list(batch), self.tokenizer, self.config.max_length)
        collated = collate_causal_lm([dataset[i] for i in range(len(dataset))], self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in collated.items()}

    def train_step(self, batch: Any) -> dict:
        """One optimizer step of completion-token cross-entropy on `batch`. Returns loss, grad_norm,
        num_tokens and step. The engine serves the new weights from the next `generate` on."""
        batch = self._as_batch(batch)
        self.model.train()
        # chunked over the head where it allows: never the (B, T, V) logits of a 152k vocabulary
        logps, mask = models.label_logprobs(self.model, batch["input_ids"], batch["attention_mask"],
                                            batch["labels"])  # (B, T-1) each
        # one loss over every rank's share (a single process: its batch): normalised by all their tokens,
        # the gradients (and the loss) summed over ranks before the step
        num_tokens = int(distributed.all_reduce_sum({"tokens": int(mask.sum())})["tokens"])
        loss = -logps.sum() / max(1, num_tokens)
        loss.backward()
        loss_value, = distributed.all_reduce_grads(self.params, loss.item())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss_value, "grad_norm": float(grad_norm), "num_tokens": num_tokens, "step": self.step}

    def current_adapter(self) -> AdapterRef:
        """The engine's handle on the newest weights (synced only when a step changed them)."""
        if self._served is None or self._served[0] != self.step:
            full, shards = self.injector.sync_states()  # the one sync recipe SFT and RL use too
            ref = self.engine.sync_adapter(full, self.peft_config, self.family, shards)
            self._served = (self.step, ref)
        return self._served[1]

    def generate(self, prompts: Sequence[str | list[int] | list[dict]], **kwargs):
        """Generate with the newest adapter. `kwargs` are vLLM ``SamplingParams`` fields; returns vLLM's
        ``RequestOutput`` list."""
        return self.engine.generate_raw(prompts, kwargs, self.current_adapter())

    def save_lora(self, path: str) -> str:
        """Write the adapter in PEFT format (loads in PEFT, vLLM and `vllm serve --lora-modules`). Under
        torchrun rank 0 writes (every rank holds the same adapter) and the others wait for it."""
        saved = self.injector.save(path, self.model_name)  # every rank calls it; rank 0 writes
        distributed.barrier()  # the others return once the files exist
        return str(saved)

    def close(self) -> None:
        self.engine.close()
