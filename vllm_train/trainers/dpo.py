"""DPOTrainer: Direct Preference Optimization of a LoRA adapter (also IPO, hinge, conservative DPO).

The reference model costs no memory: it is the same network with the adapter switched off
(`LoRAInjector.disable_adapter`), i.e. the base model.

With a starting adapter (e.g. from SFT) the policy starts from that adapter *and the reference is that
adapter*. We get its log-probs by computing them once, before the first optimizer step, with the
starting adapter loaded (``precompute_ref_logps``, the default): one no-grad pass over the data,
stored as two floats per pair. Every later step then needs only the policy's forward/backward, so
precomputing is also the faster choice without a starting adapter. ``precompute_ref_logps=False``
recomputes the (base) reference each step instead; it is only allowed without a starting adapter.
On resume the reference is recomputed the same way *before* the checkpoint's weights are loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from vllm_train import distributed, hub, models
from vllm_train.config import DPOConfig
from vllm_train.data.causal_lm import IGNORE_INDEX
from vllm_train.data.preference import PreferenceDataset, collate_preference
from vllm_train.errors import VllmTrainError
from vllm_train.lora.peft_io import adapter_card
from vllm_train.losses.dpo import preference_loss, preference_metrics, rpo_chosen_nll
from vllm_train.metrics import plot_curves
from vllm_train.models import batch_logps, pair_logps
from vllm_train.trainers import common, loop


class DPOTrainer:
    """Preference optimization of a LoRA adapter on a Hugging Face model with our LoRA layers."""

    def __init__(self, model_name: str, config: DPOConfig, adapter: str | None = None, *,
                 tensorboard: bool = True, progress: bool = True, revision: str | None = None):
        if adapter and not config.precompute_ref_logps:
            raise VllmTrainError("precompute_ref_logps=false cannot be used with a starting adapter: the "
                                 "reference is that adapter, computed once before training")
        self.model_name = hub.model_reference(model_name)  # the base a saved adapter names: hub id or absolute path
        self.model_path = models.resolve_model(model_name, revision)  # the local directory HF loads
        self.config = config
        self.start_adapter = adapter
        self.tensorboard = tensorboard
        self.progress = progress
        self.model = self.tokenizer = self.injector = None
        self.global_step = 0

    def setup_training(self) -> None:
        torch.manual_seed(self.config.seed)
        self.model, self.tokenizer, self.injector = models.load_policy(self.model_path, self.config,
                                                                       self.start_adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return models.autocast_for(self.model)

    def _reference(self):
        """The reference's weights: the base (adapter off), or the starting adapter as loaded now."""
        return contextlib.nullcontext() if self.start_adapter else self.injector.disable_adapter()

    def reference_logps(self, dataset: PreferenceDataset,
                        label: str = "reference log-probs") -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen_N, rejected_N) log-probs of the reference, with a progress bar (minutes on a large set)."""
        show = self.progress and distributed.is_main()
        with self._reference():
            return pair_logps(self.model, dataset, self.tokenizer.pad_token_id, self.config.batch_size,
                              self._autocast, progress=label if show else None)

    # ---- training ----------------------------------------------------------------------------
    def train(self, dataset: Any, eval_dataset: Any = None) -> dict:
        """Optimize the adapter on preference pairs; returns the last logged metrics (and eval_*)."""
        if self.model is None:
            self.setup_training()
        c = self.config
        dataset = self._as_dataset(dataset)
        eval_dataset = self._as_dataset(eval_dataset) if eval_dataset is not None else None
        # Reference log-probs come first: before any step, and before a checkpoint is resumed.
        ref = self.reference_logps(dataset) if c.precompute_ref_logps else None
        eval_ref = (self.reference_logps(eval_dataset, "reference log-probs (eval)")
                    if eval_dataset is not None else None)
        optimizer = common.make_optimizer(self.injector.get_trainable_params(), c)
        last, self.global_step = loop.run_epochs(
            lambda group, n_pairs: self._accumulate(dataset, group, n_pairs, ref), model=self.model,
            trainable=self.injector, optimizer=optimizer, config=c, data=dataset,
            model_name=self.model_name, kind="dpo", desc=f"dpo/{c.loss_type}",
            postfix=lambda m: {"loss": f"{m['loss']:.4f}", "acc": f"{m['rewards/accuracy']:.2f}"},
            evaluate=(lambda: self.evaluate(eval_dataset, eval_ref)) if eval_dataset is not None else None,
            resolved={"train_pairs": len(dataset), "start_adapter": self.start_adapter,
                      "reference": self.start_adapter or "base model (adapter disabled)"},
            tensorboard=self.tensorboard, progress=self.progress)
        run_dir = Path(c.output_dir)
        self.save_lora(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png",
                    ["loss", "rewards/accuracy", "rewards/margin", "eval_reward_accuracy", "lr"],
                    title=f"DPO ({c.loss_type}) of {Path(self.model_name).name}")
        return last

    def _accumulate(self, dataset, group: list[list[int]], n_pairs: int, ref) -> dict[str, float]:
        """Forward/backward over this rank's share of one accumulation group; the loss is the mean over
        the group's `n_pairs` pairs (all ranks), so the ranks' summed gradients are the group's."""
        totals: dict[str, float] = {}
        for idx in group:
            batch = collate_preference([dataset[i] for i in idx], self.tokenizer.pad_token_id)
            logps_2B = batch_logps(self.model, batch, self.device, self._autocast)
            policy_chosen_B, policy_rejected_B = logps_2B.chunk(2)
            if ref is not None:
                ref_chosen_B = ref[0][batch["index"]].to(self.device)
                ref_rejected_B = ref[1][batch["index"]].to(self.device)
            else:
                with torch.no_grad(), self.injector.disable_adapter():
                    ref_chosen_B, ref_rejected_B = batch_logps(self.model, batch, self.device, self._autocast).chunk(2)
            loss, metrics = preference_loss(self.config.loss_type, policy_chosen_B, policy_rejected_B,
                                            ref_chosen_B, ref_rejected_B, self.config.beta, self.config.label_smoothing)
            if self.config.rpo_alpha > 0:  # RPO: also raise the chosen answers' likelihood (per-token NLL)
                n_tokens_B = (batch["labels"][: len(idx), 1:] != IGNORE_INDEX).sum(-1).to(self.device)
                chosen_nll = rpo_chosen_nll(policy_chosen_B, n_tokens_B)
                loss = loss + self.config.rpo_alpha * chosen_nll
                metrics.update(loss=loss.item(), chosen_nll=chosen_nll.item())
            (loss * len(idx) / n_pairs).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / n_pairs
        return totals

    def evaluate(self, dataset: Any, ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Reward accuracy/margin of the current adapter vs the reference on `dataset` (+ logp_accuracy)."""
        dataset = self._as_dataset(dataset)
        ref = ref if ref is not None else self.reference_logps(dataset)
        chosen, rejected = pair_logps(self.model, dataset, self.tokenizer.pad_token_id, self.config.batch_size,
                                      self._autocast)
        return preference_metrics(chosen, rejected, ref[0], ref[1], self.config.beta)

    def _as_dataset(self, data: Any) -> PreferenceDataset:
        if isinstance(data, PreferenceDataset):
            return data
        if self.tokenizer is None:
            self.tokenizer = models.load_tokenizer(self.model_path)
        return PreferenceDataset(data, self.tokenizer, self.config.max_length)

    def save_lora(self, path: str | Path) -> Path:
        """Save the adapter in PEFT format (vLLM- and PEFT-loadable) with a short model card. Under
        torchrun every rank calls it and rank 0 alone writes (`LoRAInjector.save`)."""
        card = adapter_card(self.model_name, f"dpo-{self.config.loss_type}", self.config, self.global_step)
        return self.injector.save(path, self.model_name, card=card)
