"""RL rollouts: which prompts a step samples, and the samples vLLM returns for them.

A `Rollout` is one step's samples, prompt-major. `RolloutPrefetcher` generates the next step's rollout
in a background thread while the current step updates (``RLHFConfig.max_staleness = 1``): the rollout
is sampled from the adapter version synced just before it was started, so it lags the weights it trains
by one update, and the loss reweights it with vLLM's sampled-token log-probs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vllm_train import distributed
from vllm_train.agents.recorded import RecordedEpisode
from vllm_train.config import RLHFConfig
from vllm_train.data.io import check_text_field, load_records
from vllm_train.engine.kv_budget import rollout_kv_cache_gib
from vllm_train.engine.llm import EngineOptions, RolloutEngine, VLLMEngine, on_cuda, serving_dtype
from vllm_train.engine.remote import ServerRolloutEngine
from vllm_train.errors import VllmTrainError
from vllm_train.rewards.loading import RewardFn, record_check


@dataclass
class Rollout:
    """One step's samples, prompt-major: sample i is completion ``i % group_size`` of prompt ``i // group_size``."""
    prompts: list[Any]  # per sample, as given (text or messages)
    examples: list[dict]  # per sample: the prompt's record (carries e.g. the checkable answer)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    vllm_logps: list[list[float]]  # the sampler's log-probs of the tokens it sampled
    sync_ms: float
    seconds: float
    adapter_version: int = 0  # the trainer's weight version the samples came from
    # Per completion token: 1 = the model generated it, 0 = environment tokens inside a multi-turn episode
    # (tool results, user replies), which no loss or metric counts. None: every token is the model's.
    completion_masks: list[list[int]] | None = None
    episode_stats: list[dict] | None = None  # per sample, multi-turn only (`agents.episode.Episode.stats`)
    environment_rewards: list[float] | None = None  # per sample: the environment's get_reward(), if it has one
    environments: list | None = None  # per sample, multi-turn only: the episode's environment (the user's object)
    messages: list[list[dict]] | None = None  # per sample, multi-turn only: the whole conversation
    given_rewards: list[float] | None = None  # per sample: rewards that came with episodes recorded elsewhere

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def completion_mask(self, i: int) -> list[int]:
        """Sample i's completion mask (all ones for a single-turn completion)."""
        return self.completion_masks[i] if self.completion_masks is not None else [1] * len(self.completion_ids[i])

    def extended(self, more: Rollout) -> Rollout:
        """This rollout's samples followed by `more`'s (same group size)."""
        masks = None
        if self.completion_masks is not None or more.completion_masks is not None:
            masks = [r.completion_mask(i) for r in (self, more) for i in range(len(r.completion_ids))]
        stats = self.episode_stats + more.episode_stats if self.episode_stats and more.episode_stats else None
        env_rewards, environments, messages, given = (
            a + b if a and b else None for a, b in ((self.environment_rewards, more.environment_rewards),
                                                    (self.environments, more.environments),
                                                    (self.messages, more.messages),
                                                    (self.given_rewards, more.given_rewards)))
        return Rollout(self.prompts + more.prompts, self.examples + more.examples, self.prompt_ids + more.prompt_ids,
                       self.completion_ids + more.completion_ids, self.completions + more.completions,
                       self.vllm_logps + more.vllm_logps, self.sync_ms + more.sync_ms, self.seconds + more.seconds,
                       min(self.adapter_version, more.adapter_version), masks, stats, env_rewards, environments,
                       messages, given)


def rollout_stats(rollout: Rollout, rewards_S: torch.Tensor, version: int) -> dict:
    """A step's rollout metrics: sync and sampling time, staleness, reward, accuracy, length (model and
    environment tokens); for multi-turn episodes also `episode_stats`."""
    stats = {"sync_ms": rollout.sync_ms, "rollout_seconds": rollout.seconds,
             "rollout_tok_per_s": rollout.num_tokens / max(rollout.seconds, 1e-9),
             "staleness": version - rollout.adapter_version,  # updates between sampling and this step
             "reward_mean": rewards_S.mean().item(),
             "reward_std": rewards_S.std().item() if len(rewards_S) > 1 else 0.0,
             "accuracy": (rewards_S > 0).float().mean().item(), "response_len": rollout.num_tokens / len(rewards_S)}
    return {**stats, **episode_stats(rollout.episode_stats)} if rollout.episode_stats else stats


