"""Multi-turn RL episodes on the real vLLM engine (the session's `engine`) with the toy model.

Oracles: the ids vLLM is fed at turn k+1 are turn k's ids + its sample + the environment's segment (never
re-tokenized); vLLM's sampled log-probs equal the trainer's forward on whole episodes at model tokens; the
toy chat template's own rendering of the environment's reply; the counters the metrics report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import agent_envs
import pytest
import torch
from tolerances import MISMATCH_TOL, assert_served_logprobs

from vllm_train.agents.recorded import EpisodeRecorder, RecordedEpisode
from vllm_train.agents.tool_calls import ParsedTurn, ToolCall
from vllm_train.cli import main as cli_main
from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig, RLHFConfig
from vllm_train.errors import VllmTrainError
from vllm_train.rewards import TOY_REWARD
from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records
from vllm_train.trainers.rl_policy import CompletionBatch
from vllm_train.trainers.rl_rollouts import rollout_stats
from vllm_train.trainers.rl_sampling import sample_rollout

TESTS = Path(__file__).resolve().parent


def _config(tmp_path, **kw) -> RLHFConfig:
    lora = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), learning_rate=2e-3,
                           batch_size=64, warmup_ratio=0.0, lr_scheduler="constant", output_dir=str(tmp_path))
    defaults = dict(rollout_batch_size=2, group_size=2, max_new_tokens=8, seed=0, max_turns=3,
                    environment="agent_envs:TryAgain")
    return RLHFConfig(lora_config=lora, **{**defaults, **kw})


@pytest.fixture
def env_trainer(tiny_model, engine):
    made = []

    def make(config: RLHFConfig, **kwargs) -> RLHFTrainer:
        made.append(RLHFTrainer(tiny_model, config=config, engine=engine, progress=False, **kwargs))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def _recording(engine, monkeypatch) -> list:
    """Every generate call's (prompt ids, samples)."""
    calls, generate = [], engine.generate

    def record(prompts, adapter=None, **kw):
        out = generate(prompts, adapter, **kw)
        calls.append(([list(p) for p in prompts], [o[0] for o in out]))
        return out

    monkeypatch.setattr(engine, "generate", record)
    return calls


def test_turns_extend_the_ids_and_logprobs_match_the_trainer(tmp_path, shipped, engine, env_trainer, monkeypatch):
    trainer = env_trainer(_config(tmp_path))  # get_reward: no reward function needed
    tok = trainer.tokenizer
    records = load_prompt_records(shipped("rl_train.jsonl"))[:2]
    calls = _recording(engine, monkeypatch)
    rollout = trainer.generate_rollouts(records, seed=0)
    assert len(calls) == 3  # max_turns 3: one generate per turn over the live episodes
    bridge = tok.encode("<|user|>try again<|end|><|assistant|>", add_special_tokens=False)  # the template's text
    for (prompts, samples), (following, _) in zip(calls, calls[1:]):
        # the toy model ends its turns on <|end|>: vLLM's token ids include it
        assert all(s.token_ids[-1] == tok.eos_token_id for s in samples), [s.token_ids for s in samples]
        assert following == [p + s.token_ids + bridge for p, s in zip(prompts, samples)]
    stats = [s for s in rollout.episode_stats]
    assert [s["model_turns"] for s in stats] == [3] * 4 and all(s["truncated"] for s in stats)  # max turns counted
    for i in range(4):  # the rollout is the episode: prompt + every turn and reply, mask 0 on the replies
        assert rollout.prompt_ids[i] + rollout.completion_ids[i] == calls[-1][0][i] + calls[-1][1][i].token_ids
        assert sum(rollout.completion_masks[i]) == sum(len(c[1][i].token_ids) for c in calls)
    batch = CompletionBatch.of(rollout, list(range(4)))
    logps_BT, _ = trainer.policy.forward_all(batch)
    assert_served_logprobs(batch.vllm_logps_BT[batch.mask_BT].float(), logps_BT[batch.mask_BT], what="episodes")
    step = trainer.ppo_step(records, seed=0, rollout=rollout)
    assert step["episode_turns"] == 3 and step["episodes_truncated"] == 4 and step["tool_calls"] == 0
    assert step["env_tokens"] == 2 * len(bridge) and step["mismatch_abs_logp"] < MISMATCH_TOL


def test_ppo_trains_on_episodes(tmp_path, shipped, env_trainer):
    # values and GAE over model tokens only (the environment's replies are not steps of the policy)
    trainer = env_trainer(_config(tmp_path, algorithm="ppo", max_turns=2))
    stats = trainer.ppo_step(load_prompt_records(shipped("rl_train.jsonl"))[:2], seed=0)
    assert stats["episode_turns"] == 2 and stats["mismatch_abs_logp"] < MISMATCH_TOL
    assert torch.isfinite(torch.tensor([stats["loss"], stats["value_loss"]])).all()


