"""Reward models: Bradley-Terry training of LoRA + a scalar head, saved for vLLM and for PEFT.

The model is the base loaded as ``*ForSequenceClassification`` with one label: the score is a linear
head (``score``, hidden -> 1, no bias) on the last non-padding token's hidden state. LoRA layers adapt
the body; the head is trained in full. The loss is -logsigmoid(r(chosen) - r(rejected)).

``save_reward_model(dir)`` writes two things:

* ``DIR/`` a merged ``LlamaForSequenceClassification``-style checkpoint (config with
  ``num_labels=1``, ``model.safetensors``, tokenizer): vLLM runs it as a pooling model
  (``vllm_train.engine.reward.RewardModelScorer``, i.e. ``LLM(..., runner="pooling").classify``), and
  ``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads it.
* ``DIR/adapter/`` the same model as a PEFT adapter (task_type SEQ_CLS; LoRA tensors plus the head
  as ``modules_to_save`` = ["score"]): ``PeftModel.from_pretrained(AutoModelForSequenceClassification
  .from_pretrained(BASE, num_labels=1), DIR/adapter)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vllm_train import distributed, hub, models, quiet, run_manifest
from vllm_train.config import LoRATrainConfig, RewardModelConfig
from vllm_train.data.preference import PreferenceDataset, collate_preference
from vllm_train.errors import VllmTrainError
from vllm_train.loading import library_errors
from vllm_train.lora.injector import LoRAInjector
from vllm_train.lora.layers import merged_state_dict
from vllm_train.lora.peft_io import PEFT_PREFIX, read_adapter_dir, write_adapter_dir
from vllm_train.lora.validate import validate_adapter
from vllm_train.losses.dpo import base_preference_loss, bradley_terry_loss
from vllm_train.metrics import plot_curves
from vllm_train.models import pair_logps, pooled_hidden
from vllm_train.outputs import save_weights
from vllm_train.trainers import loop
from vllm_train.trainers.common import Checkpointable, make_optimizer

HEAD = "score"


HEAD_KEY = f"{PEFT_PREFIX}{HEAD}.weight"


class RewardModelParams(Checkpointable):
    """The trainable state of a reward model: LoRA layers + head, saved as one PEFT adapter (the head in
    ``modules_to_save``)."""

    def __init__(self, injector: LoRAInjector, head: torch.nn.Linear):
        self.injector = injector
        self.head = head

    def get_trainable_params(self) -> list[torch.nn.Parameter]:
        return self.injector.get_trainable_params() + [self.head.weight]

    def save(self, path: str | Path, base_model_name_or_path: str | None = None, card: str | None = None) -> Path:
        if not distributed.is_main():  # every rank holds the same weights (data parallel): rank 0 writes
            return Path(path)
        state = {**self.injector.peft_state_dict(), HEAD_KEY: self.head.weight.detach().float().contiguous().cpu()}
        config = {**self.injector.peft_config(base_model_name_or_path), "task_type": "SEQ_CLS",
                  "modules_to_save": [HEAD]}
        return write_adapter_dir(path, state, config, card)

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        self.injector.load(path)
        _, state = read_adapter_dir(path)
        if HEAD_KEY not in state:
            raise VllmTrainError(f"{path}: not a reward-model adapter (no {HEAD_KEY})")
        self.head.weight.copy_(state[HEAD_KEY])


def load_reward_model(model_name: str, config: LoRATrainConfig, adapter: str | None = None):
    """(model, tokenizer, params): the base as a 1-label sequence classifier, LoRA injected, head trainable."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = models.load_tokenizer(model_name)
    adapter = hub.resolve(adapter, what="adapter") if adapter else None  # a hub id: its snapshot directory
    if adapter:
        validate_adapter(adapter, model_name)
    distributed.init()  # under torchrun: join the ranks' group and take this rank's GPU before loading
    if config.tensor_parallel_size > 1:
        raise VllmTrainError("tensor_parallel_size: reward models train data parallel only (the merged save "
                             "needs the whole model on one rank)")
    device, dtype = models.pick_device_and_dtype(config.precision)
    quiet.settle()  # transformers is imported now: its weight-loading bars follow the quiet setting
    with library_errors(model_name):
        model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=1, dtype=dtype).to(device)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model.config.use_cache = False
    injector = LoRAInjector(config)
    injector.inject(model)  # freezes everything, head included
    head = model.get_submodule(HEAD)
    head.float().weight.requires_grad_(True)
    for lora in injector.lora_layers.values():
        lora.float()
    params = RewardModelParams(injector, head)
    if adapter:
        params.load(adapter)
    return model, tokenizer, params


