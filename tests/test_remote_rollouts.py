"""GRPO with rollouts from two real vLLM OpenAI server replicas on 127.0.0.1 (CPU in CI).

The model is a random-init tiny Llama (high-entropy next-token distributions: prompts that shared
sampling noise would share samples). Oracles: the trainer's own forward (the step's train/serve
mismatch is ~0 only if the servers sampled from exactly the trainer's adapter version), the samples the
two replicas gave for the same seeds before a replica was killed, and the replicas' `GET /v1/models`.
The tests run in file order: the later ones kill replica 1, then replica 0.
"""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest
from tiny_models import build_flat_llama

from vllm_train.config import LoRATrainConfig, RLHFConfig
from vllm_train.data.tokenize import prompt_ids
from vllm_train.engine import remote
from vllm_train.engine.http_client import replica_state
from vllm_train.errors import VllmTrainError
from vllm_train.evaluation import completion_logprobs
from vllm_train.trainers.rl import RLHFTrainer

pytestmark = pytest.mark.vllm

PROMPTS = [{"prompt": p} for p in ("What is 12 + 30?", "Hello there", "7 7 7 7", "Say something",
                                   "One more prompt", "The last one")]
TOL = 1e-4


def spread_reward(prompt, completion, example) -> float:
    return len(set(completion)) + 0.01 * len(completion)  # differs between a group's samples


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from vllm_train.engine.replicas import ServerConfig, start_servers

    root = tmp_path_factory.mktemp("remote")
    model = build_flat_llama(root / "model", initializer_range=0.02)
    saved = {k: os.environ.get(k) for k in ("VLLM_TRAIN_STAGE_DIR", "VLLM_TRAIN_STATE_DIR")}
    os.environ.update(VLLM_TRAIN_STAGE_DIR=str(root / "stage"), VLLM_TRAIN_STATE_DIR=str(root / "state"))
    # processed log-probs: the test at temperature 2 needs them; at temperature 1 they equal the raw ones
    config = ServerConfig(str(model), replicas=2, max_lora_rank=8, kv_cache_gib=0.0625, startup_timeout=420,
                          logprobs_mode="processed_logprobs", log_dir=str(root / "logs"))
    group = start_servers(config)
    try:
        yield str(model), group
    finally:
        group.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def trainer(servers, tmp_path_factory):
    model, group = servers
    made, engines = [], []

    def make(temperature: float = 1.0, environment: str | None = None, **engine_kwargs) -> RLHFTrainer:
        lora = LoRATrainConfig(rank=8, alpha=16, learning_rate=1e-2, batch_size=64, warmup_ratio=0.0,
                               lr_scheduler="constant", output_dir=str(tmp_path_factory.mktemp("run")))
        config = RLHFConfig(lora_config=lora, rollout_batch_size=4, group_size=4, max_new_tokens=8, seed=0,
                            temperature=temperature, rollout_servers=group.urls, environment=environment,
                            max_turns=2 if environment else None)
        # default: the trainer makes its `ServerRolloutEngine` from rollout_servers; else one of ours
        engine = remote.ServerRolloutEngine(group.urls, model, **engine_kwargs) if engine_kwargs else None
        engines.extend([engine] if engine else [])
        made.append(RLHFTrainer(model, config=config, reward_fn=spread_reward, engine=engine, progress=False,
                                tensorboard=False))
        return made[-1]

    yield make
    for t in made:
        t.close()
    for e in engines:
        e.close()


@pytest.fixture(scope="module")
def policy(trainer):
    return trainer()


def kill(replica) -> None:
    os.killpg(replica.pid, signal.SIGKILL)  # the server and its engine process (one process group)
    replica.process.wait(timeout=30)


def token_ids(trainer, records) -> list[list[int]]:
    return [prompt_ids(trainer.tokenizer, r["prompt"]) for r in records]


