"""Sampling a step's rollout from the in-process engine: single completions, or multi-turn episodes.

Both end in the same `Rollout` (prompt ids, completion ids, the sampler's log-probs), which the one
reward / advantage / loss path trains on; episodes add a completion mask (0 on environment tokens),
per-episode stats and, when the environment defines ``get_reward``, its rewards.

Episodes run **turn-synchronously** (`sample_episodes`): one environment instance per episode, then one
`engine.generate` per turn over every live episode's ``input_ids`` -- token ids, never re-rendered text,
so turn k+1's prompt is exactly turn k's ids plus the new segment, and vLLM's prefix cache reuses turn
k's KV -- and `agents.turns.take_turn` per episode; finished episodes drop out. A single-turn rollout is
the case without an environment: one turn, ``n = group_size`` samples per prompt in one call.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_train.agents.environment import EnvironmentClass, EnvironmentInstance, load_environment
from vllm_train.agents.episode import Episode
from vllm_train.agents.turns import ModelTurn, TurnRules, begin_episode, take_turn
from vllm_train.config import RLHFConfig
from vllm_train.data.tokenize import prompt_ids as encode_prompt
from vllm_train.errors import VllmTrainError
from vllm_train.rewards.loading import episode_parameters, reward_name
from vllm_train.trainers.rl_rollouts import Rollout


@dataclass(frozen=True)
class Agent:
    """What multi-turn rollouts need besides the engine: the environment class and the turn rules."""
    environment: EnvironmentClass
    rules: TurnRules
    max_episode_tokens: int | None
    tool_timeout: float

    @staticmethod
    def of(environment: EnvironmentClass, tokenizer, config: RLHFConfig) -> Agent:
        rules = TurnRules.for_tokenizer(tokenizer, config.tool_parser, config.max_turns)
        return Agent(environment, rules, config.max_episode_tokens, config.tool_timeout)


def load_agent_environment(spec: type | str | None, reward_model: str | None, reward_fn,
                           require_reward: bool = True) -> EnvironmentClass | None:
    """The environment class (None: single-turn), loaded and checked. One of a reward model or function, or
    neither when the environment defines ``get_reward`` (or, without `require_reward`, when the rewards
    come with the episodes: `RLHFTrainer.train_on_episodes`)."""
    if reward_model is not None and reward_fn is not None:
        raise VllmTrainError("give one of a reward model (reward_model_name) or a reward function, not both")
    environment = load_environment(spec) if spec else None
    needs = episode_parameters(reward_fn) if reward_fn is not None and environment is None else []
    if needs:
        raise VllmTrainError(f"reward {reward_name(reward_fn)} takes {needs[0]}=, which only multi-turn episodes "
                             f"have: give an environment (--environment MODULE:CLASS) or a default for {needs[0]}")
    if require_reward:
        check_reward_given(environment, reward_model, reward_fn)
    return environment


def check_reward_given(environment: EnvironmentClass | None, reward_model, reward_fn) -> None:
    """Sampled rollouts need a reward: a model, a function, or the environment's ``get_reward``."""
    if reward_model is None and reward_fn is None and (environment is None or not environment.has_reward):
        what = f"environment {environment.name} defines no get_reward" if environment else "no reward given"
        raise VllmTrainError(f"{what}: give a reward function or a reward model")


def check_environment(environment: EnvironmentClass, record: dict, tool_timeout: float) -> None:
    """One instance made and reset with `record`: the constructor's and reset's errors surface before a
    model loads (respond and get_reward run only in episodes)."""
    environment.create(tool_timeout).reset(dict(record))


