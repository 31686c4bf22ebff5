"""`vllm-train serve` / `push` against real vLLM OpenAI servers on 127.0.0.1 (CPU in CI).

One `vllm-train serve --replicas 2` process is shared by the whole module (a server start costs 30-110 s
on 2 busy cores); the tests run in file order and the last ones take replica 1 down and then SIGTERM the
CLI. The oracle for every served answer is the session's in-process vLLM engine with the same adapter.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from adapter_cases import BAD_VALUE_CASES, make_bad_adapter

from vllm_train.assets import TINY_MODEL

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "What is 13 + 54?"}]
MAX_TOKENS = 6
N_VERSIONS = 6  # weight sets: 0 is published at start, 1 by the parity test, 2..5 (+1) during the load test
TOL = 1e-4
CLI = [sys.executable, "-m", "vllm_train.cli"]


# ---- adapters ------------------------------------------------------------------------------------

def _make_adapters(root: Path) -> dict[str, Path]:
    """Random rank-8 LoRA weight sets (distinguishable by log-probs), a rank-16 one, and broken ones."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    out: dict[str, Path] = {}
    for rank in (8, 16):
        model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL))
        injector = LoRAInjector(LoRATrainConfig(rank=rank, alpha=16))
        injector.inject(model)
        seeds = range(N_VERSIONS) if rank == 8 else [100]
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for lora in injector.lora_layers.values():
                    lora.lora_a.copy_(torch.randn(lora.lora_a.shape, generator=gen) * 0.1)
                    lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.5)
            name = f"v{seed}" if rank == 8 else "rank16"
            out[name] = injector.save(root / name, str(TINY_MODEL))
    corrupt = root / "corrupt"
    shutil.copytree(out["v1"], corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    out["corrupt"] = corrupt
    wrong = root / "wrong-base"
    shutil.copytree(out["v1"], wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/other-model"
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    out["wrong_base"] = wrong
    for case in BAD_VALUE_CASES:
        out[case] = make_bad_adapter(out["v1"], root / case, case)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return _make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def expected(engine, adapters) -> list[dict]:
    """Per weight set: the in-process engine's greedy text, token ids and sampled-token log-probs."""
    results = []
    for i in range(N_VERSIONS):
        ref = engine.load_adapter(adapters[f"v{i}"], family=f"serve-test-{i}")
        sample = engine.generate([MESSAGES], ref, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True)[0][0]
        engine.remove_adapter(ref)
        results.append({"text": sample.text, "logprobs": sample.logprobs})
    for i in range(N_VERSIONS):  # the versions must be told apart by log-probs, or the load test proves nothing
        for j in range(i):
            a, b = results[i]["logprobs"], results[j]["logprobs"]
            assert results[i]["text"] != results[j]["text"] or \
                max(abs(x - y) for x, y in zip(a, b)) > 100 * TOL, (i, j)
    return results


# ---- the shared server -----------------------------------------------------------------------------

def _processes_in_sessions(sids: set[int]) -> list[tuple[int, str]]:
    """(pid, state) of every process whose session or process group is in `sids` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[2]) in sids or int(fields[3]) in sids:
            found.append((int(entry), fields[0]))
    return found


class Served:
    def __init__(self, proc: subprocess.Popen, urls: list[str], pids: list[int], lines: list[str], env: dict):
        self.proc, self.urls, self.pids, self.lines, self.env = proc, urls, pids, lines, env
        self.content: dict[str, int] = {}  # served name -> weight-set index

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def kill_all(self) -> None:
        for pgid in [self.proc.pid, *self.pids]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapters):
    root = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, VLLM_TRAIN_STAGE_DIR=str(root / "stage"), VLLM_TRAIN_STATE_DIR=str(root / "state"),
               PYTHONUNBUFFERED="1")
    saved = {k: os.environ.get(k) for k in ("VLLM_TRAIN_STAGE_DIR", "VLLM_TRAIN_STATE_DIR")}
    os.environ.update({k: env[k] for k in saved})
    proc = subprocess.Popen(CLI + ["serve", "--model", str(TINY_MODEL), "--replicas", "2", "--port", "0",
                                   "--max-lora-rank", "8", "--adapter", f"live={adapters['v0']}",
                                   "--log-dir", str(root / "logs"), "--kv-cache-gib", "0.0625"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in proc.stdout] + [q.put(None)], daemon=True).start()
    served = Served(proc, [], [], lines, env)
    try:
        deadline = time.monotonic() + 420
        while True:
            line = q.get(timeout=max(1.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("serve exited early:\n" + "".join(lines))
            lines.append(line)
            m = re.match(r"replica \d+: (http://\S+)/v1\s+\(pid (\d+)", line)
            if m:
                served.urls.append(m[1])
                served.pids.append(int(m[2]))
            if line.startswith("ready in"):
                break
        threading.Thread(target=lambda: [lines.append(x) for x in iter(q.get, None)], daemon=True).start()
        served.content["live-v1"] = 0
        yield served
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except Exception:
                pass
        served.kill_all()  # whatever is left, even after a failed test
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.cache
def _client(url: str):
    """One client per replica, shared by the threads (an OpenAI client is thread-safe; making one per
    request costs more CPU than the request on this box)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(url: str, model: str) -> tuple[str, str, list[float]]:
    resp = _client(url).chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=0.0, logprobs=True)
    choice = resp.choices[0]
    return resp.model, choice.message.content, [t.logprob for t in choice.logprobs.content]


def _matches(logprobs: list[float], expected: dict) -> bool:
    exp = expected["logprobs"]
    return len(logprobs) == len(exp) and max(abs(a - b) for a, b in zip(logprobs, exp)) < TOL


def _loaded(url: str) -> dict[str, str]:
    from vllm_train.engine.http_client import replica_state

    return replica_state(url).adapters


def _assert_serves(served: Served, expected, urls=None) -> str:
    """Every (given) replica serves the same newest `live` version, with that version's weights."""
    from vllm_train.engine.publish import AdapterPublisher

    current = AdapterPublisher(urls or served.urls).current("live")
    assert current is not None
    for url in urls or served.urls:
        model, text, lps = _ask(url, current)
        assert model == current and text == expected[served.content[current]]["text"]
        assert _matches(lps, expected[served.content[current]])
    return current


# ---- tests that need no server ------------------------------------------------------------------

def test_validate_adapter_rejects_other_base_shapes(adapters, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import validate_adapter

    validate_adapter(adapters["v1"], str(TINY_MODEL), max_lora_rank=8)
    bad = tmp_path / "wider"
    shutil.copytree(adapters["v1"], bad)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(8, 256)  # hidden size 256: a different model with the same name
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(VllmTrainError, match="adapter is for another base model"):
        validate_adapter(bad, str(TINY_MODEL), max_lora_rank=8)
    with pytest.raises(VllmTrainError, match="above the server's max_lora_rank 8"):
        validate_adapter(adapters["rank16"], str(TINY_MODEL), max_lora_rank=8)


def test_server_options_are_validated():
    from vllm_train.engine.http_client import parse_urls
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.engine.replicas import ServerConfig
    from vllm_train.errors import VllmTrainError

    with pytest.raises(VllmTrainError, match="max_lora_rank"):
        ServerConfig(str(TINY_MODEL), max_lora_rank=12)
    with pytest.raises(VllmTrainError, match="replicas"):
        ServerConfig(str(TINY_MODEL), replicas=0)
    with pytest.raises(VllmTrainError, match="keep"):
        AdapterPublisher("http://127.0.0.1:1", keep=0)
    assert parse_urls("127.0.0.1:8000/v1, http://h:1/") == ["http://127.0.0.1:8000", "http://h:1"]


def test_replica_that_dies_at_start_reports_its_log(tmp_path):
    from vllm_train.engine.replicas import ServerConfig, start_servers
    from vllm_train.errors import VllmTrainError

    config = ServerConfig(str(TINY_MODEL), extra_args=["--no-such-option"], startup_timeout=300,
                          log_dir=str(tmp_path))
    with pytest.raises(VllmTrainError, match=r"exited with code \d+ while starting; log tail: .*no-such-option"):
        start_servers(config)


# ---- tests on the shared server (in order) ----------------------------------------------------

def test_serve_publishes_startup_adapter_on_every_replica(served, expected):
    assert len(served.urls) == 2
    for url in served.urls:
        assert "live-v1" in _loaded(url)
    assert _assert_serves(served, expected) == "live-v1"


def test_push_then_openai_client_matches_in_process_engine(served, adapters, expected):
    result = served.cli("push", "--server", ",".join(served.urls), "--adapter", str(adapters["v1"]), "--name", "live")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "live-v2"
    served.content["live-v2"] = 1
    for url in served.urls:
        model, text, lps = _ask(url, "live-v2")
        assert model == "live-v2"
        assert text == expected[1]["text"]
        assert max(abs(a - b) for a, b in zip(lps, expected[1]["logprobs"])) < TOL
        assert len(lps) == len(expected[1]["logprobs"])
        assert set(_loaded(url)) == {"live-v1", "live-v2"}  # keep=2


def test_load_while_pushing_five_versions(served, adapters, expected):
    from vllm_train.engine.publish import AdapterPublisher

    n_threads, per_thread, n_pushes = 4, 50, 5
    publisher = AdapterPublisher(served.urls, keep=2)
    resolver = AdapterPublisher(served.urls)
    results: list[tuple[str, list[float]]] = []
    failures: list[str] = []
    done = threading.Event()
    progress = [0]
    spent = {"resolve": 0.0, "chat": 0.0}
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_thread):
            url = served.urls[(k + i) % len(served.urls)]
            try:
                t0 = time.perf_counter()
                current = resolver.current("live")  # the newest version every replica serves
                t1 = time.perf_counter()
                model, _, lps = _ask(url, current)
                with lock:
                    results.append((model, lps))
                    progress[0] += 1
                    spent["resolve"] += t1 - t0
                    spent["chat"] += time.perf_counter() - t1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    progress[0] += 1

    pushed = []

    def pusher() -> None:
        total = n_threads * per_thread
        for j in range(n_pushes):
            while progress[0] < (j + 1) * total // (n_pushes + 1) and not done.is_set():
                time.sleep(0.02)
            weights = 2 + j % (N_VERSIONS - 2)
            name = publisher.publish(adapters[f"v{weights}"], "live")
            served.content[name] = weights
            pushed.append(name)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    push_thread = threading.Thread(target=pusher)
    t0 = time.perf_counter()
    for t in [*threads, push_thread]:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    push_thread.join(timeout=300)
    elapsed = time.perf_counter() - t0

    seen: dict[str, int] = {}
    inconsistent = []
    for model, lps in results:
        matching = [i for i in range(N_VERSIONS) if _matches(lps, expected[i])]
        seen[model] = seen.get(model, 0) + 1
        if matching != [served.content.get(model)]:
            inconsistent.append((model, matching))
    print(f"\nload test: {len(results)} ok, {len(failures)} failed, {elapsed:.1f}s, pushed {pushed}, "
          f"responses per version {dict(sorted(seen.items()))}, inconsistent {len(inconsistent)}; mean per request: "
          f"resolve {1000 * spent['resolve'] / max(1, len(results)):.0f} ms, "
          f"chat {1000 * spent['chat'] / max(1, len(results)):.0f} ms")
    assert failures == []
    assert len(results) == n_threads * per_thread
    assert pushed == [f"live-v{i}" for i in range(3, 3 + n_pushes)]
    assert inconsistent == []
    assert len(seen) >= 3  # the clients really saw versions change under them
    for url in served.urls:
        assert set(_loaded(url)) == {pushed[-2], pushed[-1]}
    assert _assert_serves(served, expected) == pushed[-1]


@pytest.mark.parametrize("case, message", [
    ("corrupt", "cannot read safetensors"),
    ("rank16", "above the server's max_lora_rank 8"),
    ("wrong_base", "trained on base model 'some-org/other-model'"),
    ("missing", "adapter directory not found"),
    *BAD_VALUE_CASES.items(),
])
def test_bad_adapter_is_rejected_and_nothing_changes(served, adapters, expected, case, message, tmp_path):
    before = [_loaded(url) for url in served.urls]
    current = _assert_serves(served, expected)
    path = adapters.get(case, tmp_path / "nope")
    result = served.cli("push", "--server", ",".join(served.urls), "--adapter", str(path), "--name", "live")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert [_loaded(url) for url in served.urls] == before  # nothing half-published
    assert _assert_serves(served, expected) == current


def test_server_side_rejection_rolls_back(served, adapters, expected):
    """Rank not known to the publisher (as for a server started elsewhere): vLLM itself rejects it on the
    canary replica, nothing stays loaded, and the next push does not reuse the attempted name."""
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.errors import VllmTrainError

    before = [_loaded(url) for url in served.urls]
    current = _assert_serves(served, expected)
    publisher = AdapterPublisher(served.urls, keep=2, max_lora_rank=1024)  # "unknown": larger than any
    with pytest.raises(VllmTrainError, match=r"publishing live-v\d+ failed on .*max_lora_rank.*still served"):
        publisher.publish(adapters["rank16"], "live")
    assert [_loaded(url) for url in served.urls] == before
    assert _assert_serves(served, expected) == current


def test_replica_down_mid_push_rolls_back(served, adapters, expected):
    """Replica 1 dies after replica 0 loaded the new version: replica 0 unloads it again."""
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.errors import VllmTrainError

    before = _loaded(served.urls[0])
    current = _assert_serves(served, expected)

    def kill_replica_1(url: str, name: str) -> None:
        if url == served.urls[0]:
            os.killpg(served.pids[1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _processes_in_sessions({served.pids[1]}) and time.monotonic() < deadline:
                time.sleep(0.1)

    publisher = AdapterPublisher(served.urls, keep=2, on_loaded=kill_replica_1)
    with pytest.raises(VllmTrainError, match=rf"failed on {re.escape(served.urls[1])}.*rolled back on 1 "
                                             rf"replica\(s\), {current} is still served") as info:
        publisher.publish(adapters["v1"], "live")
    attempted = int(re.search(r"publishing live-v(\d+)", str(info.value))[1])
    assert attempted == int(current.rsplit("-v", 1)[1]) + 2  # the name vLLM rejected before is not reused
    assert _loaded(served.urls[0]) == before
    assert _assert_serves(served, expected, urls=served.urls[:1]) == current

    # With the replica still down, a push fails before touching anything.
    result = served.cli("push", "--server", ",".join(served.urls), "--adapter", str(adapters["v1"]),
                        "--name", "live")
    assert result.returncode != 0 and "not reachable" in result.stderr and "nothing was published" in result.stderr
    assert _loaded(served.urls[0]) == before
    assert _assert_serves(served, expected, urls=served.urls[:1]) == current


def test_push_hook_publishes_each_save(served, adapters, expected):
    """What `sft --push-to` / `LoRATrainer(on_save=make_push_hook(...))` does with each saved dir."""
    from vllm_train.engine.publish import AdapterPublisher, make_push_hook

    url = served.urls[:1]  # replica 1 is down since the previous test
    hook = make_push_hook(url, name="hooked")
    hook(adapters["v2"])
    hook(adapters["v3"])
    assert AdapterPublisher(url).current("hooked") == "hooked-v2"
    _, text, lps = _ask(url[0], "hooked-v2")
    assert text == expected[3]["text"] and _matches(lps, expected[3])
    make_push_hook(url, name="hooked")(adapters["corrupt"])  # warns, training would go on
    assert AdapterPublisher(url).current("hooked") == "hooked-v2"


def test_serve_leaves_no_process_after_sigterm(served):
    sessions = {served.proc.pid, *served.pids}
    assert _processes_in_sessions({served.pids[0]})  # replica 0 and its engine are running
    os.killpg(served.proc.pid, signal.SIGTERM)
    assert served.proc.wait(timeout=90) == 0, "".join(served.lines)
    deadline = time.monotonic() + 10
    while not any("servers stopped" in line for line in served.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(pid, state) for pid, state in _processes_in_sessions(sessions) if state != "Z"]
    assert left == [], left
    assert any("servers stopped" in line for line in served.lines)