def test_grpo_steps_sample_the_trainers_adapter_from_both_replicas(servers, policy):
    _, group = servers
    assert type(policy.engine) is remote.ServerRolloutEngine  # made from RLHFConfig.rollout_servers
    first_ids = token_ids(policy, PROMPTS[:1])[0]
    before = None
    for step in range(2):
        batch = PROMPTS[2 * step:2 * step + 4]
        rollout = policy.generate_rollouts(batch, seed=step)
        if before is None:
            fixed = rollout.completion_ids[0]
            before = completion_logprobs(policy.model, first_ids, fixed)
        stats = policy.ppo_step(batch, rollout=rollout)
        # the servers sampled from exactly the version the trainer published before the rollout
        assert stats["mismatch_abs_logp"] < TOL and abs(stats["mismatch_kl"]) < TOL, stats
        assert policy._served[1].name == f"rl-policy-v{step + 1}"
        assert len(rollout.completion_ids) == 16
        assert len({tuple(c) for c in rollout.completion_ids}) == 16  # every prompt has its own noise
    changed = (completion_logprobs(policy.model, first_ids, fixed) - before).abs().max().item()
    assert changed > 100 * TOL  # so the second step's ~0 mismatch says the servers had the new weights
    assert all(policy.engine.requests_served[u] >= 2 for u in group.urls)  # both replicas sampled
    for url in group.urls:  # publishing keeps the newest two versions on every replica
        assert replica_state(url).versions("rl-policy") == [1, 2]


def trainer_urls(t: RLHFTrainer) -> list[str]:
    return t.config.rollout_servers


def test_temperature_two_samples_the_tempered_policy(trainer):
    hot = trainer(temperature=2.0, name="rl-hot")
    stats = hot.ppo_step(PROMPTS[:4], seed=3)
    assert stats["mismatch_abs_logp"] < TOL, stats  # the servers return the tempered distribution's log-probs
    assert hot._served[1].name == "rl-hot-v1"
    hot.close()  # a borrowed engine: the trainer unloads its version from every replica
    assert all(replica_state(url).versions("rl-hot") == [] for url in trainer_urls(hot))


def _record_completions(monkeypatch) -> list:
    """(replica URL, prompt ids, sampled ids) of every completions request from now on."""
    calls, post = [], remote._post_json

    def record(url, body, timeout, api_key):
        answer = post(url, body, timeout, api_key)
        if url.endswith("/v1/completions") and body.get("return_token_ids"):
            calls.append((url.rsplit("/v1/", 1)[0], list(body["prompt"]), list(answer["choices"][0]["token_ids"])))
        return answer

    monkeypatch.setattr(remote, "_post_json", record)
    return calls


def test_prompts_with_one_affinity_key_go_to_one_replica(servers, policy, monkeypatch):
    _, group = servers
    calls = _record_completions(monkeypatch)
    ids = token_ids(policy, PROMPTS[:5])
    policy.engine.generate(ids, None, max_tokens=2, seed=0, affinity=[5, 5, 5, 2, 2])
    by_prompt = {tuple(p): u for u, p, _ in calls}
    assert [by_prompt[tuple(p)] for p in ids] == [group.urls[1]] * 3 + [group.urls[0]] * 2  # key % replicas


def test_episodes_on_the_servers_keep_each_episode_on_one_replica(servers, trainer, monkeypatch):
    # Multi-turn episodes sampled token-in/token-out on the replicas: a later turn of an episode is prompted
    # with exactly the earlier prompt + its sampled ids + the environment's tokens, on the replica that
    # answered before (its prefix cache holds them); the servers' log-probs equal the trainer's on model
    # tokens. (The flat model seldom ends a turn, and a turn cut by max_new_tokens ends its episode.)
    _, group = servers
    policy = trainer(environment="agent_envs:TryAgain")
    calls = _record_completions(monkeypatch)
    records = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": 1} for r in PROMPTS]
    rollout = policy.generate_rollouts(records, seed=0)
    stats = policy.ppo_step(records, rollout=rollout)
    assert stats["mismatch_abs_logp"] < TOL and 1 < stats["episode_turns"] <= 2, stats
    first, second = calls[:24], calls[24:]
    assert second and {u for u, _, _ in first} == set(group.urls)  # episodes spread over both replicas
    for url, prompt, _ in second:  # each second turn: extends its episode's first, on the same replica
        (url_1,) = [u for u, p, sampled in first if prompt[:len(p) + len(sampled)] == p + sampled]
        assert url_1 == url


