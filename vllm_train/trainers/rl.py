"""RLHFTrainer: RL on a LoRA policy with rollouts from vLLM -- PPO, GRPO, Dr.GRPO, DAPO and RLOO.

One loop for all of them. `train` runs steps; `ppo_step` reads top to bottom:

    sync adapter -> sample (vLLM) -> reward -> advantages -> forward/backward (HF + our LoRA) -> step -> log

* Before **every** rollout the trainer's newest adapter goes to vLLM (`VLLMEngine.sync_adapter`: a new
  adapter version each time, so vLLM never serves stale weights or stale prefix-cache entries). Each step
  logs the sync time, rollout tok/s and the train/serve mismatch: mean |delta log-prob| and KL between
  vLLM's log-probs of the tokens it sampled and the trainer's for the same tokens.
* The algorithm (`rl_algorithms.make_algorithm`) and the policy's forward (`rl_policy.Policy`) are
  chosen once at setup; the step does not branch on the algorithm's name.
* ``max_staleness=1`` overlaps the next rollout with the update (`rl_rollouts.RolloutPrefetcher`).
* Data parallel (`vllm_train.distributed`): each rank samples (and with dynamic sampling refills) its share
  of the step's prompts on its own engine and seeds, then trains on as many groups as every other rank;
  global-count normalisation + one gradient all-reduce = one update. Stats: rank means.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_train import distributed, hub
from vllm_train.agents.recorded import RecordedEpisode
from vllm_train.config import RLHFConfig, write_resolved_config
from vllm_train.engine.llm import RolloutEngine
from vllm_train.engine.shared_base import reason_not_to_share
from vllm_train.errors import VllmTrainError
from vllm_train.losses import grpo, ppo
from vllm_train.metrics import MetricsLogger, plot_curves
from vllm_train.models import pick_device_and_dtype, resolve_model
from vllm_train.rewards.loading import RewardFn, reward_function
from vllm_train.rewards.model import RewardModelScorer
from vllm_train.trainers import common, rl_rewards, run_files
from vllm_train.trainers.guards import DivergenceWatch, guarded_step, stop_if_not_finite
from vllm_train.trainers.rl_algorithms import global_batch_size, make_algorithm
from vllm_train.trainers.rl_policy import CompletionBatch, Policy, PolicyAndValueHead, zero_value_head
from vllm_train.trainers.rl_rollouts import (
    Rollout,
    RolloutPrefetcher,
    check_rank_shares,
    keep_on_every_rank,
    load_prompt_records,
    make_rollout_engine,
    rank_step_records,
    refill_source,
    rollout_engine_options,
    rollout_from_recorded,
    rollout_stats,
    step_seed,
)
from vllm_train.trainers.rl_sampling import Agent, check_reward_given, load_agent_environment, sample_rollout
from vllm_train.trainers.shared_policy import load_policy_over_engine

__all__ = ["RLHFTrainer", "Rollout", "load_prompt_records"]


class RLHFTrainer:
    """RL fine-tuning of a LoRA adapter with vLLM rollouts.

    `reward_model_name`: a reward-model directory (scored in-process, see `vllm_train.rewards`), or None
    with `reward_fn` = a callable of ours or TRL's shape (`vllm_train.rewards.loading`), or a ``module:function``.
    `engine`: an existing `VLLMEngine` on the same base model to reuse (one vLLM engine per process), or
    any `RolloutEngine`; otherwise one is created and closed by `close()`: on CUDA before the policy, whose
    frozen base weights are then views of the engine's (held once, `self.shared_base` says), else on
    first use. `adapter`: start from this adapter (its weights are then the KL reference, unless
    ``kl_reference="base"``). `environment_factory` (or ``config.environment``): multi-turn episodes with
    this environment class (`vllm_train.trainers.rl_sampling`); with ``get_reward`` no reward is needed.
    """

    def __init__(self, model_name: str, reward_model_name: str | None = None, config: RLHFConfig | None = None,
                 *, reward_fn: RewardFn | str | None = None, engine: RolloutEngine | None = None, engine_options=None,
                 adapter: str | None = None, progress: bool = True, tensorboard: bool = True,
                 revision: str | None = None, environment_factory: type | str | None = None):
        self.model_name = hub.model_reference(model_name)  # the base a saved adapter names: hub id or absolute path
        self.model_path = resolve_model(model_name, revision)  # the local directory HF and vLLM load
        self.config = c = config or RLHFConfig()
        # the environment class (and that some reward is given) checked before anything heavy loads
        self.reward_fn = reward_function(reward_fn) if reward_fn is not None else None  # checked before loading
        self.environment = load_agent_environment(environment_factory or c.environment, reward_model_name,
                                                  self.reward_fn, require_reward=False)  # `train` needs one
        c.check_episode_fields(self.environment is not None)
        self.reward_model = RewardModelScorer(hub.resolve(reward_model_name, what="reward model")) \
            if reward_model_name else None  # a hub id: its snapshot directory
        self.progress, self.tensorboard = progress, tensorboard
        self._engine, self._owns_engine, self.engine_options = engine, engine is None, engine_options

        self.model, self.tokenizer, self.injector, self.shared_base = self._load_policy(adapter)
        self.agent = Agent.of(self.environment, self.tokenizer, c) if self.environment is not None else None
        # The KL reference: started from an adapter (say an SFT run), the policy to stay close to is that
        # adapter, not the base model, so keep a copy of its LoRA weights (megabytes) to swap in.
        reference = [p.detach().clone() for p in self.injector.get_trainable_params()] \
            if adapter and c.kl_reference == "initial" else None
        self.algorithm = make_algorithm(c)
        value_head = zero_value_head(self.model) if self.algorithm.uses_values else None
        self.policy = Policy(self.model, self.injector, self.tokenizer.pad_token_id or 0, c.temperature,
                             c.lora_config.batch_size, value_head, reference)
        self.saveable = PolicyAndValueHead(self.injector, value_head) if value_head is not None else self.injector
        self.params = self.saveable.get_trainable_params()
        self.optimizer = common.make_optimizer(self.params, c.lora_config)
        self.scheduler = None  # made by `train` (needs the number of steps)
        self.global_step = 0
        self._version = 0  # bumped whenever the weights change
        self._served, self._fingerprint = None, None  # (version, AdapterRef) last synced; run_files.fingerprint

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, prompt_dataset: Any, num_steps: int, eval_dataset: Any = None) -> dict:
        """Run `num_steps` RL steps of `rollout_batch_size` prompts each (cycling through the data in a
        seeded order). Logs every step; evaluates greedy reward on `eval_dataset` before, every
        `eval_steps` and at the end; checkpoints every `save_steps`; resumes with lora_config.resume_from."""
        c, lc, reward = self.config, self.config.lora_config, self.reward_fn  # the record fields it reads: checked
        if num_steps < 1:
            raise VllmTrainError(f"num_steps: {num_steps} is invalid (an integer >= 1)")
        check_rank_shares(c.rollout_batch_size)
        check_reward_given(self.environment, self.reward_model, reward)
        records = load_prompt_records(prompt_dataset, "prompt dataset", reward)
        eval_records = load_prompt_records(eval_dataset, "eval dataset", reward) if eval_dataset is not None else None
        run_dir, step = Path(c.output_dir), self._resume(num_steps, records)
        write_resolved_config(c, run_dir, model=self.model_name, kind=c.algorithm, num_steps=num_steps,
                              prompts=len(records), reward=self._reward_label())
        logger = MetricsLogger(run_dir, lc.report_to, step or None, tensorboard=self.tensorboard)
        watch = DivergenceWatch(self.params, lc.stop_on_divergence, run_dir)  # the policy loss says nothing of it
        last: dict = {}
        if eval_records is not None and step == 0:
            logger.log(step, last := {f"eval_{k}": v for k, v in self.evaluate(eval_records).items()})
        prefetcher = RolloutPrefetcher() if c.max_staleness else None
        show = self.progress and distributed.is_main()
        bar = tqdm(total=num_steps, initial=step, desc=c.algorithm, disable=not show, dynamic_ncols=True)
        try:
            while step < num_steps:
                stats = self._train_step(records, step, num_steps, prefetcher)
                step += 1
                if eval_records is not None and ((c.eval_steps and step % c.eval_steps == 0) or step == num_steps):
                    if prefetcher is not None:
                        prefetcher.wait()  # one thread drives vLLM at a time
                    stats.update({f"eval_{k}": v for k, v in self.evaluate(eval_records).items()})
                logger.log(step, last := {**stats, **watch.check(step)})
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", len=f"{stats['response_len']:.1f}",
                                sync=f"{stats['sync_ms']:.0f}ms")
                if c.save_steps and step % c.save_steps == 0 and step < num_steps:
                    common.save_checkpoint(run_dir, step, self.saveable, self.optimizer, self.scheduler,
                                           {"fingerprint": self._fingerprint}, self.model_name, lc.save_total_limit)
        finally:
            if prefetcher is not None:
                prefetcher.close()
            bar.close()
            logger.close()
        self.save_checkpoint(run_dir)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png",
                    ["reward_mean", "eval_reward", "kl_ref", "response_len", "mismatch_abs_logp", "sync_ms"],
                    title=f"{c.algorithm} on {Path(self.model_name).name}")
        return last

    def _train_step(self, records: list[dict], step: int, num_steps: int,
                    prefetcher: RolloutPrefetcher | None) -> dict:
        """`ppo_step` on the step's prompts. With a prefetcher, the step trains on the rollout sampled
        during the previous update, and the next step's rollout is sampled during this one."""
        c, t0 = self.config, time.perf_counter()
        batch = rank_step_records(records, step, c.rollout_batch_size, c.seed)
        seed = step_seed(c.seed, step, distributed.rank())
        rollout = None
        if prefetcher is not None:
            rollout = prefetcher.take(step) or self.generate_rollouts(batch, seed)
            waited = time.perf_counter() - t0  # the part of the rollout the previous update did not hide
            if step + 1 < num_steps:
                adapter, sync_ms = self.sync_adapter()  # here, between updates: the job never syncs
                following = rank_step_records(records, step + 1, c.rollout_batch_size, c.seed)
                version, next_seed = self._version, step_seed(c.seed, step + 1, distributed.rank())
                prefetcher.start(step + 1, lambda: self._sample(following, next_seed, adapter, version, sync_ms))
        stats = self.ppo_step(batch, seed, refill_source(records, step, c.seed), rollout)
        if prefetcher is not None:
            stats["rollout_wait_seconds"] = waited
        stats["step_seconds"] = time.perf_counter() - t0
        stats["fast_sync"] = float(getattr(self.engine, "last_sync_path", None) == "fast")  # 1: slot write
        return distributed.all_reduce_mean(stats)

    def _resume(self, num_steps: int, records: list[dict]) -> int:
        """LR schedule; the checkpoint restored if asked (refused if of another run). Returns the step to go on from."""
        lc, run_dir = self.config.lora_config, Path(self.config.output_dir)
        self.scheduler = common.make_schedule(self.optimizer, num_steps, lc)
        self._fingerprint = run_files.fingerprint(self.config, self.model_name, records, distributed.world_size())
        self._fingerprint["config"]["reward"] = self._reward_label()  # a resume must score as the run did
        resume = common.resolve_resume(lc.resume_from, run_dir)
        if resume is not None:
            self.global_step = common.load_checkpoint(resume, self.saveable, self.optimizer, self.scheduler,
                                                      self._fingerprint)["step"]
            self._version += 1
        return self.global_step

    # ---- one step: rollout -> score -> update ----------------------------------------------------
    def ppo_step(self, records: Sequence[dict], seed: int | None = None,
                 more_records: Callable[[int], Sequence[dict]] | None = None,
                 rollout: Rollout | None = None) -> dict:
        """One RL step on a batch of prompt records (the configured algorithm; named after the seed plan).
        `rollout`: samples already taken for `records` (the prefetched, one-update-old rollout), else sampled
        now. With dynamic sampling, `more_records(k)` (k more records) refills the batch, as DAPO does."""
        c, t_start = self.config, time.perf_counter()
        rollout = rollout or self.generate_rollouts(records, seed)
        rewards_S = self.rollout_rewards(rollout)
        rewards_GN = rewards_S.view(-1, c.group_size)
        keep_G, dynamic = torch.ones(len(rewards_GN), dtype=torch.bool), {}
        if c.dynamic_sampling:  # train only on groups whose rewards differ; sample more prompts to refill
            rollout, rewards_GN, keep_G, rounds = self._refill(rollout, rewards_GN, len(records), more_records, seed)
            dynamic = {"refill_rounds": rounds, "groups_informative": int(keep_G.sum())}  # this rank's
            keep_G = keep_on_every_rank(keep_G)  # data parallel: as many groups on every rank (maybe none)
        stats = rollout_stats(rollout, rewards_GN.flatten(), self._version)
        stats.update(groups_kept=int(keep_G.sum()), **dynamic)
        keep = keep_G.repeat_interleave(c.group_size).nonzero()[:, 0].tolist()
        if keep:
            stats.update(self._learn(CompletionBatch.of(rollout, keep), rewards_GN, keep_G))
        else:
            stats["skipped"] = 1
        self.global_step += 1
        stats["step_seconds"] = time.perf_counter() - t_start
        return stats

    def _learn(self, batch: CompletionBatch, rewards_GN: torch.Tensor, keep_G: torch.Tensor) -> dict:
        """Advantages, then `ppo_epochs` passes of `num_minibatches` optimizer steps over the batch."""
        c, mask_BT = self.config, batch.mask_BT
        need_old = self.algorithm.uses_values or c.ppo_epochs > 1 or c.num_minibatches > 1
        old_logps_BT, old_values_BT = self.policy.forward_all(batch) if need_old else (None, None)
        ref_logps_BT = None
        if c.kl_coef > 0 or c.log_ref_kl:
            with self.policy.reference():
                ref_logps_BT, _ = self.policy.forward_all(batch)
        # One pass, one step: the first forward *is* the old policy, filled in by `_update`.
        fused_old = old_logps_BT is None
        targets = self.algorithm.advantages(rewards_GN, keep_G, mask_BT,
                                            torch.zeros(mask_BT.shape) if fused_old else old_logps_BT,
                                            ref_logps_BT, old_values_BT)
        stats = self._update(batch, targets, fused_old)
        old_BT = targets.old_logps_BT
        stats.update({  # train/serve mismatch on the sampled tokens: the sampler vs the trainer's pre-update policy
            "mismatch_abs_logp": ppo.masked_mean((old_BT - batch.vllm_logps_BT).abs(), mask_BT).item(),
            "mismatch_kl": ppo.masked_mean(ppo.kl_per_token(batch.vllm_logps_BT, old_BT.double(), "k3"),
                                           mask_BT).item()})  # float64: the k3 estimate is ~1e-9 on-policy
        if ref_logps_BT is not None:
            stats["kl_ref"] = ppo.masked_mean(ppo.kl_per_token(old_BT, ref_logps_BT, "k3"), mask_BT).item()
        return stats

    def _update(self, batch: CompletionBatch, targets, fused_old: bool) -> dict:
        """Optimizer steps over minibatches, each accumulated over micro-batches of lora_config.batch_size."""
        c, S, mask_BT = self.config, len(batch), batch.mask_BT
        self.model.train()
        losses, step_metrics = [], []
        for _ in range(c.ppo_epochs):
            order = torch.randperm(S) if (c.ppo_epochs > 1 or c.num_minibatches > 1) else torch.arange(S)
            for minibatch in order.tensor_split(c.num_minibatches):
                size = global_batch_size(mask_BT[minibatch], c.max_new_tokens)
                minibatch_loss = 0.0
                for rows in minibatch.split(c.lora_config.batch_size):
                    logps_BT, values_BT = self.policy.forward(batch, rows)
                    if fused_old:
                        targets.old_logps_BT[rows] = logps_BT.detach()
                    is_weights = ppo.truncated_importance_weights(targets.old_logps_BT[rows], batch.vllm_logps_BT[rows],
                                                     mask_BT[rows], c.importance_cap)
                    loss, metrics = self.algorithm.loss(logps_BT, values_BT, targets, rows, mask_BT[rows], size,
                                                        is_weights)
                    loss.backward()
                    minibatch_loss += loss.item()
                    step_metrics.append(metrics)
                # Data parallel: the ranks' gradients (and losses) are partial sums of the minibatch's.
                minibatch_loss, = distributed.all_reduce_grads(self.params, minibatch_loss)
                losses.append(minibatch_loss)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.lora_config.max_grad_norm)
                stop_if_not_finite(self.global_step + 1, minibatch_loss, grad_norm, c.output_dir)
                guarded_step(self.optimizer, self.global_step + 1, self.params, c.output_dir)
                self.optimizer.zero_grad(set_to_none=True)
                self._version += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.model.eval()
        return {"loss": sum(losses) / c.ppo_epochs / c.num_minibatches, "grad_norm": float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"],
                **{k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}}

    # ---- sampling, scoring ---------------------------------------------------------------------
    @property
    def engine(self):
        """The one engine (the one passed in, or made on first use, see `make_rollout_engine`)."""
        if self._engine is None:
            self._engine = make_rollout_engine(self.config, self.model_path, self.engine_options)
        return self._engine

    def _load_policy(self, adapter: str | None):
        """The policy, over the engine's base where it can be shared (`load_policy_over_engine`): then the
        in-process engine is made first (else on first use, as it always is for remote rollouts)."""
        c, lc = self.config, self.config.lora_config
        not_shared = "rollouts run on vLLM servers" if self._engine is None and c.rollout_servers else None
        if self._engine is None and not not_shared:
            options = rollout_engine_options(c, self.engine_options, self.model_path)
            not_shared = reason_not_to_share(options, lc.tensor_parallel_size, pick_device_and_dtype(lc.precision)[1])
            if not_shared is None:
                distributed.init()  # under torchrun the engine joins the ranks' group (as after load_policy)
                self._engine = self.engine
        torch.manual_seed(c.seed)  # after the engine, whose start seeds torch too: LoRA init from c.seed
        return load_policy_over_engine(self.model_path, lc, self._engine, adapter, not_shared)

    def sync_adapter(self):
        """Publish the current weights to vLLM (if they changed). Returns (AdapterRef, milliseconds)."""
        if self._served is not None and self._served[0] == self._version:
            return self._served[1], 0.0
        t0 = time.perf_counter()
        full, shards = self.injector.sync_states()
        ref = self.engine.sync_adapter(full, self.injector.peft_config(self.model_name), "rl-policy", shards)
        self._served = (self._version, ref)
        return ref, (time.perf_counter() - t0) * 1e3

    def generate_rollouts(self, records: Sequence[dict], seed: int | None = None) -> Rollout:
        """Sample `group_size` completions per prompt record from vLLM with the trainer's newest adapter."""
        adapter, sync_ms = self.sync_adapter()
        return self._sample(records, seed, adapter, self._version, sync_ms)

    def _sample(self, records: Sequence[dict], seed: int | None, adapter, version: int, sync_ms: float) -> Rollout:
        rollout = sample_rollout(self.engine, self.tokenizer, records, self.config, seed, adapter, self.agent)
        rollout.sync_ms, rollout.adapter_version = sync_ms, version
        return rollout

    def train_on_episodes(self, groups: Sequence[Sequence[RecordedEpisode]]) -> dict:
        """One update on episodes sampled outside the trainer (`agents.recorded`: an agent calling a
        `vllm-train serve` replica), `group_size` per group, with their own rewards; returns the step's
        metrics. Publish the new weights to the server yourself (`save_checkpoint` + `vllm-train push`)."""
        rollout = rollout_from_recorded(groups, self.config.group_size, self.tokenizer, self._version)
        return self.ppo_step([{}] * len(groups), rollout=rollout)

    def rollout_rewards(self, rollout: Rollout) -> torch.Tensor:
        """The rollout's rewards (`rl_rewards.rollout_rewards`)."""
        return rl_rewards.rollout_rewards(rollout, self.reward_fn, self.reward_model)

    def compute_rewards(self, prompts: Sequence[Any], responses: Sequence[str], examples: Sequence[dict] | None = None,
                        completion_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """One float per (prompt, response): the reward function's values, or the reward model's scores."""
        return rl_rewards.score(self.reward_fn, self.reward_model, prompts, responses, examples, completion_ids)

    def _refill(self, rollout: Rollout, rewards_GN: torch.Tensor, target: int,
                more_records: Callable[[int], Sequence[dict]] | None, seed: int | None):
        """DAPO's dynamic sampling: keep the groups whose rewards differ; with `more_records`, sample groups
        for more prompts until `target` do (at most `dynamic_sampling_rounds` rounds; each asks for the missing
        number / the informative share so far). Returns the extended rollout, rewards, the first `target`
        informative groups, the rounds taken."""
        keep_G, rounds = grpo.informative_groups(rewards_GN), 0
        while more_records is not None and int(keep_G.sum()) < target and rounds < self.config.dynamic_sampling_rounds:
            rounds += 1
            missing = target - int(keep_G.sum())
            share = max(keep_G.float().mean().item(), 1.0 / target)
            extra = self.generate_rollouts(more_records(min(target, math.ceil(missing / share))),
                                           None if seed is None else seed + 7919 * rounds)
            extra_GN = self.rollout_rewards(extra).view(-1, self.config.group_size)
            rollout = rollout.extended(extra)
            rewards_GN = torch.cat([rewards_GN, extra_GN])
            keep_G = torch.cat([keep_G, grpo.informative_groups(extra_GN)])
        return rollout, rewards_GN, keep_G & (keep_G.cumsum(0) <= target), rounds

    @torch.no_grad()
    def evaluate(self, records: Any) -> dict:
        """Greedy completions of the current policy (from vLLM): mean reward and share with reward > 0
        (= accuracy for a 0/1 reward such as the toy world's)."""
        records = load_prompt_records(records, "eval dataset", self.reward_fn)
        share = records[distributed.rank()::distributed.world_size()]  # data parallel: each rank a share
        adapter, _ = self.sync_adapter()
        rewards = self.rollout_rewards(sample_rollout(self.engine, self.tokenizer, share, self.config, None, adapter,
                                                      self.agent, greedy=True)) if share else torch.zeros(0)
        total = distributed.all_reduce_sum({"reward": rewards.sum().item(), "correct": (rewards > 0).sum().item()})
        return {"reward": total["reward"] / len(records), "accuracy": total["correct"] / len(records)}

    # ---- saving ----------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the adapter (PEFT format, servable by vLLM as is) -- plus the value head for PPO -- to `path`.
        Under torchrun every rank calls it and rank 0 alone writes."""
        c = self.config
        card = (f"---\nlibrary_name: peft\nbase_model: {self.model_name}\ntags: [lora, vllm-train, {c.algorithm}]\n"
                f"---\n# LoRA adapter ({c.algorithm})\n\nRL-trained with vllm-train ({self.global_step} steps, "
                f"reward: {self._reward_label()}).\n")
        return self.saveable.save(path, self.model_name, card=card)

    def _reward_label(self) -> str:
        return rl_rewards.reward_label(self.reward_fn, self.reward_model, self.environment and self.environment.name)

    def close(self) -> None:
        """Close the engine this trainer made; on a borrowed engine, remove this trainer's adapter
        instead (which also frees the slot its fast sync pinned, for the engine's other users)."""
        if self._engine is not None:
            if self._owns_engine:
                self._engine.close()
            elif self._served is not None:
                self._engine.remove_adapter(self._served[1])
        self._engine, self._served = None, None