def test_dapo_refills_with_episodes(tmp_path, shipped, env_trainer):
    # TryAgain's reward is 0 for the toy model's first answers: no informative group, so a refill round
    # samples episodes for more prompts and extends the rollout (its masks, stats and environment rewards)
    trainer = env_trainer(_config(tmp_path, algorithm="dapo", max_turns=1, dynamic_sampling=True,
                                  dynamic_sampling_rounds=1))
    records = load_prompt_records(shipped("rl_train.jsonl"))
    seen = []
    stats = trainer.ppo_step(records[:2], seed=0, more_records=lambda k: seen.append(k) or records[2:2 + k])
    assert seen and stats["refill_rounds"] == 1 and stats["episode_turns"] == 1
    assert stats.get("skipped") or torch.isfinite(torch.tensor(stats["loss"]))


def test_token_budget_cuts_episodes(tmp_path, shipped, engine, env_trainer):
    # no max_turns and an environment that always replies: only the budget (24 tokens after the prompt:
    # room for a second or third turn, not a fourth) ends the episodes, truncated
    trainer = env_trainer(_config(tmp_path, max_turns=None, max_episode_tokens=24), reward_fn=TOY_REWARD)
    records = load_prompt_records(shipped("rl_train.jsonl"))[:2]
    adapter, _ = trainer.sync_adapter()
    rollout = sample_rollout(engine, trainer.tokenizer, records, trainer.config, 0, adapter, trainer.agent)
    assert all(len(c) <= 24 for c in rollout.completion_ids)
    assert all(s["truncated"] and 2 <= s["model_turns"] <= 3 for s in rollout.episode_stats), rollout.episode_stats
    # a reward function given: it scores the last assistant turn (the toy reward reads the answer)
    assert trainer.rollout_rewards(rollout).shape == (4,)


def test_tool_calls_run_in_the_environment_and_are_counted(tmp_path, shipped, engine, env_trainer):
    # The toy model writes no tool calls: a stub parser reads every turn as add(2, 3) and divide(1, 0).
    trainer = env_trainer(_config(tmp_path, environment="agent_envs:Calculator", max_turns=2))
    calls = [ToolCall("add", {"a": 2, "b": 3}), ToolCall("divide", {"a": 1, "b": 0})]
    agent = dataclasses.replace(trainer.agent, rules=dataclasses.replace(
        trainer.agent.rules, parser=lambda text: ParsedTurn(text, calls)))
    adapter, _ = trainer.sync_adapter()
    rollout = sample_rollout(engine, trainer.tokenizer, load_prompt_records(shipped("rl_train.jsonl"))[:1],
                             trainer.config, 0, adapter, agent)
    tok = trainer.tokenizer
    for ids, mask, stats in zip(rollout.completion_ids, rollout.completion_masks, rollout.episode_stats):
        assert stats["model_turns"] == 2 and stats["tool_calls"] == 4 and stats["tool_errors"] == 2
        env_text = tok.decode([t for t, m in zip(ids, mask) if not m])  # the tool results, masked out
        assert "5" in env_text and "ZeroDivisionError" in env_text, env_text
    assert rollout.environment_rewards == [2.0, 2.0]  # add ran once per turn in each episode's own instance
    assert rollout_stats(rollout, torch.tensor(rollout.environment_rewards), 0)["tool_errors"] == 2
    check_rewards_see_the_episodes(trainer, rollout)


def check_rewards_see_the_episodes(trainer, rollout) -> None:
    """Both reward shapes get each episode's own environment and its whole conversation (tool turns too)."""
    seen = []

    def ours(prompt, completion, example, *, environment, messages):
        seen.append((environment, messages))
        return float(sum(environment.results))  # the episode's own instance: its tool results (5 + 5)

    def trl_shaped(completions, environments, messages, **kwargs):
        assert [m[len(p):] for p, m in zip(kwargs["prompts"], messages)] == completions
        return [float(len(c)) for c in completions]

    trainer.reward_fn = ours
    assert trainer.rollout_rewards(rollout).tolist() == [10.0, 10.0]
    (env_a, messages_a), (env_b, _) = seen
    assert isinstance(env_a, agent_envs.Calculator) and env_a is not env_b
    assert messages_a[:len(rollout.prompts[0])] == rollout.prompts[0]
    roles = [m["role"] for m in messages_a[len(rollout.prompts[0]):]]
    assert roles == ["assistant", "tool", "tool", "assistant", "tool", "tool"], roles
    assert [m["content"] for m in messages_a if m["role"] == "tool"][0] == "5"
    trainer.reward_fn = trl_shaped  # a chat completion is every message after the prompt, as in TRL
    assert trainer.rollout_rewards(rollout).tolist() == [6.0, 6.0]