def test_grpo_command_trains_and_evaluates_on_the_servers(servers, tmp_path, capsys):
    import json

    from vllm_train.cli import main as cli_main

    model, group = servers
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    out = tmp_path / "run"
    code = cli_main(["grpo", "--model", model, "--prompts", str(prompts), "--eval-prompts", str(prompts),
                     "--reward", f"{__file__}:spread_reward", "--output-dir", str(out), "--num-steps", "1",
                     "--rollout-batch-size", "2", "--group-size", "2", "--max-new-tokens", "4",
                     "--rollout-servers", ",".join(group.urls), "--no-progress"])
    assert code == 0
    assert json.loads((out / "resolved_config.json").read_text())["rollout_servers"] == group.urls
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["mismatch_abs_logp"] < TOL
    assert "eval greedy reward: " in capsys.readouterr().out  # before and after, from the servers
    assert (out / "adapter_model.safetensors").is_file()


def test_a_replica_killed_mid_rollout_leaves_the_full_batch_to_the_other(servers, policy, monkeypatch):
    _, group = servers
    doomed = group.replicas[1]
    policy.sync_adapter()  # the current weights are published on both replicas
    reference = policy.generate_rollouts(PROMPTS[:4], seed=7)
    real_post, first, killed = remote._post_json, threading.Lock(), threading.Event()

    def post(url, body, timeout, api_key):
        """Replica 1 answers its first request of the rollout and dies; its other requests wait for that."""
        if url.startswith(doomed.url) and url.endswith("/completions"):
            if first.acquire(blocking=False):
                answer = real_post(url, body, timeout, api_key)
                kill(doomed)
                killed.set()
                return answer
            killed.wait(timeout=120)
        return real_post(url, body, timeout, api_key)

    monkeypatch.setattr(remote, "_post_json", post)
    served_before = policy.engine.requests_served[doomed.url]
    rollout = policy.generate_rollouts(PROMPTS[:4], seed=7)
    assert doomed.url in policy.engine.failed
    assert policy.engine.requests_served[doomed.url] == served_before + 1
    # the whole batch, and the same samples the two replicas gave for these seeds
    assert rollout.completion_ids == reference.completion_ids
    assert max(abs(a - b) for x, y in zip(rollout.vllm_logps, reference.vllm_logps) for a, b in zip(x, y)) < TOL
    stats = policy.ppo_step(PROMPTS[:4], rollout=rollout)
    assert stats["mismatch_abs_logp"] < TOL, stats

    # a replica down before the rollout: the version it missed is sampled from the other one
    again = policy.engine.generate(token_ids(policy, PROMPTS[:4]), policy._served[1], n=4, temperature=1.0,
                                   max_tokens=8, seed=7, logprobs=True)
    assert [s.token_ids for per_prompt in again for s in per_prompt] == reference.completion_ids

    # a new version cannot be published to every replica: the step fails and the survivor keeps its versions
    kept = replica_state(group.urls[0]).versions("rl-policy")
    with pytest.raises(VllmTrainError, match=f"{re.escape(doomed.url)}.*nothing was published"):
        policy.ppo_step(PROMPTS[:4], seed=8)
    assert replica_state(group.urls[0]).versions("rl-policy") == kept


def test_no_replica_left_raises_one_clear_error(servers, policy):
    _, group = servers
    kill(group.replicas[0])
    with pytest.raises(VllmTrainError, match=r"no rollout server could answer request \d+ of 4") as error:
        policy.engine.generate(token_ids(policy, PROMPTS[:4]), policy._served[1], n=4, temperature=1.0, max_tokens=8,
                               seed=7, logprobs=True)
    assert all(u in str(error.value) for u in group.urls)