def episode_stats(per_episode: list[dict]) -> dict:
    """Means per episode of model turns, tool calls, tool errors and environment tokens; step counts of
    truncated episodes, template fallbacks and tool-call parse failures."""
    def total(key: str) -> float:
        return float(sum(s[key] for s in per_episode))

    n = len(per_episode)
    return {"episode_turns": total("model_turns") / n, "tool_calls": total("tool_calls") / n,
            "tool_errors": total("tool_errors") / n, "env_tokens": total("env_tokens") / n,
            "episodes_truncated": total("truncated"), "template_fallbacks": total("template_fallbacks"),
            "parse_failures": total("parse_failures")}


def load_prompt_records(source: Any, what: str = "prompt dataset", reward_fn: RewardFn | None = None) -> list[dict]:
    """Prompt records ``{"prompt": text or chat messages, ...any fields the reward reads}``; with `reward_fn`,
    the fields it reads are checked too (`rewards.loading.record_check`), each bad record named by file:line."""
    reads = record_check(reward_fn)
    return load_records(source, lambda r: check_text_field(r, "prompt", allow_messages=True) or (
        reads(r) if reads else None), what=what)


def step_records(records: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """The step's prompts: a seeded permutation per pass over the data (resumable from `step` alone)."""
    n, out = len(records), []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(records[order[pos]])
    return out


def rank_step_records(records: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """This data-parallel rank's share of the step's `batch_size` prompts (all of them in one process)."""
    return distributed.local_share(step_records(records, step, batch_size, seed), "rollout_batch_size")


def check_rank_shares(rollout_batch_size: int) -> None:
    """Refuse, before any rollout, a step's prompts that do not split evenly over the data-parallel ranks."""
    world = distributed.world_size()
    if world > 1 and rollout_batch_size % world:
        raise VllmTrainError(f"rollout_batch_size: {rollout_batch_size} prompts do not split evenly over "
                             f"{world} ranks")


def keep_on_every_rank(keep_G: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling under data parallelism: each rank refilled its own share and found its own number
    of informative groups; every rank trains on its first ``min over ranks`` of them (none anywhere: every
    rank skips the update). Equal batches keep the ranks' updates in step -- the same collectives (loss
    normaliser, gradient all-reduce) on every rank -- and each rank's share of the update equal.
    One process: `keep_G` as is."""
    agreed = distributed.all_reduce_min(int(keep_G.sum()))
    return keep_G & (keep_G.cumsum(0) <= agreed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The sampling seed of a step on one data-parallel rank (each prompt then gets its own, see
    `VLLMEngine.generate`). Ranks other than 0 hash in their rank: their prompts are other prompts,
    and equal seeds would give them the same sampling noise."""
    if rank == 0:
        return seed * 1_000_003 + step
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest(), "little") >> 2


def refill_source(records: list[dict], step: int, seed: int) -> Callable[[int], list[dict]]:
    """Extra prompts for dynamic sampling at `step`: random draws seeded by the step (resumable) and the
    data-parallel rank (each rank refills its own share with other prompts)."""
    generator = torch.Generator().manual_seed(step_seed(seed, step, distributed.rank()) + 1)
    return lambda k: [records[i] for i in torch.randint(len(records), (k,), generator=generator).tolist()]


class RolloutPrefetcher:
    """Runs one rollout for the next step in a background thread while the caller updates.

    The caller syncs the adapter *before* `start` (in its own thread, between updates) and hands the
    background job that version, so the job never reads weights an optimizer step is changing; and it
    calls `wait` before it drives the engine itself again (sync, evaluation), so one thread at a time
    drives vLLM.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-train-rollout")
        self._pending: tuple[int, Future] | None = None

    def start(self, step: int, sample: Callable[[], Rollout]) -> None:
        assert self._pending is None, "one rollout in flight at a time"
        self._pending = (step, self._pool.submit(sample))

    def wait(self) -> None:
        """Let the rollout in flight finish (its result stays for `take`)."""
        if self._pending is not None:
            self._pending[1].result()

    def take(self, step: int) -> Rollout | None:
        """The rollout started for `step` (waiting for it), or None if none was."""
        if self._pending is None or self._pending[0] != step:
            self.wait()
            self._pending = None
            return None
        future, self._pending = self._pending[1], None
        return future.result()

    def close(self) -> None:
        self.wait()
        self._pending = None
        self._pool.shutdown(wait=True)


def rollout_engine_options(config: RLHFConfig, engine_options: EngineOptions | None,
                           model_path: str) -> EngineOptions:
    """The options of the trainer's own in-process engine: the ones given, else the config's. On CUDA the
    config's KV cache is sized to one rollout batch (`rollout_kv_cache_gib`), not a share of the GPU: the
    memory vLLM would leave unused is the update's."""
    if engine_options is not None:
        return engine_options
    extra = {} if config.temperature == 1.0 else {"logprobs_mode": "processed_logprobs"}
    lc = config.lora_config
    options = EngineOptions(max_lora_rank=lc.engine_max_lora_rank, seed=config.seed, extra=extra,
                            tensor_parallel_size=lc.tensor_parallel_size)
    if on_cuda():  # this rank's prompts: under data parallelism a share of the step's
        dtype_bytes = 4 if serving_dtype(options) == "float32" else 2
        prompts = -(-config.rollout_batch_size // distributed.world_size())
        options.kv_cache_gib = rollout_kv_cache_gib(model_path, prompts, config.group_size,
                                                    config.max_new_tokens, dtype_bytes,
                                                    tensor_parallel_size=lc.tensor_parallel_size)
    return options


def make_rollout_engine(config: RLHFConfig, model_path: str, engine_options: EngineOptions | None) -> RolloutEngine:
    """With ``rollout_servers`` the running vLLM servers (`ServerRolloutEngine`: rollouts and evaluation),
    else a `VLLMEngine` in this process."""
    if config.rollout_servers:
        return ServerRolloutEngine(config.rollout_servers, model_path)
    return VLLMEngine(model_path, rollout_engine_options(config, engine_options, model_path))


def rollout_from_recorded(groups: Sequence[Sequence[RecordedEpisode]], group_size: int, tokenizer,
                          version: int) -> Rollout:
    """Episodes recorded outside the trainer (`agents.recorded`), `group_size` per group, as a `Rollout`
    whose rewards are the episodes' own. `version`: the weights they are taken to come from."""
    if not groups:
        raise VllmTrainError("train_on_episodes: no group of episodes given")
    for g, group in enumerate(groups):
        if len(group) != group_size:
            raise VllmTrainError(f"train_on_episodes: group {g} has {len(group)} episodes; every group needs "
                                 f"group_size={group_size} (episodes of one prompt, compared with each other)")
        for e, episode in enumerate(group):
            if not isinstance(episode, RecordedEpisode):
                raise VllmTrainError(f"train_on_episodes: group {g} episode {e} is a {type(episode).__name__}, "
                                     f"not a RecordedEpisode")
            episode.check(f"train_on_episodes: group {g} episode {e}")
    episodes = [e for group in groups for e in group]
    prompts = [tokenizer.decode(e.prompt_ids) for e in episodes]
    return Rollout(prompts=prompts, examples=[{"prompt": p} for p in prompts],
                   prompt_ids=[list(e.prompt_ids) for e in episodes],
                   completion_ids=[list(e.completion_ids) for e in episodes],
                   completions=[tokenizer.decode([t for t, m in zip(e.completion_ids, e.completion_mask) if m])
                                for e in episodes],
                   vllm_logps=[list(e.logprobs) for e in episodes], sync_ms=0.0, seconds=0.0,
                   adapter_version=version, completion_masks=[list(e.completion_mask) for e in episodes],
                   given_rewards=[float(e.reward) for e in episodes])