@pytest.mark.parametrize("cls, message", [
    ("BrokenRespond", "environment BrokenRespond.respond raised ValueError: bad state"),
    ("BadReward", "environment BadReward.get_reward returned str 'yes'"),
])
def test_environment_errors_in_episodes_name_class_and_method(tmp_path, shipped, env_trainer, cls, message):
    trainer = env_trainer(_config(tmp_path, environment=f"agent_envs:{cls}"))
    with pytest.raises(VllmTrainError, match=message):
        trainer.ppo_step(load_prompt_records(shipped("rl_train.jsonl"))[:2], seed=0)


@pytest.mark.parametrize("extra, message", [
    (["--environment", "agent_envs:Nope"], "'agent_envs' has no attribute 'Nope'"),
    (["--environment", "no_such_env_module:C"], "importing 'no_such_env_module' failed"),
    (["--environment", "agent_envs:NoReward"], "environment NoReward defines no get_reward"),
    (["--environment", "agent_envs:BrokenConstructor"], "BrokenConstructor(): the constructor raised RuntimeError"),
    (["--environment", "agent_envs:BrokenReset"], "BrokenReset.reset raised KeyError"),
    (["--environment", "agent_envs:TryAgain", "--tool-parser", "xml"], "tool-call parser 'xml': unknown"),
    (["--max-turns", "2"], "set only with environment"),
    (["--environment", "agent_envs:TryAgain", "--max-turns", "0"], "max_turns"),
])
def test_cli_environment_errors_exit_2_in_one_line(tmp_path, tiny_model, shipped, capsys, extra, message):
    argv = ["grpo", "--model", tiny_model, "--prompts", str(shipped("rl_train.jsonl")), "--output-dir",
            str(tmp_path / "out"), *extra]
    assert cli_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_cli_grpo_with_an_environment_writes_episode_metrics(tmp_path, tiny_model, shipped):
    out, eval_prompts = tmp_path / "run", tmp_path / "eval.jsonl"
    eval_prompts.write_text("".join(shipped("rl_eval.jsonl").read_text().splitlines(keepends=True)[:3]))
    argv = [sys.executable, "-m", "vllm_train.cli", "grpo", "--model", tiny_model, "--prompts",
            str(shipped("rl_train.jsonl")), "--eval-prompts", str(eval_prompts),  # greedy episodes
            "--environment", "agent_envs:TryAgain", "--max-turns", "3",
            "--num-steps", "2", "--rollout-batch-size", "2", "--group-size", "2", "--max-new-tokens", "6",
            "--output-dir", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert 1 <= s["episode_turns"] <= 3 and s["env_tokens"] > 0 and torch.isfinite(torch.tensor(s["loss"]))
        assert {"tool_calls", "tool_errors", "episodes_truncated", "template_fallbacks", "parse_failures"} <= set(s)
    assert (out / "adapter_model.safetensors").exists() and "eval greedy reward" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if "eval greedy reward" in x)  # TryAgain.get_reward, 0 or 1
    assert all(0.0 <= float(v) <= 1.0 for v in line.split(":")[1].split("(")[0].split("->")), line
    assert agent_envs.TryAgain  # the module the run imported by name


def test_a_reward_that_needs_an_episode_is_refused_without_an_environment(tmp_path, tiny_model):
    def needs_environment(prompt, completion, example, *, environment):
        return 0.0

    with pytest.raises(VllmTrainError, match="takes environment=, which only multi-turn episodes have"):
        RLHFTrainer(tiny_model, config=_config(tmp_path, environment=None, max_turns=None),
                    reward_fn=needs_environment)


def test_episode_fields_need_an_environment_from_the_config_or_the_trainer(tmp_path, tiny_model):
    # the config alone cannot tell (environment_factory is the trainer's argument): the trainer checks
    config = _config(tmp_path, environment=None, max_turns=2)
    with pytest.raises(VllmTrainError, match="'max_turns': 2 is invalid .set only with environment"):
        RLHFTrainer(tiny_model, config=config, reward_fn=TOY_REWARD)


def _recorded_groups(rollout, rewards, group_size: int) -> list[list[RecordedEpisode]]:
    episodes = [RecordedEpisode(rollout.prompt_ids[i], rollout.completion_ids[i], rollout.completion_mask(i),
                                rollout.vllm_logps[i], float(rewards[i])) for i in range(len(rewards))]
    return [episodes[g:g + group_size] for g in range(0, len(episodes), group_size)]


