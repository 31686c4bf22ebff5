"""`ServerRolloutEngine`'s spread, retry and answer checks against a fake HTTP layer (no vLLM, no server).

The fake answers the completions API the way vLLM 0.32 does (``choices[i].token_ids`` with
``return_token_ids``, ``logprobs.token_logprobs`` with ``logprobs=0``); each sample's token ids encode the
prompt and the request's seed, so a sample that came back for the wrong prompt, or from a request with
the wrong seed, is caught. test_remote_rollouts.py runs the same engine against real vLLM servers.
"""

from __future__ import annotations

import threading

import pytest

from vllm_train.engine import remote
from vllm_train.engine.http_client import HTTPFailure
from vllm_train.engine.llm import AdapterRef, request_seeds
from vllm_train.engine.remote import ServerRolloutEngine
from vllm_train.errors import VllmTrainError

URLS = ["http://replica-a:8000", "http://replica-b:8001"]
ADAPTER = AdapterRef("rl-policy-v3", 3, "/staged/rl-policy-v3")


def answer(body: dict, choices: int | None = None) -> dict:
    """What vLLM answers: sample j of a prompt is (first prompt token, its seed's last digits, j)."""
    out = []
    for j in range(body["n"] if choices is None else choices):
        ids = [body["prompt"][0], body["seed"] % 1000, j]
        lps = [-0.5, -1.0, -1.5] if body["logprobs"] is not None else None
        out.append({"index": j, "text": " ".join(map(str, ids)), "token_ids": ids, "finish_reason": "length",
                    "logprobs": {"token_logprobs": lps} if lps else None})
    return {"choices": out}


class FakeReplicas:
    """Dispatches by URL; `behaviour[url](call_number, body)` may raise or return a broken answer."""

    def __init__(self, behaviour=None):
        self.behaviour = behaviour or {}
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, url: str, body: dict | None, timeout: float, api_key: str | None):
        base = url.split("/v1/")[0]
        with self.lock:
            self.calls.append((base, body))
            k = sum(1 for u, _ in self.calls if u == base)
        if base in self.behaviour:
            result = self.behaviour[base](k, body)
            if result is not None:
                return result
        return answer(body)

    def served(self, url: str) -> int:
        return sum(1 for u, _ in self.calls if u == url)


def refused(k, body):
    raise HTTPFailure(URLS[0], "failed (Connection refused)")


@pytest.fixture
def make_engine(monkeypatch):
    made = []

    def make(behaviour=None) -> tuple[ServerRolloutEngine, FakeReplicas]:
        fake = FakeReplicas(behaviour)
        monkeypatch.setattr(remote, "_post_json", fake)
        made.append(ServerRolloutEngine(URLS, "unused-model", max_concurrency=4))
        return made[-1], fake

    yield make
    for engine in made:
        engine.close()


def check_batch(out, prompts, n, seed):
    """Every prompt got its own `n` samples, in order, from a request carrying its own seed."""
    assert len(out) == len(prompts)
    for prompt, seed_i, samples in zip(prompts, request_seeds(seed, len(prompts)), out):
        assert [s.token_ids for s in samples] == [[prompt[0], seed_i % 1000, j] for j in range(n)]
        assert all(s.logprobs == [-0.5, -1.0, -1.5] for s in samples)


def test_prompts_spread_over_replicas_each_with_its_own_seed(make_engine):
    engine, fake = make_engine()
    prompts = [[10 + i, 7] for i in range(6)]
    out = engine.generate(prompts, ADAPTER, n=2, temperature=1.0, top_p=0.9, max_tokens=3, seed=11, logprobs=True)
    check_batch(out, prompts, 2, 11)
    assert fake.served(URLS[0]) == fake.served(URLS[1]) == 3
    bodies = [b for _, b in fake.calls]
    assert sorted(b["seed"] for b in bodies) == sorted(request_seeds(11, 6))  # one seed per prompt, all distinct
    for b in bodies:
        assert b["model"] == "rl-policy-v3" and b["logprobs"] == 0 and b["return_token_ids"] is True
        assert (b["n"], b["temperature"], b["top_p"], b["max_tokens"]) == (2, 1.0, 0.9, 3)
        # the server's generation-config defaults must not change the sampling distribution
        assert (b["top_k"], b["min_p"], b["repetition_penalty"]) == (0, 0.0, 1.0)
    assert engine.failed == {}


def test_a_replica_that_is_down_leaves_its_prompts_to_the_others(make_engine, capsys):
    engine, fake = make_engine({URLS[0]: refused})
    prompts = [[i, 1] for i in range(8)]
    check_batch(engine.generate(prompts, ADAPTER, n=3, temperature=1.0, seed=5, logprobs=True), prompts, 3, 5)
    assert engine.requests_served[URLS[1]] == 8 and engine.requests_served[URLS[0]] == 0
    assert list(engine.failed) == [URLS[0]] and "Connection refused" in engine.failed[URLS[0]]
    assert capsys.readouterr().err.count("warning: rollout server http://replica-a:8000 failed") == 1


