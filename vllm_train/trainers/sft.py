"""LoRATrainer: supervised fine-tuning of a LoRA adapter, served by one vLLM engine.

Training runs on a Hugging Face model with our LoRA layers (`vllm_train.lora`); inference runs in one
vLLM engine created on first use and kept for the trainer's life. The adapter the trainer holds is
published to that engine as a new version whenever it changed (never a stale one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_train import distributed, hub, models
from vllm_train.config import LoRATrainConfig
from vllm_train.data.causal_lm import IGNORE_INDEX, CausalLMDataset, collate_causal_lm
from vllm_train.lora.peft_io import ADAPTER_WEIGHTS, adapter_card
from vllm_train.metrics import plot_curves
from vllm_train.trainers import common, loop


def _per_token(sums: dict[str, float], steps: int, seconds: float) -> dict[str, float]:
    """SFT logs the NLL per completion token over the logging window (not a mean of per-step means)."""
    tokens = sums["num_tokens"]
    return {"loss": sums["loss"] / max(1, tokens), "tokens_per_sec": tokens / max(seconds, 1e-9)}


class LoRATrainer:
    """Hybrid trainer: Hugging Face model + our LoRA layers for training, vLLM for inference."""

    def __init__(self, model_name: str, train_config: LoRATrainConfig, *, engine=None, engine_options=None,
                 on_save: Callable[[Path], None] | None = None, tensorboard: bool = True, progress: bool = True,
                 revision: str | None = None):
        self.model_name = hub.model_reference(model_name)  # the base a saved adapter names: hub id or absolute path
        self.model_path = models.resolve_model(model_name, revision)  # the local directory HF and vLLM load
        self.config = train_config
        self.engine_options = engine_options  # for the engine this trainer creates on first use
        self._engine = engine  # or share an existing VLLMEngine (one engine per process)
        self._owns_engine = engine is None
        self.on_save = on_save  # called with each adapter dir written (checkpoints and final), e.g. a push
        self.tensorboard = tensorboard
        self.progress = progress
        self.model = None
        self.tokenizer = None
        self.injector = None
        self.global_step = 0
        self._adapter_version = 0  # bumped whenever the LoRA weights change
        self._served = None  # (version, AdapterRef) last published to the engine
        self._path_adapters: dict[str, Any] = {}

    # ---- setup -------------------------------------------------------------------------------
    def setup_training(self, adapter: str | None = None) -> None:
        """Load the base model, freeze it, inject LoRA layers (optionally loading `adapter`)."""
        torch.manual_seed(self.config.seed)
        self.model, self.tokenizer, self.injector = models.load_policy(self.model_path, self.config, adapter)
        self._adapter_version += 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return models.autocast_for(self.model)

    # ---- training ----------------------------------------------------------------------------
    def train(self, dataset: Any, eval_dataset: Any = None) -> dict:
        """Fine-tune on `dataset` (a CausalLMDataset, records, a file path or an HF dataset).

        Gradient accumulation normalises by the number of completion tokens in the whole accumulated
        batch (over all ranks of a data-parallel run), so the loss is the same whatever the micro-batch
        split and the number of ranks. Returns the final metrics.
        """
        if self.model is None:
            self.setup_training()
        dataset = self._as_dataset(dataset)
        eval_dataset = self._as_dataset(eval_dataset) if eval_dataset is not None else None
        optimizer = common.make_optimizer(self.injector.get_trainable_params(), self.config)

        def step(group: list[list[int]], group_examples: int) -> dict[str, float]:
            self._adapter_version += 1  # this step changes the weights the engine must serve
            loss_sum, n_tokens = self._accumulate(dataset, group)
            return {"loss": loss_sum, "num_tokens": n_tokens}

        last, self.global_step = loop.run_epochs(
            step, model=self.model, trainable=self.injector, optimizer=optimizer, config=self.config,
            data=dataset, model_name=self.model_name, kind="sft", desc="sft", summarize=_per_token,
            postfix=lambda m: {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"},
            evaluate=(lambda: self.evaluate(eval_dataset)) if eval_dataset is not None else None,
            on_checkpoint=(lambda path: self.on_save(path / "adapter")) if self.on_save else None,
            resolved={"train_examples": len(dataset)}, tensorboard=self.tensorboard, progress=self.progress)
        run_dir = Path(self.config.output_dir)
        self.save_lora(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", ["loss", "eval_loss", "lr", "grad_norm"],
                    title=f"SFT of {Path(self.model_name).name}")
        return last

    def _accumulate(self, dataset, group: list[list[int]]) -> tuple[float, int]:
        """Forward/backward over this rank's share of one accumulation group; returns (summed token NLL,
        token count) of the share. The loss is divided by the token count of the whole group (all ranks)."""
        batches = [collate_causal_lm([dataset[i] for i in idx], self.tokenizer.pad_token_id) for idx in group]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        group_tokens = distributed.all_reduce_sum({"tokens": n_tokens})["tokens"]
        loss_sum = 0.0
        for b in batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            logps, _ = models.label_logprobs(self.model, b["input_ids"], b["attention_mask"], b["labels"],
                                             self._autocast)
            loss = -logps.sum() / max(1, group_tokens)
            loss.backward()
            loss_sum += -logps.sum().item()
        return loss_sum, n_tokens

    @torch.no_grad()
    def evaluate(self, dataset: Any, batch_size: int | None = None) -> dict:
        """Token-level loss, perplexity and next-token accuracy on completion tokens of `dataset`."""
        from vllm_train.evaluation import lm_metrics

        return lm_metrics(self.model, self.tokenizer, self._as_dataset(dataset),
                          batch_size or self.config.batch_size, self._autocast)

    def _as_dataset(self, data: Any) -> CausalLMDataset:
        if isinstance(data, CausalLMDataset):
            return data
        if self.tokenizer is None:
            self.tokenizer = models.load_tokenizer(self.model_path)
        return CausalLMDataset(data, self.tokenizer, self.config.max_length)

    # ---- saving ------------------------------------------------------------------------------
    def save_lora(self, path: str | Path) -> Path:
        """Save the adapter in PEFT format (vLLM- and PEFT-loadable) with a short model card. Under
        torchrun every rank calls it and rank 0 alone writes (`LoRAInjector.save`)."""
        card = adapter_card(self.model_name, "sft", self.config, self.global_step)
        out = self.injector.save(path, self.model_name, card=card)
        if self.on_save and distributed.is_main():
            self.on_save(out)
        return out

    # ---- inference ---------------------------------------------------------------------------
    @property
    def engine(self):
        """The one vLLM engine of this trainer (created on first use)."""
        if self._engine is None:
            from vllm_train.engine.llm import EngineOptions, VLLMEngine

            options = self.engine_options or EngineOptions(max_lora_rank=self.config.engine_max_lora_rank,
                                                           seed=self.config.seed,
                                                           tensor_parallel_size=self.config.tensor_parallel_size)
            self._engine = VLLMEngine(self.model_path, options)
        return self._engine

    def current_adapter(self):
        """The trainer's current weights as an adapter in the engine (re-published only if changed)."""
        if self._served is None or self._served[0] != self._adapter_version:
            full, shards = self.injector.sync_states()
            ref = self.engine.sync_adapter(full, self.injector.peft_config(self.model_name), "trainer", shards)
            self._served = (self._adapter_version, ref)
        return self._served[1]

    def generate(self, prompts: Sequence[str | list[dict]], lora_path: str | None = None, **kwargs):
        """Generate with vLLM. Returns vLLM's ``RequestOutput`` list (``o.outputs[0].text``).

        `lora_path` serves that adapter directory; without it, the trainer's own adapter is served if
        the trainer has one (set up or trained), else the base model. Pass ``lora_path="base"`` for the
        base model. `kwargs` are vLLM ``SamplingParams`` fields (temperature, max_tokens, n, seed, ...).
        """
        if lora_path == "base" or (lora_path is None and self.injector is None):
            adapter = None
        elif lora_path is None:
            adapter = self.current_adapter()
        else:
            weights = Path(lora_path) / ADAPTER_WEIGHTS
            key = f"{Path(lora_path).resolve()}@{weights.stat().st_mtime_ns if weights.exists() else 0}"
            if key not in self._path_adapters:
                models.adapter_rank(lora_path, self.model_path)  # one-line error for a bad adapter dir
                self._path_adapters[key] = self.engine.load_adapter(lora_path, family=f"path{len(self._path_adapters)}")
            adapter = self._path_adapters[key]
        return self.engine.generate_raw(prompts, kwargs, adapter)

    def close(self) -> None:
        if self._engine is not None and self._owns_engine:
            self._engine.close()
        self._engine = None