def batch_scores(model, batch: dict, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Scores of the (2B, T) rows of a `collate_preference` batch, shape (2B,), fp32."""
    with autocast():
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, 0].float()


def base_preference_margins(model_name: str, dataset, pad_token_id: int, device, dtype,
                            batch_size: int = 64) -> torch.Tensor:
    """log p_base(chosen completion) - log p_base(rejected completion) for every pair, (N,) fp32: the base
    LM's own preference (the plain causal LM, i.e. the reward model's body with the adapter off)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype).to(device)
    chosen, rejected = pair_logps(base, dataset, pad_token_id, batch_size)
    return chosen - rejected


@torch.no_grad()
def pair_scores(model, dataset: PreferenceDataset, pad_token_id: int,
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_N, rejected_N) reward scores of every pair, fp32 CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_preference([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                   pad_token_id)
        c, r = batch_scores(model, batch, device).cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


class RewardModelTrainer:
    """Bradley-Terry reward model: LoRA on the body + a scalar head, on preference pairs."""

    def __init__(self, model_name: str, config: RewardModelConfig, *, tensorboard: bool = True, progress: bool = True,
                 revision: str | None = None):
        self.model_name = hub.model_reference(model_name)  # the base a saved adapter names: hub id or absolute path
        self.model_path = models.resolve_model(model_name, revision)  # the local directory HF loads
        self.config = config
        self.tensorboard = tensorboard
        self.progress = progress
        self.model = self.tokenizer = self.params = None
        self.aux_head = self.base_margins = None  # base_preference_coef > 0: training-only head + its targets
        self.global_step = 0

    def setup_training(self, adapter: str | None = None) -> None:
        torch.manual_seed(self.config.seed)
        self.model, self.tokenizer, self.params = load_reward_model(self.model_path, self.config, adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return models.autocast_for(self.model)

    def train(self, dataset: Any, eval_dataset: Any = None) -> dict:
        """Train on preference pairs, save to ``output_dir`` (merged model + adapter/), return metrics."""
        if self.model is None:
            self.setup_training()
        c = self.config
        dataset = self._as_dataset(dataset)
        eval_dataset = self._as_dataset(eval_dataset) if eval_dataset is not None else None
        head_lr = c.head_lr if isinstance(c, RewardModelConfig) else c.learning_rate
        heads = [self.params.head.weight]
        self.base_margins = self.aux_head = None
        if getattr(c, "base_preference_coef", 0.0) > 0:  # training-only second head (never saved)
            self.aux_head = torch.nn.Linear(self.model.config.hidden_size, 1, bias=False).to(self.device)
            torch.nn.init.zeros_(self.aux_head.weight)
            heads.append(self.aux_head.weight)
            self.base_margins = base_preference_margins(self.model_path, dataset, self.tokenizer.pad_token_id,
                                                        self.device, next(self.model.parameters()).dtype)
        optimizer = make_optimizer([{"params": self.params.injector.get_trainable_params()},
                                    {"params": heads, "lr": head_lr}], c)
        last, self.global_step = loop.run_epochs(
            lambda group, n_pairs: self._accumulate(dataset, group, n_pairs), model=self.model,
            trainable=self.params, optimizer=optimizer, config=c, data=dataset, model_name=self.model_name,
            kind="reward_model", desc="rm",
            postfix=lambda m: {"loss": f"{m['loss']:.4f}", "acc": f"{m['accuracy']:.2f}"},
            evaluate=(lambda: self.evaluate(eval_dataset)) if eval_dataset is not None else None,
            resolved={"train_pairs": len(dataset)}, tensorboard=self.tensorboard, progress=self.progress)
        run_dir = Path(c.output_dir)
        self.save_reward_model(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", ["loss", "accuracy", "eval_accuracy", "lr"],
                    title=f"Reward model on {Path(self.model_name).name}")
        return last

    def _accumulate(self, dataset, group: list[list[int]], n_pairs: int) -> dict[str, float]:
        """Forward/backward over this rank's share of one accumulation group; the loss is the mean over
        the group's `n_pairs` pairs (all ranks)."""
        totals: dict[str, float] = {}
        for idx in group:
            batch = collate_preference([dataset[i] for i in idx], self.tokenizer.pad_token_id)
            if self.aux_head is None:
                chosen_B, rejected_B = batch_scores(self.model, batch, self.device, self._autocast).chunk(2)
                loss, metrics = bradley_terry_loss(chosen_B, rejected_B)
            else:
                hidden_SH = pooled_hidden(self.model, batch, self.device, self._autocast).float()
                chosen_B, rejected_B = self.params.head(hidden_SH)[:, 0].chunk(2)
                loss, metrics = bradley_terry_loss(chosen_B, rejected_B)
                aux_chosen_B, aux_rejected_B = self.aux_head(hidden_SH)[:, 0].chunk(2)
                aux = base_preference_loss(aux_chosen_B, aux_rejected_B, self.base_margins[idx].to(self.device))
                loss = loss + self.config.base_preference_coef * aux
                metrics["base_preference_loss"] = aux.item()
            (loss * len(idx) / n_pairs).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / n_pairs
        return totals

    def evaluate(self, dataset: Any) -> dict:
        """Pairwise accuracy (chosen scored strictly higher) and mean margin on `dataset`."""
        dataset = self._as_dataset(dataset)
        chosen, rejected = pair_scores(self.model, dataset, self.tokenizer.pad_token_id, self.config.batch_size)
        _, m = bradley_terry_loss(chosen, rejected)
        return {"accuracy": m["accuracy"], "margin": m["margin"], "loss": m["loss"], "num_pairs": len(chosen)}

    def _as_dataset(self, data: Any) -> PreferenceDataset:
        if isinstance(data, PreferenceDataset):
            return data
        if self.tokenizer is None:
            self.tokenizer = models.load_tokenizer(self.model_path)
        return PreferenceDataset(data, self.tokenizer, self.config.max_length)

    def save_reward_model(self, path: str | Path) -> Path:
        """Write the merged sequence-classification model into `path` and the PEFT adapter into
        `path/adapter` (each file written to a temp name first, then renamed into place). The merged
        weights are written (to a temp dir, checked finite) before anything replaces the previous files,
        so a non-finite model fails the save and keeps the earlier ones. Rank 0 alone writes in a
        data-parallel run."""
        path = Path(path)
        if not distributed.is_main():
            return path
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".merged.tmp-", dir=path))
        try:
            save_weights(merged_state_dict(self.model), tmp / "model.safetensors", metadata={"format": "pt"})
            config = self.model.config
            config.architectures = [type(self.model).__name__]
            config.use_cache = True
            config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.params.save(path / "adapter", self.model_name, card=RM_CARD.format(base=self.model_name))
            names = sorted(p.name for p in tmp.iterdir())
            for name in ["model.safetensors"] + [n for n in names if n not in ("model.safetensors", "config.json")] \
                    + ["config.json"]:  # weights first, config last: a config always finds its weights
                os.replace(tmp / name, path / name)
                run_manifest.note(path / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


RM_CARD = """---
library_name: peft
base_model: {base}
tags: [lora, vllm-train, reward-model]
---
# Reward model adapter (LoRA + scalar head `score`)

Load with `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1), DIR)`.
The parent directory holds the same model merged, for vLLM (`runner="pooling"`, `LLM.classify`).
"""