def test_a_replica_that_dies_mid_rollout_has_its_remaining_prompts_retried(make_engine):
    def dies_after_two(k, body):
        if k > 2:
            raise HTTPFailure(URLS[0], "failed (Connection reset by peer)")

    engine, fake = make_engine({URLS[0]: dies_after_two})
    prompts = [[i, 2] for i in range(10)]
    check_batch(engine.generate(prompts, ADAPTER, n=2, temperature=1.0, seed=9, logprobs=True), prompts, 2, 9)
    assert engine.requests_served[URLS[0]] == 2 and engine.requests_served[URLS[1]] == 8
    assert list(engine.failed) == [URLS[0]]


@pytest.mark.parametrize("broken", [
    lambda body: answer(body, choices=body["n"] - 1),  # a short answer
    lambda body: {**answer(body), "choices": [{**c, "logprobs": {"token_logprobs": [-1.0]}}
                                              for c in answer(body)["choices"]]},  # log-probs cut short
    lambda body: {"object": "error"},
])
def test_a_malformed_answer_is_never_returned_but_retried(make_engine, broken):
    engine, fake = make_engine({URLS[0]: lambda k, body: broken(body)})
    prompts = [[i, 3] for i in range(4)]
    check_batch(engine.generate(prompts, ADAPTER, n=2, temperature=1.0, seed=1, logprobs=True), prompts, 2, 1)
    assert "malformed answer" in engine.failed[URLS[0]]


def test_no_replica_answering_raises_naming_each_one(make_engine):
    def server_error(k, body):
        raise HTTPFailure(URLS[1], "HTTP 500: engine dead", 500)

    engine, _ = make_engine({URLS[0]: refused, URLS[1]: server_error})
    with pytest.raises(VllmTrainError, match=r"no rollout server could answer request \d+ of 3 ") as error:
        engine.generate([[1], [2], [3]], ADAPTER, n=2, temperature=1.0, seed=0, logprobs=True)
    assert "http://replica-a:8000: failed (Connection refused)" in str(error.value)
    assert "http://replica-b:8001: HTTP 500: engine dead" in str(error.value)


def test_a_request_the_server_rejects_is_not_retried(make_engine):
    def too_long(k, body):
        raise HTTPFailure(URLS[0], "HTTP 400: prompt too long", 400)

    engine, fake = make_engine({URLS[0]: too_long, URLS[1]: too_long})
    with pytest.raises(VllmTrainError, match="rollout server http://replica-.* rejected the request: HTTP 400"):
        engine.generate([[1, 2]], ADAPTER, temperature=1.0, seed=0)
    assert len(fake.calls) == 1


def probe_answer(temperature_scales: bool):
    """Top-5 log-probs at the probe's temperature t: logits (0, -1, -2, -3, -4), divided by t when the
    server returns processed log-probs (up to the normalizer, which the probe's gap does not see)."""
    def answer_probe(k, body):
        if body["max_tokens"] != 1:
            return None
        t = body["temperature"] if temperature_scales else 1.0
        top = {f"token_id:{i}": -i / t - 0.3 for i in range(5)}
        return {"choices": [{"index": 0, "text": "", "token_ids": [0], "logprobs": {"top_logprobs": [top]}}]}
    return answer_probe


def test_temperature_other_than_one_needs_processed_logprobs(make_engine):
    engine, fake = make_engine({URLS[0]: probe_answer(True), URLS[1]: probe_answer(False)})
    with pytest.raises(VllmTrainError, match=r"replica-b:8001 returns raw log-probs, but sampling at temperature 2.0 "
                                             r".*--logprobs-mode processed_logprobs"):
        engine.generate([[1, 2]], ADAPTER, n=2, temperature=2.0, seed=0, logprobs=True)
    assert all(b["return_tokens_as_token_ids"] for _, b in fake.calls)  # top tokens keyed by id, never merged


def test_processed_logprobs_servers_are_probed_once(make_engine):
    engine, fake = make_engine({u: probe_answer(True) for u in URLS})
    prompts = [[i, 4] for i in range(4)]
    for _ in range(2):
        check_batch(engine.generate(prompts, ADAPTER, n=2, temperature=0.7, seed=2, logprobs=True), prompts, 2, 2)
    probes = [b for _, b in fake.calls if b["max_tokens"] == 1]
    assert len(probes) == 4  # temperatures 1 and 0.7, on each replica, on the first call only
    assert all(b["model"] == "rl-policy-v3" for b in probes)


def test_grpo_cli_checks_the_rollout_servers_before_loading_anything(tmp_path, tiny_model, shipped, capsys):
    from vllm_train.cli import main as cli_main
    from vllm_train.rewards import TOY_REWARD

    out = tmp_path / "run"
    args = ["grpo", "--model", tiny_model, "--prompts", str(shipped("rl_train.jsonl")), "--reward", TOY_REWARD,
            "--output-dir", str(out), "--rollout-servers", "http://127.0.0.1:9,127.0.0.1:10/v1"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: server replica http://127.0.0.1:9 ")
    assert "start the servers before training with --rollout-servers" in err[0]
    assert not out.exists()
    assert cli_main(args[:-1] + [","]) == 2
    assert "rollout_servers" in capsys.readouterr().err
