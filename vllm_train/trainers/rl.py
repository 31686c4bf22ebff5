"""RLHFTrainer: RL on a LoRA policy with rollouts from vLLM -- PPO, GRPO, Dr.GRPO, DAPO and RLOO.

One loop for all of them, read top to bottom in `ppo_step`:

    sync adapter -> sample (vLLM) -> reward -> advantages -> forward/backward (HF + our LoRA) -> step -> log

* The policy trains as a Hugging Face model with our LoRA layers; the **reference** for the KL is the
  policy the run starts from, with no second model: the base with the adapter disabled, or -- when the run
  starts from an adapter such as an SFT run -- a copy of that adapter's LoRA weights swapped in for one
  no-grad forward (``kl_reference="base"`` keeps the base model as the reference even then).
* Before **every** rollout the trainer's newest adapter goes to vLLM through `VLLMEngine.sync_adapter`
  (a new adapter version each time, so vLLM never serves stale weights or stale prefix-cache entries).
  Each step logs the sync time, rollout tok/s, and the train/serve mismatch: mean |delta log-prob| and
  KL between vLLM's log-probs of the tokens it sampled and the trainer's for the same tokens.
* **Value model (PPO)**: a scalar value head (``Linear(hidden, 1)``) on the LoRA policy's final hidden
  states. One forward gives both log-probs and values, no second model is held, and the head is tiny; the
  value loss shares the LoRA trunk (weighted by ``value_loss_coef``), which is what lets a rank-r adapter
  learn a useful critic at all. vLLM serves only the LoRA weights; the head is saved beside them as
  ``value_head.safetensors``.
* Algorithms differ only in their advantage function and loss aggregation (`ALGORITHMS`); PPO adds
  GAE over KL-shaped per-token rewards and a clipped value loss. Its sequence scores are whitened over the
  batch first (``whiten_rewards``): a reward model's scale and per-prompt offset are arbitrary, and raw
  scores with a spread of 10-20 made the KL penalty and the value loss irrelevant on the toy world.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vllm_train.config import RLHFConfig, write_resolved_config
from vllm_train.data.io import check_text_field, load_records
from vllm_train.data.tokenize import prompt_ids as encode_prompt
from vllm_train.errors import VllmTrainError
from vllm_train.losses import grpo, ppo
from vllm_train.losses.causal_lm import token_logprobs
from vllm_train.metrics import MetricsLogger, plot_curves
from vllm_train.rewards.loading import RewardFn, load_reward_function, score_with_function
from vllm_train.trainers import common

VALUE_HEAD_FILE = "value_head.safetensors"

# algorithm -> (advantages of rewards_GN, loss over a (micro-)batch). PPO is handled by `ppo.ppo_loss`.
ALGORITHMS: dict[str, tuple[Callable, Callable]] = {
    "grpo": (grpo.group_advantages, grpo.grpo_loss),
    "dr_grpo": (partial(grpo.group_advantages, scale_by_std=False), grpo.dr_grpo_loss),
    "dapo": (grpo.group_advantages, grpo.token_mean_loss),
    "rloo": (grpo.rloo_advantages, grpo.token_mean_loss),
}


@dataclass
class Rollout:
    """One step's samples, prompt-major: sample i is completion ``i % group_size`` of prompt ``i // group_size``."""
    prompts: list[Any]  # per sample, as given (text or messages)
    examples: list[dict]  # per sample: the prompt's record (carries e.g. the checkable answer)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    vllm_logps: list[list[float]]  # vLLM's log-probs of the tokens it sampled
    sync_ms: float
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def extended(self, more: Rollout) -> Rollout:
        """This rollout's samples followed by `more`'s (same group size)."""
        return Rollout(self.prompts + more.prompts, self.examples + more.examples, self.prompt_ids + more.prompt_ids,
                       self.completion_ids + more.completion_ids, self.completions + more.completions,
                       self.vllm_logps + more.vllm_logps, self.sync_ms + more.sync_ms, self.seconds + more.seconds)


