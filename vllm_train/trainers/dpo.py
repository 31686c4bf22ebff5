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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from vllm_train import models
from vllm_train.config import LoRATrainConfig, _check, write_resolved_config
from vllm_train.data.causal_lm import IGNORE_INDEX
from vllm_train.data.preference import PreferenceDataset, collate_preference
from vllm_train.errors import VllmTrainError
from vllm_train.lora.peft_io import adapter_card
from vllm_train.losses.dpo import LOSS_TYPES, preference_loss, preference_metrics, rpo_chosen_nll
from vllm_train.metrics import MetricsLogger, plot_curves
from vllm_train.models import batch_logps, pair_logps
from vllm_train.trainers import common


@dataclass
class DPOConfig(LoRATrainConfig):
    """LoRATrainConfig plus the preference-loss settings (all validated)."""

    beta: float = 0.1  # strength of the pull towards the reference (IPO: tau)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid only)
    precompute_ref_logps: bool = True  # reference log-probs once, before training (required with --adapter)
    rpo_alpha: float = 0.0  # weight of the NLL of the chosen completions added to the loss (RPO); 0 = off

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "must be > 0")
        _check(self.loss_type in LOSS_TYPES, "loss_type", self.loss_type, "one of " + ", ".join(LOSS_TYPES))
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing,
               "0 <= label_smoothing < 0.5")
        _check(self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha), "rpo_alpha", self.rpo_alpha, "must be >= 0")
        _check(self.label_smoothing == 0.0 or self.loss_type == "sigmoid", "label_smoothing",
               self.label_smoothing, "only with loss_type sigmoid")


class DPOTrainer:
    """Preference optimization of a LoRA adapter on a Hugging Face model with our LoRA layers."""

    def __init__(self, model_name: str, config: DPOConfig, adapter: str | None = None, *,
                 tensorboard: bool = True, progress: bool = True):
        if adapter and not config.precompute_ref_logps:
            raise VllmTrainError("precompute_ref_logps=false cannot be used with a starting adapter: the "
                                 "reference is that adapter, computed once before training")
        self.model_name = str(model_name)
        self.config = config
        self.start_adapter = adapter
        self.tensorboard = tensorboard
        self.progress = progress
        self.model = self.tokenizer = self.injector = None
        self.global_step = 0

    def setup_training(self) -> None:
        torch.manual_seed(self.config.seed)
        self.model, self.tokenizer, self.injector = models.load_policy(self.model_name, self.config,
                                                                       self.start_adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return models.autocast_for(self.model)

    def _reference(self):
        """The reference's weights: the base (adapter off), or the starting adapter as loaded now."""
        return contextlib.nullcontext() if self.start_adapter else self.injector.disable_adapter()

    def reference_logps(self, dataset: PreferenceDataset) -> tuple[torch.Tensor, torch.Tensor]:
        with self._reference():
            return pair_logps(self.model, dataset, self.tokenizer.pad_token_id, self.config.batch_size,
                              self._autocast)

    # ---- training ----------------------------------------------------------------------------
    def train(self, dataset: Any, eval_dataset: Any = None) -> dict:
        """Optimize the adapter on preference pairs; returns the last logged metrics (and eval_*)."""
        if self.model is None:
            self.setup_training()
        c = self.config
        dataset = self._as_dataset(dataset)
        eval_dataset = self._as_dataset(eval_dataset) if eval_dataset is not None else None
        run_dir = Path(c.output_dir)
        total_steps = common.total_optimizer_steps(len(dataset), c)
        params = self.injector.get_trainable_params()
        optimizer = common.make_optimizer(params, c)
        scheduler = common.make_schedule(optimizer, total_steps, c)

        # Reference log-probs come first: before any step, and before a checkpoint is resumed.
        ref = self.reference_logps(dataset) if c.precompute_ref_logps else None
        eval_ref = self.reference_logps(eval_dataset) if eval_dataset is not None else None
        start_epoch, start_group, step = 0, 0, 0
        resume = common.resolve_resume(c.resume_from, run_dir)
        if resume is not None:
            meta = common.load_checkpoint(resume, self.injector, optimizer, scheduler)
            start_epoch, start_group, step = meta["epoch"], meta["next_group"], meta["step"]
        write_resolved_config(c, run_dir, model=self.model_name, kind="dpo", total_steps=total_steps,
                              train_pairs=len(dataset), start_adapter=self.start_adapter,
                              reference=self.start_adapter or "base model (adapter disabled)")
        logger = MetricsLogger(run_dir, self.tensorboard, resume_step=step if resume is not None else None)
        bar = tqdm(total=total_steps, initial=step, desc=f"dpo/{c.loss_type}", disable=not self.progress,
                   dynamic_ncols=True)
        self.model.train()
        last: dict = {}
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        epoch = start_epoch
        while step < total_steps:
            groups = common.epoch_groups(len(dataset), c, epoch)
            for g in range(start_group if epoch == start_epoch else 0, len(groups)):
                stats = self._accumulate(dataset, groups[g], ref)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                for k, v in stats.items():
                    window[k] = window.get(k, 0.0) + v
                bar.update(1)
                if step % c.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    last = {k: v / window_steps for k, v in window.items()}
                    last.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                steps_per_sec=window_steps / max(elapsed, 1e-9), epoch=epoch + (g + 1) / len(groups))
                    logger.log(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if c.save_steps and step % c.save_steps == 0 and step < total_steps:
                    self._checkpoint(run_dir, step, optimizer, scheduler, epoch, g + 1)
                if step >= total_steps:
                    break
            epoch += 1
            if eval_dataset is not None:
                ev = self.evaluate(eval_dataset, eval_ref)
                logger.log(step, {f"eval_{k}": v for k, v in ev.items()})
                last.update({f"eval_{k}": v for k, v in ev.items()})
                self.model.train()
            if not c.save_steps and step < total_steps:
                self._checkpoint(run_dir, step, optimizer, scheduler, epoch, 0)
        bar.close()
        self.global_step = step
        self.model.eval()
        logger.close()
        self.save_lora(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png",
                    ["loss", "rewards/accuracy", "rewards/margin", "eval_reward_accuracy", "lr"],
                    title=f"DPO ({c.loss_type}) of {Path(self.model_name).name}")
        return last

    def _accumulate(self, dataset, group: list[list[int]], ref) -> dict[str, float]:
        """Forward/backward over one accumulation group; the loss is the mean over all its pairs."""
        n_pairs = sum(len(idx) for idx in group)
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

    def _checkpoint(self, run_dir, step, optimizer, scheduler, epoch, next_group):
        return common.save_checkpoint(run_dir, step, self.injector, optimizer, scheduler,
                                      {"epoch": epoch, "next_group": next_group}, self.model_name,
                                      self.config.save_total_limit)

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
            self.tokenizer = models.load_tokenizer(self.model_name)
        return PreferenceDataset(data, self.tokenizer, self.config.max_length)

    def save_lora(self, path: str | Path) -> Path:
        """Save the adapter in PEFT format (vLLM- and PEFT-loadable) with a short model card."""
        card = adapter_card(self.model_name, f"dpo-{self.config.loss_type}", self.config, self.global_step)
        return self.injector.save(path, self.model_name, card=card)