def sample_rollout(engine, tokenizer, records: Sequence[dict], config: RLHFConfig, seed: int | None, adapter,
                   agent: Agent | None = None, greedy: bool = False) -> Rollout:
    """`group_size` samples per record (one with `greedy`): completions, or episodes with `agent`.
    The caller fills in ``sync_ms`` and ``adapter_version``."""
    n = 1 if greedy else config.group_size
    sampling = dict(temperature=0.0 if greedy else config.temperature, top_p=1.0 if greedy else config.top_p)
    t0 = time.perf_counter()
    if agent is not None:
        return rollout_from_episodes(records, n, *sample_episodes(engine, agent, records, n, config.max_new_tokens,
                                                                  seed, adapter, sampling), time.perf_counter() - t0)
    ids = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    outputs = engine.generate(ids, adapter, n=n, max_tokens=config.max_new_tokens, seed=seed, logprobs=True,
                              **sampling)
    samples = [s for per_prompt in outputs for s in per_prompt]
    return Rollout(prompts=[r["prompt"] for r in records for _ in range(n)],
                   examples=[r for r in records for _ in range(n)], prompt_ids=[p for p in ids for _ in range(n)],
                   completion_ids=[list(s.token_ids) for s in samples], completions=[s.text for s in samples],
                   vllm_logps=[list(s.logprobs or []) for s in samples], sync_ms=0.0,
                   seconds=time.perf_counter() - t0)


def sample_episodes(engine, agent: Agent, records: Sequence[dict], n: int, max_new_tokens: int, seed: int | None,
                    adapter, sampling: dict) -> tuple[list[Episode], list[EnvironmentInstance]]:
    """`n` episodes per record, sampled turn by turn (see the module docstring)."""
    envs = [agent.environment.create(agent.tool_timeout) for _ in records for _ in range(n)]
    episodes = [begin_episode(agent.rules, r["prompt"], r, envs[i * n + j], agent.max_episode_tokens)
                for i, r in enumerate(records) for j in range(n)]
    live, turn = list(range(len(episodes))), 0
    while live:
        budgets = [episodes[i].tokens_left for i in live]
        max_tokens = max_new_tokens if None in budgets else min(max_new_tokens, max(budgets))  # cut per episode
        outputs = engine.generate([episodes[i].input_ids for i in live], adapter, n=1, max_tokens=max_tokens,
                                  seed=_turn_seed(seed, turn), logprobs=True, affinity=live, **sampling)
        still = []
        for i, (sample,) in zip(live, outputs):
            model_turn = ModelTurn(list(sample.token_ids), list(sample.logprobs), sample.text, sample.finish_reason)
            if take_turn(episodes[i], model_turn, envs[i], agent.rules):
                still.append(i)
        live, turn = still, turn + 1
    return episodes, envs


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """The step's seed for turn 0, a hash of (seed, turn) after (the engine spreads it over the prompts)."""
    if seed is None or turn == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:turn:{turn}".encode(), digest_size=8).digest(), "little") >> 2


def rollout_from_episodes(records: Sequence[dict], n: int, episodes: list[Episode], envs: list[EnvironmentInstance],
                          seconds: float) -> Rollout:
    """The episodes as a prompt-major `Rollout`: the completion is everything after the prompt (its mask 0
    on environment tokens); a reward function reads the last model turn's text."""
    env_rewards = [env.reward() for env in envs] if envs and envs[0].kind.has_reward else None
    return Rollout(prompts=[r["prompt"] for r in records for _ in range(n)],
                   examples=[r for r in records for _ in range(n)],
                   prompt_ids=[e.input_ids[:e.prompt_length] for e in episodes],
                   completion_ids=[e.completion_ids for e in episodes],
                   completions=[_last_assistant_text(e) for e in episodes],
                   vllm_logps=[e.completion_logprobs for e in episodes], sync_ms=0.0, seconds=seconds,
                   completion_masks=[e.completion_mask for e in episodes],
                   episode_stats=[e.stats() for e in episodes], environment_rewards=env_rewards,
                   environments=[env.instance for env in envs], messages=[e.messages for e in episodes])


def _last_assistant_text(episode: Episode) -> str:
    texts = [m.get("content") or "" for m in episode.messages if m.get("role") == "assistant"]
    return texts[-1] if texts else ""
