"""`vllm-train serve` / `push` against real vLLM OpenAI servers on 127.0.0.1 (CPU in CI).

One `vllm-train serve --replicas 2` process, guarded by an API key, is shared by the whole module (a
server start costs 30-110 s on 2 busy cores); the tests run in file order and the last ones take replica 1
down and then SIGTERM the CLI. The oracle for every served answer is the session's in-process vLLM engine
with the same adapter.
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
API_KEY = "test-key-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PASSTHROUGH = ["--max-num-seqs", "8"]  # vLLM arguments after `--` of the shared server
BASE_NAME = TINY_MODEL.name  # the base model's served name


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


@pytest.fixture(scope="module")
def expected_base(engine) -> dict:
    """The base model's greedy answer (the in-process engine's tokens) and its log-probs from the HF
    forward, the oracle every base-model answer of the servers is held to (fp32, 1e-4)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.evaluation import completion_logprobs

    sample = engine.generate([MESSAGES], None, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True)[0][0]
    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    with torch.no_grad():
        hf = completion_logprobs(model, engine.prompt_token_ids(MESSAGES), sample.token_ids).tolist()
    assert max(abs(a - b) for a, b in zip(hf, sample.logprobs)) < TOL
    return {"text": sample.text, "logprobs": hf}


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
        self.logs: list[Path] = []  # replica logs

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
    env = dict(os.environ, VLLM_TRAIN_STAGE_DIR=str(root / "stage"), VLLM_TRAIN_API_KEY=API_KEY,
               PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL="INFO")  # INFO: the logs name vLLM's arguments
    saved = {k: os.environ.get(k) for k in ("VLLM_TRAIN_STAGE_DIR", "VLLM_TRAIN_API_KEY")}
    os.environ.update({k: env[k] for k in saved})
    proc = subprocess.Popen(CLI + ["serve", "--model", str(TINY_MODEL), "--replicas", "2", "--port", "0",
                                   "--max-lora-rank", "8", "--adapter", f"live={adapters['v0']}",
                                   "--log-dir", str(root / "logs"), "--kv-cache-gib", "0.0625",
                                   "--", *PASSTHROUGH],
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
            m = re.match(r"replica \d+: (http://\S+)/v1\s+\(pid (\d+), log (.*)\)$", line)
            if m:
                served.urls.append(m[1])
                served.pids.append(int(m[2]))
                served.logs.append(Path(m[3]))
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

    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


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

    return replica_state(url, api_key=API_KEY).adapters


def _http(method: str, url: str, payload=None, headers=None) -> tuple[int, str]:
    """(status, body) of one raw request."""
    import urllib.error
    import urllib.request

    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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


def test_stage_dir_must_be_yours_and_closed_to_writers(adapters, tmp_path, monkeypatch):
    """Item 7 of issue 13: another user who owns (or may write) the stage dir could swap the files a
    server loads after they were validated; such a dir is refused before anything else happens."""
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.errors import VllmTrainError

    root = tmp_path / "stage"
    root.mkdir()
    publisher = AdapterPublisher("http://127.0.0.1:9", stage_dir=root)
    os.chmod(root, 0o777)
    with pytest.raises(VllmTrainError, match=r"stage dir .* is writable by group or others \(mode 777\)"):
        publisher.publish(adapters["v1"], "x")
    os.chmod(root, 0o755)
    with monkeypatch.context() as m:
        m.setattr(os, "getuid", lambda: root.stat().st_uid + 1)
        with pytest.raises(VllmTrainError, match=r"stage dir .* is owned by uid \d+, not by you"):
            publisher.publish(adapters["v1"], "x")
    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(VllmTrainError, match="is not a directory"):
        AdapterPublisher("http://127.0.0.1:9", stage_dir=link).publish(adapters["v1"], "x")
    with pytest.raises(VllmTrainError, match="not reachable"):  # a good dir: on to the (absent) server
        publisher.publish(adapters["v1"], "x")


def test_serve_binds_loopback_and_refuses_other_hosts_without_a_key(monkeypatch, capsys):
    from vllm_train.cli import build_parser, main
    from vllm_train.engine.replicas import ServerConfig

    assert build_parser().parse_args(["serve", "--model", str(TINY_MODEL)]).host == "127.0.0.1"
    assert ServerConfig(str(TINY_MODEL)).loopback and ServerConfig(str(TINY_MODEL), host="::1").loopback
    assert not ServerConfig(str(TINY_MODEL), host="0.0.0.0").loopback
    monkeypatch.delenv("VLLM_TRAIN_API_KEY", raising=False)
    assert main(["serve", "--model", str(TINY_MODEL), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host 0.0.0.0 without an API key" in err[0]


def test_replica_that_dies_at_start_reports_its_log(tmp_path):
    from vllm_train.engine.replicas import ServerConfig, start_servers
    from vllm_train.errors import VllmTrainError

    config = ServerConfig(str(TINY_MODEL), extra_args=["--no-such-option"], startup_timeout=300,
                          log_dir=str(tmp_path))
    with pytest.raises(VllmTrainError, match=r"exited with code \d+ while starting; log tail: .*no-such-option"):
        start_servers(config)


# ---- vLLM arguments, tensor parallelism, devices (no server) --------------------------------------

def test_vllm_args_after_dashdash_follow_ours_in_order():
    from vllm_train.cli import build_parser
    from vllm_train.engine.replicas import ServerConfig, _replica_command

    passthrough = ["--enable-chunked-prefill", "--max-num-seqs", "64", "--seed=3", "--", "-x"]
    args = build_parser().parse_args(["serve", "--model", str(TINY_MODEL), "--tensor-parallel-size", "2",
                                      "--dtype", "bfloat16", "--", *passthrough])
    assert args.vllm_args == passthrough and args.tensor_parallel_size == 2 and args.dtype == "bfloat16"
    assert build_parser().parse_args(["serve", "--model", str(TINY_MODEL)]).vllm_args == []

    def flags(cmd: list[str]) -> dict[str, str]:
        return {a: b for a, b in zip(cmd, cmd[1:]) if a in ("--dtype", "--tensor-parallel-size")}

    config = ServerConfig(str(TINY_MODEL), tensor_parallel_size=2, dtype="bfloat16", extra_args=passthrough)
    cmd = _replica_command(config, 8000, cuda=False, gpu_share=0.85)
    assert cmd[-len(passthrough):] == passthrough and cmd.count("--max-num-seqs") == 1
    assert flags(cmd) == {"--dtype": "bfloat16", "--tensor-parallel-size": "2"} and "--enforce-eager" in cmd
    cpu, gpu = (_replica_command(ServerConfig(str(TINY_MODEL)), 8000, cuda, 0.85) for cuda in (False, True))
    assert flags(cpu) == {"--dtype": "float32", "--tensor-parallel-size": "1"} and "--enforce-eager" in cpu
    assert flags(gpu) == {"--dtype": "bfloat16", "--tensor-parallel-size": "1"} and "--enforce-eager" not in gpu
    tp_gpu = _replica_command(ServerConfig(str(TINY_MODEL), tensor_parallel_size=2), 8000, True, 0.85)
    assert "--enforce-eager" in tp_gpu  # CUDA graphs + LoRA under TP crashed in vLLM (engine.llm)


def test_every_flag_our_command_sets_is_refused_after_dashdash():
    """The oracle is `_replica_command` itself: each flag it emits (CPU and GPU, every option set) is reserved."""
    from vllm_train.engine.replicas import ServerConfig, _replica_command
    from vllm_train.engine.server_args import RESERVED_FLAGS, check_passthrough
    from vllm_train.errors import VllmTrainError

    config = ServerConfig(str(TINY_MODEL), max_model_len=64, logprobs_mode="processed_logprobs", enforce_eager=True,
                          served_model_name="m", tensor_parallel_size=2)
    emitted = {a for cuda in (False, True) for a in _replica_command(config, 8000, cuda, 0.5)[3:] if a.startswith("-")}
    assert emitted <= set(RESERVED_FLAGS), emitted - set(RESERVED_FLAGS)
    for flag in emitted:
        with pytest.raises(VllmTrainError, match=f"vLLM argument {flag} after --: vllm-train serve sets {flag}"):
            check_passthrough(["--max-num-seqs", "8", flag, "1"])
    check_passthrough(["--max-num-seqs", "8", "--enable-chunked-prefill", "--seed", "-1", "--model-impl", "vllm"])


@pytest.mark.parametrize("passthrough, message", [
    (["--port", "9000"], "vLLM argument --port after --: vllm-train serve sets --port itself; use vllm-train "
                         "serve's --port instead"),
    (["--seed", "1", "--host=0.0.0.0"], "vLLM argument --host=0.0.0.0 after --: vllm-train serve sets --host"),
    (["--max_model_len", "64"], "sets --max-model-len itself; use vllm-train serve's --max-model-len instead"),
    (["-tp", "2"], "sets -tp itself; use vllm-train serve's --tensor-parallel-size instead"),
    (["--tensor-parallel", "2"], "sets --tensor-parallel-size itself"),  # vLLM takes abbreviations
    (["--dtype", "half"], "use vllm-train serve's --dtype instead"),
    (["--no-enable-lora"], "sets --enable-lora itself; vllm-train fixes it"),
    (["--middleware", "x.Y"], "sets --middleware itself; vllm-train fixes it"),
    (["--api-key", "k"], "use vllm-train serve's --api-key or $VLLM_TRAIN_API_KEY instead"),
    (["--kv-cache-memory-bytes", "1"], "use vllm-train serve's --kv-cache-gib instead"),
    (["--api-server-count", "2"], "use vllm-train serve's --replicas instead"),  # aliases live in one process
    (["stray"], "vLLM argument 'stray': vLLM arguments start with a flag and go after a literal --"),
])
def test_serve_refuses_our_own_flags_after_dashdash(passthrough, message, capsys):
    from vllm_train.cli import main

    tail = passthrough if passthrough == ["stray"] else ["--", *passthrough]
    assert main(["serve", "--model", str(TINY_MODEL), "--port", "0", *tail]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert out.out == "" and len(err) == 1 and err[0].startswith("error: ") and message in err[0], out


def test_gpu_and_core_assignment():
    from vllm_train.engine.server_args import cpu_binding, gpu_assignment
    from vllm_train.errors import VllmTrainError

    assert gpu_assignment(2, 2, 4) == ["0,1", "2,3"]
    assert gpu_assignment(3, 2, 8) == ["0,1", "2,3", "4,5"]  # GPUs 6 and 7 stay free
    assert gpu_assignment(2, 2, 4, visible="4,5,6,7") == ["4,5", "6,7"]
    assert gpu_assignment(1, 4, 4, visible="3,2,1,0") == ["3,2,1,0"]
    assert gpu_assignment(2, 1, 2) == ["0", "1"] and gpu_assignment(1, 1, 1) == ["0"]
    assert gpu_assignment(3, 1, 2) is None  # single-GPU replicas share GPUs (and split the memory)
    for replicas, tp, devices in ((2, 2, 3), (1, 2, 1), (3, 4, 8)):
        with pytest.raises(VllmTrainError, match=f"--replicas {replicas} x --tensor-parallel-size {tp} needs "
                                                 f"{replicas * tp} GPUs; {devices} are visible"):
            gpu_assignment(replicas, tp, devices)
    assert cpu_binding(1, 1, [0, 1]) is None  # vLLM's own binding
    assert cpu_binding(1, 2, [0, 1]) == ["0|1"]  # vLLM's auto binding wants a NUMA node per rank
    assert cpu_binding(2, 1, [0, 1, 2, 3, 4]) == ["0,1", "2,3"]
    assert cpu_binding(2, 2, list(range(8))) == ["0,1|2,3", "4,5|6,7"]
    assert cpu_binding(2, 2, [0, 1]) == ["nobind", "nobind"]


class _DeadProcess:
    pid, returncode = 0, 1

    def poll(self) -> int:
        return 1


@pytest.mark.parametrize("devices, visible, expected", [
    (4, None, {"CUDA_VISIBLE_DEVICES": ["0,1", "2,3"]}),
    (4, "4,5,6,7", {"CUDA_VISIBLE_DEVICES": ["4,5", "6,7"]}),
    (0, None, {"VLLM_CPU_OMP_THREADS_BIND": ["0|1", "2|3"]}),
])
def test_replicas_start_on_their_own_devices(devices, visible, expected, monkeypatch, tmp_path):
    """What `start_servers` hands each replica process (Popen faked: the replicas 'die' at once)."""
    from vllm_train.engine import replicas
    from vllm_train.errors import VllmTrainError

    started: list[tuple[list[str], dict]] = []
    monkeypatch.setattr(replicas, "_cuda_devices", lambda: devices)
    monkeypatch.setattr(replicas.subprocess, "Popen",
                        lambda cmd, env, **kw: started.append((cmd, env)) or _DeadProcess())
    monkeypatch.setattr(replicas, "_terminate_groups", lambda *a: None)
    monkeypatch.setattr(replicas.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = replicas.ServerConfig(str(TINY_MODEL), replicas=2, tensor_parallel_size=2, log_dir=str(tmp_path),
                                   extra_args=PASSTHROUGH)
    with pytest.raises(VllmTrainError, match="replica 0 .* exited with code 1 while starting"):
        replicas.start_servers(config)
    assert {var: [env.get(var) for _, env in started] for var in expected} == expected
    for cmd, _ in started:
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[-len(PASSTHROUGH):] == PASSTHROUGH
        assert ("--gpu-memory-utilization" in cmd) == bool(devices)


def test_serve_refuses_more_gpus_than_visible(monkeypatch, capsys):
    from vllm_train.cli import main
    from vllm_train.engine import replicas

    monkeypatch.setattr(replicas, "_cuda_devices", lambda: 3)
    monkeypatch.setattr(replicas.subprocess, "Popen", None)  # nothing may start
    assert main(["serve", "--model", str(TINY_MODEL), "--port", "0", "--replicas", "2",
                 "--tensor-parallel-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --replicas 2 x --tensor-parallel-size 2 needs 4 GPUs; 3 are visible", err


# ---- tests on the shared server (in order) ----------------------------------------------------

def test_serve_publishes_startup_adapter_on_every_replica(served, expected):
    assert len(served.urls) == 2
    for url in served.urls:
        assert "live-v1" in _loaded(url)
    assert _assert_serves(served, expected) == "live-v1"


def test_vllm_args_after_dashdash_reach_every_replica(served):
    """`serve ... -- --max-num-seqs 8`: the flag ends each replica's command line and vLLM took it."""
    assert len(served.pids) == len(served.logs) == 2
    for pid, log in zip(served.pids, served.logs):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline[-len(PASSTHROUGH):] == PASSTHROUGH, cmdline
        assert "'max_num_seqs': 8" in log.read_text(errors="replace")  # vLLM's "non-default args" line


def test_every_route_needs_the_api_key(served, adapters, expected):
    """Nothing answers without the key: not vLLM's /v1 routes, not runtime LoRA loading through the
    SageMaker routes, not /health or routes that do not exist; a hijacking load fails; so does a push."""
    before = [_loaded(url) for url in served.urls]
    url = served.urls[0]
    attempts = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "live-v1", "prompt": "1 + 1 =", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"model": "live", "messages": MESSAGES, "max_tokens": 1}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "live-v99", "lora_path": str(adapters["v1"])}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "live-v1", "lora_path": str(adapters["v2"]),
                                           "load_inplace": True}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "live-v1"}),
        ("POST", "/adapters", {"name": "live-v98", "src": str(adapters["v1"])}),
        ("DELETE", "/adapters/live-v1", None),
        ("POST", "/invocations", {"model": "live-v1", "prompt": "1", "max_tokens": 1}),
        ("POST", "/tokenize", {"model": "live-v1", "prompt": "1"}),
        ("GET", "/metrics", None), ("GET", "/health", None), ("GET", "/no/such/route", None),
        ("POST", "/vllm-train/aliases", {"live": "live-v99"}), ("GET", "/vllm-train/server", None),
    ]
    for method, route, payload in attempts:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            status, body = _http(method, url + route, payload, headers)
            assert status == 401, (method, route, headers, status, body)
    env = {k: v for k, v in served.env.items() if k not in ("VLLM_TRAIN_API_KEY", "VLLM_API_KEY")}
    result = subprocess.run(CLI + ["push", "--server", ",".join(served.urls), "--adapter", str(adapters["v1"]),
                                   "--name", "live"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "HTTP 401" in result.stderr and result.stdout == "", result.stderr
    assert [_loaded(u) for u in served.urls] == before
    assert _assert_serves(served, expected) == "live-v1"
    assert _http("GET", url + "/v1/models", headers=AUTH)[0] == 200


def test_answers_carry_no_server_paths(served, adapters, tmp_path):
    from vllm_train.engine.staging import default_stage_root

    for url in served.urls:
        status, body = _http("GET", url + "/v1/models", headers=AUTH)
        assert status == 200 and str(TINY_MODEL) not in body and str(default_stage_root()) not in body, body
        assert all("/" not in card["root"] for card in json.loads(body)["data"])
    for path in (tmp_path / "private" / "nothing-here", adapters["rank16"]):  # missing; rank above the server's
        status, body = _http("POST", served.urls[0] + "/v1/load_lora_adapter",
                             {"lora_name": "leak-v1", "lora_path": str(path)}, AUTH)
        assert status >= 400 and str(path.parent) not in body, body
    assert "leak-v1" not in _loaded(served.urls[0])


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
        model, text, lps = _ask(url, "live")  # the stable alias: the newest version, named in the answer
        assert model == "live-v2" and text == expected[1]["text"] and _matches(lps, expected[1])


def test_an_agent_records_episodes_through_the_openai_client(served, engine, expected_base):
    # Bring your own agent: two chat turns through the unmodified openai client, token ids and log-probs
    # returned by the server (vLLM's return_token_ids), stitched into one episode. Oracles: the first
    # turn is the in-process engine's greedy answer with the HF forward's log-probs; the second turn's
    # prompt is the toy template's rendering of the whole conversation, which extends turn 1's ids.
    from vllm_train.agents.recorded import EpisodeRecorder

    client, recorder = _client(served.urls[0]), EpisodeRecorder()
    messages = list(MESSAGES)
    for reply in ("try again", None):
        response = client.chat.completions.create(model=BASE_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                                  temperature=0.0, logprobs=True,
                                                  extra_body={"return_token_ids": True})
        text = recorder.add_response(response)
        messages += [{"role": "assistant", "content": text}] + ([{"role": "user", "content": reply}] if reply else [])
    episode = recorder.episode(reward=1.0)
    assert episode.prompt_ids == engine.prompt_token_ids(MESSAGES) and episode.turns == 2
    first = episode.completion_mask.index(0)  # turn 1 ends where the environment's tokens start
    assert max(abs(a - b) for a, b in zip(episode.logprobs[:first], expected_base["logprobs"])) < TOL
    assert engine.tokenizer.decode(episode.completion_ids[:first], skip_special_tokens=True) == expected_base["text"]
    second_prompt = engine.prompt_token_ids(messages[:3])  # [user, assistant, user "try again"]
    assert second_prompt == (episode.prompt_ids + episode.completion_ids)[:len(second_prompt)]
    env_ids = [t for t, m in zip(episode.completion_ids, episode.completion_mask) if not m]
    assert "try again" in engine.tokenizer.decode(env_ids)


def test_load_while_pushing_five_versions(served, adapters, expected, expected_base):
    """Clients ask for the newest version, and every fifth request for the base model, while five versions
    are pushed: every answer carries exactly the weights of the model it names. (Base answers computed with
    an adapter's weights were issue #31: vLLM's CPU LoRA ops read a base row's index -1 as the last slot.)"""
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
                # the newest version every replica serves, or the base model
                current = BASE_NAME if (k + i) % 5 == 4 else resolver.current("live")
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
        matching += ["base"] if _matches(lps, expected_base) else []
        seen[model] = seen.get(model, 0) + 1
        if matching != [served.content.get(model, "base" if model == BASE_NAME else None)]:
            inconsistent.append((model, matching))
    print(f"\nload test: {len(results)} ok, {len(failures)} failed, {elapsed:.1f}s, pushed {pushed}, "
          f"responses per version {dict(sorted(seen.items()))}, inconsistent {len(inconsistent)}; mean per request: "
          f"resolve {1000 * spent['resolve'] / max(1, len(results)):.0f} ms, "
          f"chat {1000 * spent['chat'] / max(1, len(results)):.0f} ms")
    assert failures == []
    assert len(results) == n_threads * per_thread
    assert pushed == [f"live-v{i}" for i in range(3, 3 + n_pushes)]
    assert inconsistent == []
    assert len(seen) >= 4 and seen[BASE_NAME] >= 30  # versions changed under the clients; base requests among them
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


def test_push_whose_canary_is_not_finite_changes_no_answer(served, adapters, expected, expected_base):
    """The huge-values adapter with the magnitude check off (--max-delta-ratio inf) reaches the first replica;
    its canary completion is not finite, so it is unloaded there and no other replica is touched. Clients
    asking for the base model and the current version meanwhile, and afterwards, get exactly their weights."""
    before = [_loaded(url) for url in served.urls]
    current = _assert_serves(served, expected)
    answers: list[tuple[str, str, list[float]]] = []
    pushing = threading.Event()
    pushing.set()

    def client(url: str) -> None:
        while pushing.is_set() or len(answers) < 8:
            for model in (BASE_NAME, current):
                answers.append((model, *_ask(url, model)))

    threads = [threading.Thread(target=client, args=(url,)) for url in served.urls]
    for t in threads:
        t.start()
    result = served.cli("push", "--server", ",".join(served.urls), "--adapter", str(adapters["huge_values"]),
                        "--name", "live", "--max-delta-ratio", "inf")
    pushing.clear()
    for t in threads:
        t.join(timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == "" and len(lines) == 1, result.stderr
    assert "the canary completion through live-v" in lines[0] and "; unloaded there;" in lines[0]
    assert f"{current} is still served" in lines[0]
    assert [_loaded(url) for url in served.urls] == before
    assert _assert_serves(served, expected) == current
    for url in served.urls:
        answers.append((BASE_NAME, *_ask(url, BASE_NAME)))
        answers.append((current, *_ask(url, "live")))
    for model, answered, _, lps in answers:
        assert answered == model
        assert _matches(lps, expected_base if model == BASE_NAME else expected[served.content[model]]), model


def _unload(url: str, served_name: str, alias: str | None = None) -> None:
    status, body = _http("POST", url + "/v1/unload_lora_adapter", {"lora_name": served_name}, AUTH)
    assert status == 200, body
    if alias:
        assert _http("POST", url + "/vllm-train/aliases", {alias: None}, AUTH)[0] == 200


def test_push_refuses_versions_it_did_not_publish(served, adapters, expected, tmp_path):
    """A version loaded by another client (here an insider with the key) under a published name stops the
    next push before it touches anything; one loaded during a publish fails the check afterwards."""
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.errors import VllmTrainError

    current = _assert_serves(served, expected)
    before = [_loaded(url) for url in served.urls]
    hijack = tmp_path / "hijack"
    shutil.copytree(adapters["v3"], hijack)
    foreign = f"live-v{int(current.rsplit('-v', 1)[1]) + 50}"
    status, body = _http("POST", served.urls[1] + "/v1/load_lora_adapter",
                         {"lora_name": foreign, "lora_path": str(hijack)}, AUTH)
    assert status == 200, body
    result = served.cli("push", "--server", ",".join(served.urls), "--adapter", str(adapters["v1"]), "--name", "live")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == "" and len(lines) == 1, result.stderr
    assert f"serves {foreign} from 'hijack', which this publisher did not publish" in lines[0]
    assert "nothing was published" in lines[0]
    _unload(served.urls[1], foreign)
    assert [_loaded(url) for url in served.urls] == before

    def load_foreign(url: str, name: str) -> None:
        if url == served.urls[0]:
            assert _http("POST", served.urls[1] + "/v1/load_lora_adapter",
                         {"lora_name": foreign, "lora_path": str(hijack)}, AUTH)[0] == 200

    publisher = AdapterPublisher(served.urls, keep=2, on_loaded=load_foreign)
    with pytest.raises(VllmTrainError, match=rf"after publishing live-v\d+, replica {re.escape(served.urls[1])} "
                                             rf"serves {{.*{foreign}}} but this publisher expected"):
        publisher.publish(adapters["v1"], "live")
    _unload(served.urls[1], foreign)
    new = publisher.current("live")
    assert new != current
    served.content[new] = 1
    assert _assert_serves(served, expected) == new


def test_two_server_groups_keep_their_own_versions(served, adapters, expected):
    """Item 6 of issue 13: replica 0 and replica 1 as two server groups publishing the same name: own
    version numbers, own staged files (one group's push never deletes the other's), own alias."""
    from vllm_train.engine.publish import AdapterPublisher

    group_a, group_b = AdapterPublisher(served.urls[:1], keep=1), AdapterPublisher(served.urls[1:], keep=1)
    assert group_a.stage.dir != group_b.stage.dir
    assert group_a.publish(adapters["v2"], "twin") == "twin-v1"
    assert group_b.publish(adapters["v3"], "twin") == "twin-v1"
    b_files = sorted(group_b.stage.dir.iterdir())
    assert group_a.publish(adapters["v4"], "twin") == "twin-v2"  # retires group A's twin-v1 only
    assert sorted(group_b.stage.dir.iterdir()) == b_files
    assert list(group_a.stage.live("twin")) == [2] and list(group_b.stage.live("twin")) == [1]
    for url, version, weights in ((served.urls[0], "twin-v2", 4), (served.urls[1], "twin-v1", 3)):
        assert set(_loaded(url)) - {m for m in _loaded(url) if m.startswith("live-")} == {version}
        for model in ("twin", version):
            answered, text, lps = _ask(url, model)
            assert answered == version and text == expected[weights]["text"] and _matches(lps, expected[weights])
    _unload(served.urls[0], "twin-v2", alias="twin")
    _unload(served.urls[1], "twin-v1", alias="twin")


def test_staged_files_are_readable_as_the_stage_dir_allows(served, adapters, expected, tmp_path):
    """Item 7 of issue 13: under a umask of 077 the staged copies still get the group read bit that the
    stage dir (mode 750) grants, so a server running as another user in that group can load them."""
    import shlex
    import stat

    root = tmp_path / "shared-stage"
    root.mkdir()
    os.chmod(root, 0o750)
    push = CLI + ["push", "--server", ",".join(served.urls), "--adapter", str(adapters["v2"]), "--name", "perm",
                  "--stage-dir", str(root)]
    result = subprocess.run(["sh", "-c", "umask 077 && exec " + shlex.join(push)], env=served.env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "perm-v1", result.stderr
    (group,) = root.iterdir()
    (staged,) = [p for p in group.iterdir() if p.name.startswith("perm-v1-")]
    assert stat.S_IMODE(group.stat().st_mode) == stat.S_IMODE(staged.stat().st_mode) == 0o750
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in staged.iterdir()} == {
        "adapter_config.json": 0o640, "adapter_model.safetensors": 0o640}
    for url in served.urls:
        _, text, lps = _ask(url, "perm")
        assert text == expected[2]["text"] and _matches(lps, expected[2])
        _unload(url, "perm-v1", alias="perm")


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
                                             rf"replica\(s\) that had loaded it, {current} is still served") as info:
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


def test_watch_replicas_warns_once_per_exited_replica_and_stops_when_none_is_left(monkeypatch, capsys):
    from types import SimpleNamespace

    from vllm_train.commands import serve
    from vllm_train.errors import VllmTrainError

    polls = {"n": 0}

    def replica(index: int, exits_after: int):  # alive for `exits_after` polls of the watch loop
        return SimpleNamespace(index=index, url=f"http://127.0.0.1:800{index}", process=SimpleNamespace(returncode=3),
                               alive=lambda: polls["n"] < exits_after, log_tail=lambda n: f"tail of {index}")

    def one_poll(seconds):
        polls["n"] += 1

    monkeypatch.setattr(serve.time, "sleep", one_poll)
    with pytest.raises(VllmTrainError, match="every server replica has exited"):
        serve.watch_replicas([replica(0, 2), replica(1, 5)])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == ["warning: replica 0 (http://127.0.0.1:8000) exited with code 3; log tail: tail of 0",
                        "warning: replica 1 (http://127.0.0.1:8001) exited with code 3; log tail: tail of 1"]
    assert polls["n"] == 5  # it kept serving with replica 1 until that one exited too
