"""Publish adapter versions to vLLM OpenAI server replicas, over HTTP only.

Validate the adapter directory first, copy it to an immutable staging directory, load it under a new
served name ``NAME-vN`` on every replica (the first replica is a canary), and only then report it
published. Any failure unloads what was loaded, so the previous version keeps serving. Served names are
never reused: vLLM keys its prefix cache by adapter name (DESIGN.md), so a new name per version is what
makes a new version's log-probs right. The state lives in the servers: ``GET /v1/models`` lists the
loaded versions, so a separate process (``vllm-train push``) can publish. A version counts as
*published* when every replica serves it (`AdapterPublisher.current`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vllm_train.engine.http_client import VERSION_RE, HTTPFailure, ReplicaState, parse_urls, replica_state, request
from vllm_train.engine.replicas import recorded_server
from vllm_train.errors import VllmTrainError
from vllm_train.lora.validate import validate_adapter

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
            validate_adapter(adapter_dir, states[0].base_root, max_rank, check_base_name=True)
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
        request("POST", f"{url}/v1/load_lora_adapter", {"lora_name": served, "lora_path": str(path)},
                 timeout=self.timeout)

    def _rollback(self, urls: list[str], served: str) -> list[str]:
        failed = []
        for url in urls:
            try:
                request("POST", f"{url}/v1/unload_lora_adapter", {"lora_name": served}, timeout=self.timeout)
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
                    request("POST", f"{s.url}/v1/unload_lora_adapter", {"lora_name": served},
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


def make_push_hook(urls: str | list[str], name: str, *, keep: int = 2, strict: bool = False, check: bool = True,
                   **publisher_kwargs) -> Callable[[Path], None]:
    """An `on_save` callback that publishes every adapter dir a trainer writes (checkpoints and final)
    to the servers at `urls` as the next version of `name`:

        trainer = LoRATrainer(model, config, on_save=make_push_hook("http://127.0.0.1:8000", name="sft"))

    A failed push prints one warning line and training goes on (the previous version keeps serving);
    `strict=True` raises instead. Name and servers are checked now (`check=False` skips the servers), so
    a typo or a server that is not up fails before training starts.
    """
    publisher = AdapterPublisher(urls, keep=keep, **publisher_kwargs)
    if not isinstance(name, str) or not NAME_RE.match(name) or VERSION_RE.match(name):
        raise VllmTrainError(f"--push-name {name!r} is invalid (letters, digits, '.', '_', '-'; no '-vN' suffix)")
    if check:
        publisher.states("start the servers before training with --push-to")

    def push(path: Path) -> None:
        try:
            served = publisher.publish(path, name)
        except VllmTrainError as exc:
            if strict:
                raise
            print(f"warning: push of {path} failed: {exc}", file=sys.stderr, flush=True)
            return
        print(f"pushed {path} -> {served} on {len(publisher.urls)} replica(s)", file=sys.stderr, flush=True)

    push.publisher = publisher  # type: ignore[attr-defined]
    return push