class _PolicyAndValueHead:
    """What a PPO checkpoint holds: the LoRA adapter plus the value head (duck-types the injector for
    `common.save_checkpoint` / `common.load_checkpoint`, so both stay atomic and optimizer-aware)."""

    def __init__(self, injector, value_head: nn.Module):
        self.injector, self.value_head = injector, value_head

    def get_trainable_params(self) -> list[nn.Parameter]:
        return self.injector.get_trainable_params() + list(self.value_head.parameters())

    def save(self, path, base_model_name_or_path=None, **kwargs) -> Path:
        out = self.injector.save(path, base_model_name_or_path, **kwargs)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(Path(out) / VALUE_HEAD_FILE))
        return out

    @torch.no_grad()
    def load(self, path) -> None:
        self.injector.load(path)
        if (Path(path) / VALUE_HEAD_FILE).is_file():
            self.value_head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))


class RLHFTrainer:
    """RL fine-tuning of a LoRA adapter with vLLM rollouts.

    `reward_model_name`: a reward-model directory (scored in-process, see `vllm_train.rewards`), or None
    with `reward_fn` = a callable ``(prompt, completion, example) -> float`` or a ``module:function`` spec.
    `engine`: an existing `VLLMEngine` on the same base model to reuse (one vLLM engine per process);
    otherwise one is created on first use and closed by `close()`.
    """

    def __init__(self, model_name: str, reward_model_name: str | None = None, config: RLHFConfig | None = None,
                 *, reward_fn: RewardFn | str | None = None, engine=None, engine_options=None,
                 adapter: str | None = None, progress: bool = True, tensorboard: bool = True):
        self.model_name = str(model_name)
        self.config = config or RLHFConfig()
        if (reward_model_name is None) == (reward_fn is None):
            raise VllmTrainError("give exactly one of a reward model (reward_model_name) or a reward function")
        self.reward_fn = load_reward_function(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self.reward_model = _load_reward_model(reward_model_name) if reward_model_name else None
        self.progress, self.tensorboard = progress, tensorboard
        self._engine, self._owns_engine, self.engine_options = engine, engine is None, engine_options

        c, lc = self.config, self.config.lora_config
        torch.manual_seed(c.seed)
        self.model, self.tokenizer, self.injector = common.load_policy(self.model_name, lc, adapter)
        # The KL reference. Starting from an adapter (say an SFT run), the policy to stay close to is that
        # adapter, not the base model: keep a copy of its LoRA weights (megabytes) and swap them in for the
        # reference forward. Without one, the initial policy *is* the base model: disable the adapter.
        self._reference_weights = None
        if adapter and c.kl_reference == "initial":
            self._reference_weights = [p.detach().clone() for p in self.injector.get_trainable_params()]
        self.value_head = None
        self.saveable = self.injector
        if c.algorithm == "ppo":
            self.value_head = nn.Linear(self.model.config.hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
            self.saveable = _PolicyAndValueHead(self.injector, self.value_head)
        self.params = self.saveable.get_trainable_params()
        self.optimizer = common.make_optimizer(self.params, lc)
        self.scheduler = None  # made by `train` (needs the number of steps)
        self.global_step = 0
        self._version = 0  # bumped whenever the weights change
        self._served = None  # (version, AdapterRef) last synced to vLLM

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def engine(self):
        """The one vLLM engine (the one passed in, or created on first use)."""
        if self._engine is None:
            from vllm_train.engine.llm import EngineOptions, VLLMEngine

            extra = {} if self.config.temperature == 1.0 else {"logprobs_mode": "processed_logprobs"}
            options = self.engine_options or EngineOptions(
                max_lora_rank=self.config.lora_config.engine_max_lora_rank, seed=self.config.seed, extra=extra)
            self._engine = VLLMEngine(self.model_name, options)
        return self._engine

    # ---- 1. rollouts ---------------------------------------------------------------------------
    def sync_adapter(self):
        """Publish the current weights to vLLM (if they changed). Returns (AdapterRef, milliseconds)."""
        if self._served is not None and self._served[0] == self._version:
            return self._served[1], 0.0
        t0 = time.perf_counter()
        ref = self.engine.sync_adapter(self.injector.peft_state_dict(live=True),
                                       self.injector.peft_config(self.model_name), family="rl-policy")
        self._served = (self._version, ref)
        return ref, (time.perf_counter() - t0) * 1e3

    def generate_rollouts(self, records: Sequence[dict], seed: int | None = None) -> Rollout:
        """Sample `group_size` completions per prompt record from vLLM with the trainer's newest adapter."""
        c = self.config
        adapter, sync_ms = self.sync_adapter()
        ids = [encode_prompt(self.tokenizer, r["prompt"]) for r in records]
        t0 = time.perf_counter()
        outputs = self.engine.generate(ids, adapter, n=c.group_size, temperature=c.temperature, top_p=c.top_p,
                                       max_tokens=c.max_new_tokens, seed=seed, logprobs=True)
        seconds = time.perf_counter() - t0
        n = c.group_size
        samples = [s for per_prompt in outputs for s in per_prompt]
        return Rollout(prompts=[r["prompt"] for r in records for _ in range(n)],
                       examples=[r for r in records for _ in range(n)],
                       prompt_ids=[p for p in ids for _ in range(n)],
                       completion_ids=[list(s.token_ids) for s in samples],
                       completions=[s.text for s in samples],
                       vllm_logps=[list(s.logprobs or []) for s in samples], sync_ms=sync_ms, seconds=seconds)

    # ---- 2. rewards ----------------------------------------------------------------------------
    def compute_rewards(self, prompts: Sequence[Any], responses: Sequence[str],
                        examples: Sequence[dict] | None = None) -> torch.Tensor:
        """One float per (prompt, response): the reward function's values, or the reward model's scores."""
        examples = examples if examples is not None else [{"prompt": p} for p in prompts]
        if self.reward_model is not None:
            values = self.reward_model(prompts, responses, examples)
        else:
            values = score_with_function(self.reward_fn, prompts, responses, examples)
        return torch.tensor(values, dtype=torch.float32)

    # ---- 3. one step: rollout -> score -> update -------------------------------------------------
    def ppo_step(self, records: Sequence[dict], seed: int | None = None,
                 more_records: Callable[[int], Sequence[dict]] | None = None) -> dict:
        """One RL step on a batch of prompt records (the configured algorithm; named after the seed plan).
        With dynamic sampling, `more_records(k)` (k more prompt records; `train` passes one) lets the step
        refill the batch with informative groups, as DAPO does; without it, uninformative groups are only dropped."""
        c, N = self.config, self.config.group_size
        t_start = time.perf_counter()
        rollout = self.generate_rollouts(records, seed)
        rewards_S = self.compute_rewards(rollout.prompts, rollout.completions, rollout.examples)
        stats = {"sync_ms": rollout.sync_ms, "rollout_seconds": rollout.seconds,
                 "rollout_tok_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
                 "reward_mean": rewards_S.mean().item(),
                 "reward_std": rewards_S.std().item() if len(rewards_S) > 1 else 0.0,
                 "accuracy": (rewards_S > 0).float().mean().item(),
                 "response_len": rollout.num_tokens / len(rewards_S)}

        # Which samples train: all, or (dynamic sampling) those of groups whose rewards differ.
        rewards_GN = rewards_S.view(-1, N)
        keep_G = grpo.informative_groups(rewards_GN) if c.dynamic_sampling \
            else torch.ones(len(rewards_GN), dtype=torch.bool)
        if c.dynamic_sampling and more_records is not None:
            rollout, rewards_GN, keep_G, stats["refill_rounds"] = self._refill(
                rollout, rewards_GN, keep_G, len(records), more_records, seed)
            rewards_S = rewards_GN.flatten()
            stats.update(rollout_seconds=rollout.seconds, sync_ms=rollout.sync_ms,
                         rollout_tok_per_s=rollout.num_tokens / max(rollout.seconds, 1e-9))
        keep = keep_G.repeat_interleave(N).nonzero()[:, 0].tolist()
        stats["groups_kept"] = int(keep_G.sum())
        if not keep:
            self.global_step += 1
            return {**stats, "step_seconds": time.perf_counter() - t_start, "skipped": 1}

        batch = self._completion_batch(rollout, keep)
        mask_BT = batch["mask_BT"]
        with torch.no_grad():
            need_old = c.algorithm == "ppo" or c.ppo_epochs > 1 or c.num_minibatches > 1
            old_logps_BT, old_values_BT = self._forward_all(batch, rollout) if need_old else (None, None)
            ref_logps_BT = None
            if c.kl_coef > 0 or c.log_ref_kl:
                with self._reference_policy():
                    ref_logps_BT, _ = self._forward_all(batch, rollout)

            if c.algorithm == "ppo":
                kl_BT = ppo.kl_per_token(old_logps_BT, ref_logps_BT, "k1") if ref_logps_BT is not None \
                    else torch.zeros_like(old_logps_BT)
                scores_S = rewards_S[keep]
                if c.whiten_rewards and len(keep) > 1:
                    scores_S = ppo.masked_whiten(scores_S, torch.ones_like(scores_S))
                token_rewards_BT = ppo.kl_shaped_rewards(scores_S, kl_BT, mask_BT, c.kl_coef)
                advantages, returns_BT = ppo.gae(token_rewards_BT, old_values_BT, mask_BT, c.gamma, c.gae_lambda)
                if c.whiten_advantages:
                    advantages = ppo.masked_whiten(advantages, mask_BT)
            else:
                advantage_fn, _ = ALGORITHMS[c.algorithm]
                advantages = advantage_fn(rewards_GN[keep_G]).flatten()

        # Update: ppo_epochs passes, each split into num_minibatches optimizer steps, each accumulated
        # over micro-batches of lora_config.batch_size sequences.
        S = len(keep)
        fused_old = old_logps_BT is None  # one pass, one step: the first forward *is* the old policy
        if fused_old:
            old_logps_BT = torch.zeros_like(mask_BT, dtype=torch.float32)
        self.model.train()
        losses, step_metrics = [], []
        for _ in range(c.ppo_epochs):
            order = torch.randperm(S) if (c.ppo_epochs > 1 or c.num_minibatches > 1) else torch.arange(S)
            for mb in order.chunk(c.num_minibatches):
                size = grpo.BatchSize.of(mask_BT[mb], c.max_new_tokens)
                for micro in mb.split(c.lora_config.batch_size):
                    logps_BT, values_BT = self._forward(batch, rollout, micro)
                    if fused_old:
                        old_logps_BT[micro] = logps_BT.detach()
                    is_w = self._tis_weights(old_logps_BT[micro], batch["vllm_logps_BT"][micro], mask_BT[micro])
                    if c.algorithm == "ppo":
                        loss, m = ppo.ppo_loss(logps_BT, old_logps_BT[micro], advantages[micro], values_BT,
                                               old_values_BT[micro], returns_BT[micro], mask_BT[micro],
                                               clip=c.clip_range, value_clip=c.value_clip_range,
                                               value_coef=c.value_loss_coef, num_tokens=size.tokens, is_weights_BT=is_w)
                    else:
                        _, loss_fn = ALGORITHMS[c.algorithm]
                        loss, m = loss_fn(logps_BT, old_logps_BT[micro], advantages[micro], mask_BT[micro],
                                          clip_low=c.clip_range, clip_high=c.clip_high, size=size,
                                          ref_logps_BT=None if ref_logps_BT is None else ref_logps_BT[micro],
                                          kl_coef=c.kl_coef, is_weights_BT=is_w)
                    loss.backward()
                    losses.append(loss.item())
                    step_metrics.append(m)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.lora_config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._version += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.model.eval()
        self.global_step += 1

        vllm_BT = batch["vllm_logps_BT"]
        stats.update({
            "loss": sum(losses) / c.ppo_epochs / c.num_minibatches, "grad_norm": float(grad_norm),
            "lr": self.optimizer.param_groups[0]["lr"],
            # train/serve mismatch on the sampled tokens: vLLM vs the trainer's pre-update policy
            "mismatch_abs_logp": ppo.masked_mean((old_logps_BT - vllm_BT).abs(), mask_BT).item(),
            "mismatch_kl": ppo.masked_mean(ppo.kl_per_token(vllm_BT.double(), old_logps_BT.double(), "k3"),
                                           mask_BT).item(),  # float64: the k3 estimate is ~1e-9 here
            **{k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]},
        })
        if ref_logps_BT is not None:
            stats["kl_ref"] = ppo.masked_mean(ppo.kl_per_token(old_logps_BT, ref_logps_BT, "k3"), mask_BT).item()
        stats["step_seconds"] = time.perf_counter() - t_start
        return stats

    def _refill(self, rollout: Rollout, rewards_GN: torch.Tensor, keep_G: torch.Tensor, target: int,
                more_records: Callable[[int], Sequence[dict]], seed: int | None):
        """DAPO's dynamic sampling: sample groups for more prompts until `target` groups have rewards
        that differ (at most `dynamic_sampling_rounds` rounds). Each round asks for the missing number
        divided by the share of informative groups so far. Returns the extended rollout, rewards,
        the groups that train (the first `target` informative ones) and the rounds taken."""
        rounds = 0
        while int(keep_G.sum()) < target and rounds < self.config.dynamic_sampling_rounds:
            rounds += 1
            missing = target - int(keep_G.sum())
            share = max(keep_G.float().mean().item(), 1.0 / target)
            extra = self.generate_rollouts(more_records(min(target, math.ceil(missing / share))),
                                           None if seed is None else seed + 7919 * rounds)
            extra_GN = self.compute_rewards(extra.prompts, extra.completions, extra.examples).view(
                -1, self.config.group_size)
            rollout = rollout.extended(extra)
            rewards_GN = torch.cat([rewards_GN, extra_GN])
            keep_G = torch.cat([keep_G, grpo.informative_groups(extra_GN)])
        keep_G = keep_G & (keep_G.cumsum(0) <= target)
        return rollout, rewards_GN, keep_G, rounds

    @contextlib.contextmanager
    def _reference_policy(self):
        """The KL reference inside the block: the starting adapter's weights swapped in, or no adapter."""
        if self._reference_weights is None:
            with self.injector.disable_adapter():
                yield
            return
        params = self.injector.get_trainable_params()
        current = [p.data for p in params]
        try:
            for p, ref in zip(params, self._reference_weights):
                p.data = ref
            yield
        finally:
            for p, data in zip(params, current):
                p.data = data

    def _tis_weights(self, old_logps_BT, vllm_logps_BT, mask_BT):
        """Truncated importance sampling: min(pi_trainer / pi_vllm, cap) per token (samples came from vLLM)."""
        if self.config.tis_cap is None:
            return None
        return (torch.exp(old_logps_BT.double() - vllm_logps_BT).clamp(max=self.config.tis_cap) * mask_BT).to(
            old_logps_BT.dtype)

    # ---- tensors ---------------------------------------------------------------------------------
    def _completion_batch(self, rollout: Rollout, keep: list[int]) -> dict:
        """Completion-aligned (S, T) tensors for the kept samples; T = longest completion."""
        T = max(1, max(len(rollout.completion_ids[i]) for i in keep))
        tokens_BT = torch.zeros(len(keep), T, dtype=torch.long)
        mask_BT = torch.zeros(len(keep), T, dtype=torch.bool)
        vllm_BT = torch.zeros(len(keep), T, dtype=torch.float64)  # vLLM reports float64 log-probs
        for row, i in enumerate(keep):
            comp = rollout.completion_ids[i]
            tokens_BT[row, :len(comp)] = torch.tensor(comp, dtype=torch.long)
            mask_BT[row, :len(comp)] = True
            lps = rollout.vllm_logps[i]
            if len(lps) == len(comp):
                vllm_BT[row, :len(comp)] = torch.tensor(lps)
        return {"keep": keep, "tokens_BT": tokens_BT, "mask_BT": mask_BT, "vllm_logps_BT": vllm_BT}

    def _forward(self, batch: dict, rollout: Rollout, rows: torch.Tensor):
        """(logps_BT, values_BT or None) of the completion tokens of `rows`, with gradients."""
        rows = rows.tolist()
        seq = [rollout.prompt_ids[batch["keep"][r]] + rollout.completion_ids[batch["keep"][r]] for r in rows]
        L = max(len(s) for s in seq)
        pad = self.tokenizer.pad_token_id or 0
        input_ids_BL = torch.tensor([s + [pad] * (L - len(s)) for s in seq], device=self.device)
        attention_BL = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seq], device=self.device)
        tokens_BT = batch["tokens_BT"][rows].to(self.device)
        T = tokens_BT.size(1)
        # The hidden state at position p_i - 1 + t predicts completion token t of sequence i.
        starts_B = torch.tensor([len(rollout.prompt_ids[batch["keep"][r]]) - 1 for r in rows], device=self.device)
        positions_BT = (starts_B[:, None] + torch.arange(T, device=self.device)[None]).clamp(max=L - 1)
        mask_BT = batch["mask_BT"][rows].to(self.device)
        head = self.model.get_output_embeddings()
        chunked = _frozen_plain_linear(head)  # False e.g. with a LoRA on the head: full logits through it
        with self._autocast():
            hidden_BLH = self.model.base_model(input_ids=input_ids_BL, attention_mask=attention_BL).last_hidden_state
            hidden_BTH = hidden_BLH.gather(1, positions_BT[..., None].expand(-1, -1, hidden_BLH.size(-1)))
            if not chunked:
                logits_BTV = head(hidden_BTH).float() / self.config.temperature
                logps_BT = logits_BTV.gather(-1, tokens_BT[..., None])[..., 0] - torch.logsumexp(logits_BTV, dim=-1)
        if chunked:
            # Only the completion tokens, a chunk of rows at a time: the (B, T, V) logits never exist, so a
            # whole RL batch fits in one micro-batch beside vLLM (H200: 29 GiB less at equal micro-batch).
            logps_BT = torch.zeros(mask_BT.shape, dtype=torch.float32, device=self.device)
            logps_BT[mask_BT] = token_logprobs(hidden_BTH[mask_BT], head.weight, tokens_BT[mask_BT],
                                               self.config.temperature)
        values_BT = None
        if self.value_head is not None:
            values_BT = self.value_head(hidden_BTH.float())[..., 0] * mask_BT
        return (logps_BT * mask_BT).cpu(), (values_BT.cpu() if values_BT is not None else None)

    def _forward_all(self, batch: dict, rollout: Rollout):
        """`_forward` over all rows in micro-batches (call under no_grad)."""
        logps, values = [], []
        for micro in torch.arange(len(batch["keep"])).split(self.config.lora_config.batch_size):
            lp, v = self._forward(batch, rollout, micro)
            logps.append(lp)
            values.append(v)
        return torch.cat(logps), (torch.cat(values) if values[0] is not None else None)

    def _autocast(self):
        if self.device.type == "cuda" and next(self.model.parameters()).dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- 4. the loop -------------------------------------------------------------------------------
    def train(self, prompt_dataset: Any, num_steps: int, eval_dataset: Any = None) -> dict:
        """Run `num_steps` RL steps of `rollout_batch_size` prompts each (cycling through the data in a
        seeded order). Logs every step; evaluates greedy reward on `eval_dataset` before, every
        `eval_steps` and at the end; checkpoints every `save_steps`; resumes with lora_config.resume_from."""
        c, lc = self.config, self.config.lora_config
        if num_steps < 1:
            raise VllmTrainError(f"num_steps: {num_steps} is invalid (an integer >= 1)")
        records = load_prompt_records(prompt_dataset, "prompt dataset")
        eval_records = load_prompt_records(eval_dataset, "eval dataset") if eval_dataset is not None else None
        run_dir = Path(c.output_dir)
        self.scheduler = common.make_schedule(self.optimizer, num_steps, lc)
        step = 0
        resume = common.resolve_resume(lc.resume_from, run_dir)
        if resume is not None:
            step = common.load_checkpoint(resume, self.saveable, self.optimizer, self.scheduler)["step"]
            self._version += 1
        self.global_step = step
        write_resolved_config(c, run_dir, model=self.model_name, kind=c.algorithm, num_steps=num_steps,
                              prompts=len(records), reward=self._reward_label())
        logger = MetricsLogger(run_dir, self.tensorboard, resume_step=step if resume is not None else None)
        last: dict = {}
        if eval_records is not None and resume is None:
            last = {f"eval_{k}": v for k, v in self.evaluate(eval_records).items()}
            logger.log(step, last)
        bar = tqdm(total=num_steps, initial=step, desc=c.algorithm, disable=not self.progress, dynamic_ncols=True)
        while step < num_steps:
            stats = self.ppo_step(self._batch_records(records, step), seed=c.seed * 1_000_003 + step,
                                  more_records=self._refill_source(records, step))
            step += 1
            if eval_records is not None and ((c.eval_steps and step % c.eval_steps == 0) or step == num_steps):
                stats.update({f"eval_{k}": v for k, v in self.evaluate(eval_records).items()})
            logger.log(step, stats)
            last = stats
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", len=f"{stats['response_len']:.1f}",
                            sync=f"{stats['sync_ms']:.0f}ms")
            if c.save_steps and step % c.save_steps == 0 and step < num_steps:
                common.save_checkpoint(run_dir, step, self.saveable, self.optimizer, self.scheduler, {},
                                       self.model_name, lc.save_total_limit)
        bar.close()
        logger.close()
        self.save_checkpoint(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png",
                    ["reward_mean", "eval_reward", "kl_ref", "response_len", "mismatch_abs_logp", "sync_ms"],
                    title=f"{c.algorithm} on {Path(self.model_name).name}")
        return last

    def _batch_records(self, records: list[dict], step: int) -> list[dict]:
        """The step's prompts: a seeded permutation per pass over the data (resumable from `step` alone)."""
        B, n = self.config.rollout_batch_size, len(records)
        out = []
        for k in range(step * B, (step + 1) * B):
            epoch, pos = divmod(k, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            out.append(records[order[pos]])
        return out

    def _refill_source(self, records: list[dict], step: int) -> Callable[[int], list[dict]]:
        """Extra prompts for dynamic sampling at `step`: random draws seeded by the step (resumable)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step + 1)
        return lambda k: [records[i] for i in torch.randint(len(records), (k,), generator=generator).tolist()]

    @torch.no_grad()
    def evaluate(self, records: Any, max_prompts: int | None = None) -> dict:
        """Greedy completions of the current policy (from vLLM): mean reward and share with reward > 0
        (= accuracy for a 0/1 reward such as the toy world's)."""
        records = load_prompt_records(records, "eval dataset")[:max_prompts]
        adapter, _ = self.sync_adapter()
        ids = [encode_prompt(self.tokenizer, r["prompt"]) for r in records]
        outs = self.engine.generate(ids, adapter, temperature=0.0, max_tokens=self.config.max_new_tokens)
        rewards = self.compute_rewards([r["prompt"] for r in records], [o[0].text for o in outs], records)
        return {"reward": rewards.mean().item(), "accuracy": (rewards > 0).float().mean().item()}

    # ---- saving ----------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the adapter (PEFT format, servable by vLLM as is) -- plus the value head for PPO -- to `path`."""
        c = self.config
        card = (f"---\nlibrary_name: peft\nbase_model: {self.model_name}\ntags: [lora, vllm-train, {c.algorithm}]\n"
                f"---\n# LoRA adapter ({c.algorithm})\n\nRL-trained with vllm-train ({self.global_step} steps, "
                f"reward: {self._reward_label()}).\n")
        return self.saveable.save(path, self.model_name, card=card)

    def _reward_label(self) -> str:
        if self.reward_model is not None:
            return f"reward model {self.reward_model.name}"
        from vllm_train.rewards.loading import reward_name

        return reward_name(self.reward_fn)

    def close(self) -> None:
        """Close the engine this trainer made; on a borrowed engine, remove this trainer's adapter
        instead (which also frees the slot its fast sync pinned, for the engine's other users)."""
        if self._engine is not None:
            if self._owns_engine:
                self._engine.close()
            elif self._served is not None:
                self._engine.remove_adapter(self._served[1])
        self._engine, self._served = None, None


def _frozen_plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is None and not module.weight.requires_grad


def load_prompt_records(source: Any, what: str = "prompt dataset") -> list[dict]:
    """Prompt records ``{"prompt": text or chat messages, ...any fields the reward reads}``."""
    return load_records(source, lambda r: check_text_field(r, "prompt", allow_messages=True), what=what)


def _load_reward_model(path: str):
    from vllm_train.rewards.model import RewardModelScorer

    return RewardModelScorer(path)