def test_train_on_episodes_makes_the_update_ppo_step_makes(tmp_path, shipped, env_trainer):
    # Oracle: the same episodes and rewards through ppo_step (reward function, sampled here) and through
    # train_on_episodes (recorded elsewhere: no reward given to that trainer) update the adapter alike.
    config = _config(tmp_path, max_turns=2)
    sampler, learner = env_trainer(config, reward_fn=TOY_REWARD), env_trainer(_config(tmp_path, environment=None,
                                                                                       max_turns=None))
    records = load_prompt_records(shipped("rl_train.jsonl"))[:2]
    rollout = sampler.generate_rollouts(records, seed=0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # hand-set: both groups informative
    rollout.given_rewards = rewards.tolist()  # both trainers learn from these rewards
    before = [p.detach().clone() for p in learner.params]
    assert all(torch.equal(a, b) for a, b in zip(before, sampler.params))  # the same seeded start
    expected = sampler.ppo_step(records, rollout=rollout)
    got = learner.train_on_episodes(_recorded_groups(rollout, rewards, 2))
    assert got["reward_mean"] == expected["reward_mean"] == 0.5
    assert abs(got["loss"] - expected["loss"]) <= 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(learner.params, sampler.params)) <= 1e-6
    assert sum(not torch.equal(a, start) for a, start in zip(learner.params, before)) >= len(before) // 2  # the Bs


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g[0].pop(), "group 0 has 1 episodes; every group needs group_size=2"),
    (lambda g: setattr(g[1][0], "logprobs", g[1][0].logprobs[:-1]), "group 1 episode 0: logprobs has"),
    (lambda g: setattr(g[0][1], "reward", float("nan")), "group 0 episode 1: reward must be a finite number"),
    (lambda g: setattr(g[0][0], "completion_mask", [0] * len(g[0][0].completion_mask)), "at least one model token"),
])
def test_train_on_episodes_refuses_bad_episodes_and_changes_nothing(tmp_path, shipped, env_trainer, mutate, message):
    trainer = env_trainer(_config(tmp_path, max_turns=1), reward_fn=TOY_REWARD)
    rollout = trainer.generate_rollouts(load_prompt_records(shipped("rl_train.jsonl"))[:2], seed=0)
    groups = _recorded_groups(rollout, [1.0, 0.0, 0.0, 1.0], 2)
    mutate(groups)
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(VllmTrainError, match=message):
        trainer.train_on_episodes(groups)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params)) and trainer.global_step == 0


def test_recorder_stitches_turns_and_refuses_a_rerendered_prompt():
    recorder = EpisodeRecorder()
    recorder.add_turn([1, 2, 3], [10, 11], [-0.5, -0.25])
    recorder.add_turn([1, 2, 3, 10, 11, 20, 21], [12], [-1.0])  # 20, 21: the environment's reply
    episode = recorder.episode(reward=1.0)
    assert episode.prompt_ids == [1, 2, 3] and episode.completion_ids == [10, 11, 20, 21, 12]
    assert episode.completion_mask == [1, 1, 0, 0, 1] and episode.logprobs == [-0.5, -0.25, 0.0, 0.0, -1.0]
    assert episode.turns == 2
    with pytest.raises(VllmTrainError, match="turn 3: its prompt does not extend the episode so far .* position 4"):
        recorder.add_turn([1, 2, 3, 10, 99, 20], [13], [-1.0])  # turn 1's answer re-rendered as 99
    with pytest.raises(VllmTrainError, match="differ at position 3"):
        recorder.add_turn([1, 2, 3], [13], [-1.0])  # a prompt shorter than the episode so far
    assert recorder.turns == 2 and len(recorder.completion_ids) == 5  # nothing appended


def test_overlapped_rollouts_sample_episodes_one_update_behind(tmp_path, shipped, env_trainer):
    # --max-staleness 1 with an environment: step 2 trains on episodes sampled (in the background) from
    # the weights before step 1's update, and says so; the episodes are whole (turns, masks, stats)
    trainer = env_trainer(_config(tmp_path, max_turns=2, max_staleness=1, group_size=4),  # rewards that differ
                          reward_fn=lambda prompt, completion, example: float(zlib.crc32(completion.encode()) % 7))
    trainer.train(load_prompt_records(shipped("rl_train.jsonl"))[:8], num_steps=2)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["staleness"] for s in steps] == [0, 1]
    assert all(s["episode_turns"] == 2 and s["env_tokens"] > 0 and "rollout_wait_seconds" in s for s in steps)
    assert steps[0]["mismatch_abs_logp"] < MISMATCH_TOL < steps[1]["mismatch_abs_logp"]  # one update behind
