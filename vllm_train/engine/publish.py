"""Publish adapter versions to vLLM OpenAI server replicas, over HTTP only.

Validate the adapter directory first (`lora.validate`), check that every replica serves only versions
this publisher published, copy the adapter to the server group's staging directory (`engine.staging`),
load it under a new served name ``NAME-vN`` on every replica (the first replica is a canary), ask each
replica for a short greedy completion through it (`CANARY`: its log-probs must be finite), point the
alias ``NAME`` at it (servers started by `vllm-train serve`), and only then report it published. Any
failure unloads what was loaded, so the previous version keeps serving. Afterwards every replica is
checked again: it must serve exactly the versions the publisher expects. Served names are never
reused: vLLM keys its prefix cache by adapter name (DESIGN.md), so a new name per version is what makes
a new version's log-probs right. The servers hold the state (``GET /v1/models``), so a separate process
(``vllm-train push``) can publish. A version counts as *published* when every replica serves it
(`AdapterPublisher.current`).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vllm_train.config import MAX_DELTA_RATIO
from vllm_train.engine.gateway import API_KEY_ENV
from vllm_train.engine.http_client import (
    VERSION_RE,
    HTTPFailure,
    ReplicaState,
    parse_urls,
    replica_state,
    request,
    server_info,
)
from vllm_train.engine.staging import StageDir, default_stage_root
from vllm_train.errors import VllmTrainError
from vllm_train.lora.validate import validate_adapter

# A completion asked of every new version on every replica before the alias moves: an adapter that passed
# validation by value can still turn activations non-finite (vLLM then answers HTTP 400 "Out of range float
# values are not JSON compliant", or NaN log-probs), and no client may be pointed at it.
CANARY = {"prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0.0, "logprobs": 1}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: object, what: str = "adapter name") -> None:
    if not isinstance(name, str) or not NAME_RE.match(name) or VERSION_RE.match(name):
        raise VllmTrainError(f"{what} {name!r} is invalid (letters, digits, '.', '_', '-'; no '-vN' suffix: "
                             f"versions are added when published)")


def default_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or os.environ.get("VLLM_API_KEY") or None


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
    """Publish adapter versions to the replicas of one server group, over HTTP.

    >>> pub = AdapterPublisher(["http://127.0.0.1:8000", "http://127.0.0.1:8001"], keep=2)
    >>> pub.publish("runs/sft/checkpoints/step-50/adapter", "sft")   # -> "sft-v1"; clients may ask for "sft"

    `keep`: how many newest versions of a name stay loaded (>= 1; 2 lets clients that just resolved the
    previous version finish). `max_lora_rank`: the servers' limit; default: what servers started by
    `vllm-train serve` report (others are checked by vLLM at load time, with rollback). `stage_dir`: the
    root under which each server group's immutable copies go; it must be readable by the servers
    (default: $VLLM_TRAIN_STAGE_DIR, or /dev/shm/vllm-train-adapters-UID). `api_key`: sent to the servers
    (default: $VLLM_TRAIN_API_KEY, else $VLLM_API_KEY). `on_loaded(url, served_name)` is called after
    each replica loads a version (e.g. for logging). `max_delta_ratio`: the adapter's update may be at most
    this many times the base weight's norm, per module (`lora.validate`; inf: unchecked, the canary still runs).
    """

    def __init__(self, urls: str | Sequence[str], *, keep: int = 2, max_lora_rank: int | None = None,
                 stage_dir: str | Path | None = None, timeout: float = 120.0, api_key: str | None = None,
                 on_loaded: Callable[[str, str], None] | None = None, max_delta_ratio: float = MAX_DELTA_RATIO):
        self.urls = parse_urls(urls)
        if not isinstance(keep, int) or keep < 1:
            raise VllmTrainError(f"keep: {keep!r} is invalid (an integer >= 1)")
        self.keep = keep
        self.max_lora_rank = max_lora_rank
        self.stage = StageDir(stage_dir or default_stage_root(), self.urls)
        self.timeout = timeout
        self.api_key = api_key if api_key is not None else default_api_key()
        self.on_loaded = on_loaded
        self.max_delta_ratio = max_delta_ratio

    # ---- reading state -------------------------------------------------------------------------
    def states(self, consequence: str = "nothing was published") -> list[ReplicaState]:
        """Every replica's state; raises naming the first replica that does not answer."""
        return self._each(lambda u: replica_state(u, min(self.timeout, 30.0), self.api_key), consequence)

    def current(self, name: str) -> str | None:
        """The newest version of `name` served by every replica (the published one), e.g. 'sft-v3'."""
        common = set.intersection(*(set(s.versions(name)) for s in self.states("cannot resolve " + name)))
        return f"{name}-v{max(common)}" if common else None

    def _each(self, call: Callable[[str], object], consequence: str) -> list:
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = [pool.submit(call, u) for u in self.urls]
            results = []
            for url, fut in zip(self.urls, futures):
                try:
                    results.append(fut.result())
                except HTTPFailure as exc:
                    raise VllmTrainError(f"server replica {url} {exc}; {consequence}") from None
        return results

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, adapter_dir: str | Path, name: str) -> str:
        """Validate, load as ``NAME-vN`` on every replica, unload old versions; return the served name."""
        return self.publish_detailed(adapter_dir, name).served_name

    def publish_detailed(self, adapter_dir: str | Path, name: str) -> Published:
        t0 = time.perf_counter()
        check_name(name)
        self.stage.open()
        with self.stage.lock(name):
            states = self.states()
            guarded = self._validate(adapter_dir, name, states)
            self._check_only_ours(states, name, "nothing was published")
            t_validated = time.perf_counter()

            loaded = {v for s in states for v in s.versions(name)}
            previous = f"{name}-v{max(loaded)}" if loaded else None
            version = 1 + max(loaded | self.stage.used_versions(name), default=0)
            served = f"{name}-v{version}"
            staged = self.stage.stage(adapter_dir, name, version)
            t_staged = time.perf_counter()

            self._load_everywhere(served, staged, guarded, name, previous)
            t_loaded = time.perf_counter()

            unloaded = self._unload_old(states, name, version)
            self._check_after(states, name, served, unloaded, guarded)
            t_end = time.perf_counter()
        unloaded_names = [f"{u}:{name}-v{v}" for u, vs in unloaded.items() for v in sorted(vs)]
        timings = {"validate_s": t_validated - t0, "stage_s": t_staged - t_validated,
                   "load_s": t_loaded - t_staged, "unload_old_s": t_end - t_loaded, "total_s": t_end - t0}
        return Published(name, version, served, str(staged), list(self.urls), unloaded_names, timings)

    def _validate(self, adapter_dir: str | Path, name: str, states: list[ReplicaState]) -> list[str]:
        """Validate the adapter against what the replicas serve; return the URLs that run our
        middleware (`engine.gateway`: aliases, server info)."""
        infos = self._each(lambda u: server_info(u, min(self.timeout, 30.0), self.api_key), "nothing was published")
        bases = {(info or {}).get("model") or s.base_root for s, info in zip(states, infos)}
        if len(bases) > 1:
            raise VllmTrainError(f"the replicas serve different base models ({', '.join(sorted(bases))}); "
                                 f"nothing was published")
        if any(name == s.base_name for s in states):
            raise VllmTrainError(f"adapter name {name!r} is the served base model's name; pick another")
        max_rank = self.max_lora_rank
        if max_rank is None:
            known = [info["max_lora_rank"] for info in infos if info and info.get("max_lora_rank")]
            max_rank = min(known) if known else None
        validate_adapter(adapter_dir, bases.pop(), max_rank, check_base_name=True, max_delta_ratio=self.max_delta_ratio)
        return [u for u, info in zip(self.urls, infos) if info is not None]

    def _check_only_ours(self, states: list[ReplicaState], name: str, consequence: str) -> None:
        """Every version of `name` a replica serves must be one this server group staged, loaded from
        its staged files (a client that loaded its own files under our names is caught here)."""
        staged = self.stage.live(name)
        for s in states:
            for v in s.versions(name):
                root, mine = s.adapters[f"{name}-v{v}"], staged.get(v)
                if mine is None or Path(root).name != mine.name or (os.path.isabs(root) and Path(root) != mine):
                    raise VllmTrainError(
                        f"replica {s.url} serves {name}-v{v} from '{Path(root).name}', which this publisher did not "
                        f"publish to {','.join(self.urls)}; {consequence}. Another client loaded it (start the "
                        f"servers with --api-key), or it was pushed with other --server URLs: unload it or "
                        f"restart the servers")

    def _load_everywhere(self, served: str, staged: Path, guarded: list[str], name: str,
                         previous: str | None) -> None:
        """Load on the canary, then on the others, then point the alias; roll back on any failure."""
        done: list[str] = []
        aliased: list[str] = []
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
            for u in guarded:  # every replica serves it now: the alias may point there
                aliased.append(u)
                self._post(u, "/vllm-train/aliases", {name: served})
        except BaseException as exc:  # HTTP failure, a failing callback, Ctrl-C: nothing stays half-published
            for u in aliased:
                try:
                    self._post(u, "/vllm-train/aliases", {name: previous})
                except HTTPFailure:
                    pass  # the unload below makes the alias answer 404 there: still no wrong weights
            failed_unloads = self._rollback(done, served)
            self.stage.tombstone(staged)
            if not isinstance(exc, HTTPFailure):
                raise
            still = f"{previous} is still served" if previous else f"no version of {name} was served"
            extra = f"; could not unload it from {', '.join(failed_unloads)}" if failed_unloads else ""
            raise VllmTrainError(f"publishing {served} failed on {exc.url}: {exc}; rolled back on "
                                 f"{len(done) - len(failed_unloads)} replica(s) that had loaded it, {still}{extra}") \
                from None

    def _check_after(self, before: list[ReplicaState], name: str, served: str, unloaded: dict[str, set[int]],
                     guarded: list[str]) -> None:
        """Each replica serves exactly the versions of `name` it served before, plus the new one, minus
        those unloaded; from our staged files; with the alias on the new one."""
        consequence = f"{served} was published but is not verified"
        after = self.states(consequence)
        version = int(VERSION_RE.match(served)["n"])
        for b, a in zip(before, after):
            expected = (set(b.versions(name)) | {version}) - unloaded.get(b.url, set())
            if set(a.versions(name)) != expected:
                raise VllmTrainError(
                    f"after publishing {served}, replica {a.url} serves {_fmt(name, a.versions(name))} but this "
                    f"publisher expected {_fmt(name, expected)}: another client loaded or unloaded versions "
                    f"(start the servers with --api-key)")
            if a.url in guarded and a.aliases.get(name) != served:
                raise VllmTrainError(f"after publishing {served}, replica {a.url} answers '{name}' with "
                                     f"{a.aliases.get(name)}: another client changed the alias")
        self._check_only_ours(after, name, consequence)

    def _load(self, url: str, served: str, path: Path) -> None:
        """Load on one replica and run the canary there; a failed canary unloads the version again."""
        self._post(url, "/v1/load_lora_adapter", {"lora_name": served, "lora_path": str(path)})
        try:
            self._canary(url, served)
        except HTTPFailure as exc:
            unloaded = not self._rollback([url], served)
            raise HTTPFailure(url, f"{exc}; {'unloaded' if unloaded else 'could not unload it'} there",
                              exc.status) from None
        except BaseException:
            self._rollback([url], served)
            raise

    def _canary(self, url: str, served: str) -> None:
        try:
            body = request("POST", f"{url}/v1/completions", {"model": served, **CANARY}, timeout=self.timeout,
                           api_key=self.api_key)
        except HTTPFailure as exc:
            raise HTTPFailure(url, f"the canary completion through {served} failed ({exc}): its log-probs are "
                                   f"not finite, or it cannot serve", exc.status) from None
        try:
            logprobs = body["choices"][0]["logprobs"]["token_logprobs"]
        except (TypeError, KeyError, IndexError):
            raise HTTPFailure(url, f"the canary completion through {served} returned no log-probs") from None
        if not logprobs or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in logprobs):
            raise HTTPFailure(url, f"{served} answers the canary prompt with log-probs {logprobs} (not finite)")

    def _post(self, url: str, route: str, payload: dict) -> None:
        request("POST", f"{url}{route}", payload, timeout=self.timeout, api_key=self.api_key)

    def _rollback(self, urls: list[str], served: str) -> list[str]:
        failed = []
        for url in urls:
            try:
                self._post(url, "/v1/unload_lora_adapter", {"lora_name": served})
            except HTTPFailure:
                failed.append(url)
        return failed

    def _unload_old(self, states: list[ReplicaState], name: str, version: int) -> dict[str, set[int]]:
        """Unload versions older than the `keep` newest (the new one included); delete their staged
        copies. Returns the versions unloaded from each URL."""
        unloaded: dict[str, set[int]] = {}
        kept = set(sorted({v for s in states for v in s.versions(name)} | {version}, reverse=True)[:self.keep])
        lingering = set()  # versions whose unload failed somewhere: their files must stay
        for s in states:
            for old in sorted(set(s.versions(name)) - kept):
                served = f"{name}-v{old}"
                try:
                    self._post(s.url, "/v1/unload_lora_adapter", {"lora_name": served})
                    unloaded.setdefault(s.url, set()).add(old)
                except HTTPFailure as exc:  # the publish itself succeeded; an old version lingers
                    lingering.add(old)
                    print(f"warning: could not unload {served} from {s.url}: {exc}", file=sys.stderr)
        self.stage.retire(name, kept | lingering)
        return unloaded


def _fmt(name: str, versions) -> str:
    return "{" + ", ".join(f"{name}-v{v}" for v in sorted(versions)) + "}"


def make_push_hook(urls: str | list[str], name: str, *, keep: int = 2, strict: bool = False, check: bool = True,
                   **publisher_kwargs) -> Callable[[Path], None]:
    """An `on_save` callback that publishes every adapter dir a trainer writes (checkpoints and final)
    to the servers at `urls` as the next version of `name`:

        trainer = LoRATrainer(model, config, on_save=make_push_hook("http://127.0.0.1:8000", name="sft"))

    A failed push prints one warning line and training goes on (the previous version keeps serving);
    `strict=True` raises instead. Name and servers are checked now (`check=False` skips the servers), so
    a typo or a server that is not up fails before training starts. `api_key` and the other
    `AdapterPublisher` options pass through (the key defaults to $VLLM_TRAIN_API_KEY).
    """
    publisher = AdapterPublisher(urls, keep=keep, **publisher_kwargs)
    check_name(name, "--push-name")
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
