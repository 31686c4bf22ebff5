"""The service's operations behind the HTTP routes: sessions, training runs and their queued requests.

Every operation first checks its whole request (fields named in `BadRequest`s), then either answers at
once (sessions, info) or queues one job for the worker and answers the future's id. Runs and sessions
belong to the API key that created them: another key gets the same 404 as for an unknown id.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vllm_train.service.checkpoints import CheckpointStore
from vllm_train.service.config import ServiceConfig
from vllm_train.service.datums import Limits, check_forward_backward
from vllm_train.service.fields import get
from vllm_train.service.futures import FutureRecord, FutureStore
from vllm_train.service.problems import BadRequest, NotFound, NotSupported
from vllm_train.service.sampling import Sampler
from vllm_train.service.tenants import TenantModel
from vllm_train.service.training import AdamSettings, Trainer
from vllm_train.service.wire import decode_forward_backward
from vllm_train.service.worker import Job, Worker


@dataclass
class Session:
    session_id: str
    owner: str
    created: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)


class Service:
    def __init__(self, config: ServiceConfig, tenants: TenantModel, tokenizer_id: str, vocab_size: int,
                 max_context: int, engine=None):
        self.config = config
        self.tokenizer_id = tokenizer_id
        self.limits = Limits(vocab_size, max_context, config.max_batch_tokens)
        self.trainer = Trainer(tenants, config.model, config.max_adapters)
        self.futures = FutureStore()
        self.checkpoints = CheckpointStore(config.state_dir)
        find = self.checkpoints.find if config.state_dir else None  # named sampler weights kept on disk
        self.sampler = Sampler(engine, self.trainer, self.limits, find) if engine is not None else None
        self.worker = Worker(self.futures, self.trainer, config.max_batch_tokens,
                             self.sampler.sample_many if self.sampler is not None else None)
        self.sessions: dict[str, Session] = {}
        self._session_ids = itertools.count(1)
        self.architecture = type(tenants.model).__name__

    def is_base_model(self, name: str) -> bool:
        """`name` is this server's model: --model as given, or a path to the same directory."""
        if name == self.config.model:
            return True
        local = Path(self.config.model)
        return local.exists() and Path(name).exists() and Path(name).resolve() == local.resolve()

    # ---- sessions -------------------------------------------------------------------------------------
    def create_session(self, owner: str, body: dict) -> dict:
        get(body, "tags", list, [])
        session = Session(f"session-{next(self._session_ids)}-{secrets.token_hex(4)}", owner)
        self.sessions[session.session_id] = session
        return {"type": "create_session", "session_id": session.session_id}

    def session_for(self, owner: str, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"session_id: no session {session_id!r} for this API key")
        return session

    def heartbeat(self, owner: str, body: dict) -> dict:
        self.session_for(owner, get(body, "session_id", str)).last_heartbeat = time.time()
        return {"type": "session_heartbeat"}

    def finish_session(self, owner: str, session_id: str) -> dict:
        """The SDK's ServiceClient closing (a `with` block's end): the session ends, its runs are unloaded
        (their checkpoints stay)."""
        self._end(self.session_for(owner, session_id))
        return {}

    def expire_sessions(self, now: float | None = None) -> list[str]:
        """End the sessions whose client stopped heartbeating (it crashed or lost the network) and unload
        their runs, so a vanished client does not hold adapter slots forever. Returns the ended sessions."""
        now = time.time() if now is None else now
        ended = [s for s in self.sessions.values() if now - s.last_heartbeat > self.config.session_ttl_seconds]
        for session in ended:
            self._end(session)
        return [s.session_id for s in ended]

    def _end(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        for model_id, run in list(self.trainer.runs.items()):
            if model_id.startswith(f"{session.session_id}:"):
                self.unload_model(run.owner, {"model_id": model_id})

    def capabilities(self) -> dict:
        return {"supported_models": [{"model_name": self.config.model, "max_context_length": self.limits.max_context,
                                      "trainable": True, "sampleable": self.config.sampling}]}

    # ---- training runs ----------------------------------------------------------------------------------
    def create_model(self, owner: str, body: dict) -> FutureRecord:
        session = self.session_for(owner, get(body, "session_id", str))
        seq = get(body, "model_seq_id", int)
        base = get(body, "base_model", str)
        if not self.is_base_model(base):
            raise BadRequest("base_model", f"this server trains {self.config.model!r} only, not {base!r}")
        lora = get(body, "lora_config", dict, None)
        if lora is None:
            raise NotSupported("lora_config: full fine-tuning is not supported here; pass a LoRA rank")
        rank = get(lora, "rank", int, where="lora_config")
        if not 1 <= rank <= self.config.max_lora_rank:
            raise BadRequest("lora_config.rank", f"{rank} is outside 1..{self.config.max_lora_rank} (--max-lora-rank)")
        seed = get(lora, "seed", int, None, where="lora_config")
        if seed is not None and not 0 <= seed < 2**62:
            raise BadRequest("lora_config.seed", f"{seed} is outside 0..2**62-1")
        attn = get(lora, "train_attn", bool, True, "lora_config")
        mlp = get(lora, "train_mlp", bool, True, "lora_config")
        unembed = get(lora, "train_unembed", bool, True, "lora_config")
        if not (attn or mlp or unembed):
            raise BadRequest("lora_config", "train_attn, train_mlp and train_unembed are all off: nothing to train")
        optimizer = get(body, "optimizer_config", dict, {"type": "adamw"})
        if optimizer.get("type", "adamw") != "adamw":
            raise NotSupported(f"optimizer_config.type: {optimizer.get('type')!r} is not supported; only adamw")
        model_id = f"{session.session_id}:train:{seq}"
        if model_id in self.trainer.runs:
            raise BadRequest("model_seq_id", f"model {model_id!r} exists already")
        self.trainer.free_slot()  # a full server says so now, not in the future
        targets = tuple(self.trainer.tenants.targets(attn, mlp, unembed))
        metadata = get(body, "user_metadata", dict, {})

        def create() -> dict:
            self.trainer.create_run(model_id, owner, rank, seed, targets, metadata)
            return {"type": "create_model", "model_id": model_id}
        return self._queue(owner, "CreateModel", model_id, create)

    def get_info(self, owner: str, body: dict) -> dict:
        run = self.trainer.run_for(get(body, "model_id", str), owner)
        return {"type": "get_info", "model_id": run.model_id, "is_lora": True, "lora_rank": run.rank,
                "model_name": self.config.model,
                "model_data": {"arch": self.architecture, "model_name": self.config.model,
                               "tokenizer_id": self.tokenizer_id}}

    def forward_backward(self, owner: str, raw: bytes) -> FutureRecord:
        request = decode_forward_backward(raw)
        self.trainer.run_for(request.model_id, owner)
        batch = check_forward_backward(request, self.limits)
        kind = "Forward" if request.forward_only else "ForwardBackward"
        record = self.futures.create(owner, kind)
        self.worker.submit(Job(record, request.model_id, batch=batch, forward_only=request.forward_only))
        return record

    def optim_step(self, owner: str, body: dict) -> FutureRecord:
        model_id = get(body, "model_id", str)
        run = self.trainer.run_for(model_id, owner)
        params = body.get("adam_params")
        if params is None:
            if isinstance(body.get("optimizer_params"), dict):
                raise NotSupported("optimizer_params: only adam_params (AdamW) is supported here")
            raise BadRequest("adam_params", "required")
        settings = AdamSettings(**{name: get(params, name, (int, float), getattr(AdamSettings, name), "adam_params")
                                   for name in AdamSettings.__dataclass_fields__}).check()
        unknown = sorted(set(params) - set(AdamSettings.__dataclass_fields__))
        if unknown:
            raise BadRequest(f"adam_params.{unknown[0]}", "not an AdamParams field")
        return self._queue(owner, "OptimStep", model_id, lambda: self.trainer.optim_step(run, settings))

    def unload_model(self, owner: str, body: dict) -> FutureRecord:
        model_id = get(body, "model_id", str)
        run = self.trainer.run_for(model_id, owner)

        def unload() -> dict:
            if self.sampler is not None:
                self.sampler.forget(model_id)
            self.trainer.unload(run)
            return {"type": "unload_model", "model_id": model_id}
        return self._queue(owner, "UnloadModel", model_id, unload)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save_weights(self, owner: str, body: dict) -> FutureRecord:
        model_id = get(body, "model_id", str)
        run = self.trainer.run_for(model_id, owner)
        name = checkpoint_name(get(body, "path", str, None) or f"step-{run.steps:06d}", "path")
        overwrite = get(body, "overwrite", bool, False)
        metadata = get(body, "user_metadata", dict, None)
        if self.checkpoints.directory(model_id, "weights", name).exists() and not overwrite:  # (and no --state-dir)
            raise BadRequest("path", f"checkpoint {name!r} exists (pass overwrite=True to replace it)")

        def save() -> dict:
            path = self.checkpoints.save(self.trainer, run, "weights", name, overwrite, metadata)
            return {"type": "save_weights", "path": path}
        return self._queue(owner, "SaveWeights", model_id, save)

    def load_weights(self, owner: str, body: dict) -> FutureRecord:
        path = get(body, "path", str)
        with_optimizer = get(body, "optimizer", bool, False)
        directory, meta = self.checkpoints.find(path, owner)
        if meta.get("base_model") != self.config.model:
            raise BadRequest("path", f"{path!r} was trained on {meta.get('base_model')!r}, not {self.config.model!r}")
        model_id = get(body, "model_id", str, None)
        if model_id is None:  # a new training client from the checkpoint
            session = self.session_for(owner, get(body, "session_id", str))
            model_id = f"{session.session_id}:train:{get(body, 'model_seq_id', int)}"
            if model_id in self.trainer.runs:
                raise BadRequest("model_seq_id", f"model {model_id!r} exists already")
            self.trainer.free_slot()
            run = None
        else:
            run = self.trainer.run_for(model_id, owner)
            if run.rank != meta["rank"] or list(run.targets) != meta["targets"]:
                raise BadRequest("path", f"the checkpoint's LoRA (rank {meta['rank']}, {meta['targets']}) differs "
                                 f"from this model's (rank {run.rank}, {list(run.targets)})")
        state = self.checkpoints.read_adapter(directory)
        optimizer_state = self.checkpoints.read_optimizer(directory, meta) if with_optimizer else None

        def load() -> dict:
            target = run or self.trainer.create_run(model_id, owner, meta["rank"], meta["seed"],
                                                    tuple(meta["targets"]), meta.get("user_metadata"))
            try:
                self.trainer.restore(target, state, optimizer_state, meta["steps"])
            except Exception:
                if run is None:
                    self.trainer.unload(target)
                raise
            return {"type": "load_weights", "path": path, "model_id": model_id}
        return self._queue(owner, "LoadWeights", model_id, load)

    def list_checkpoints(self, owner: str, model_id: str) -> dict:
        if model_id not in self.checkpoints.saved_runs(owner):
            self.trainer.run_for(model_id, owner)  # a live run without checkpoints lists none; others: 404
        return {"checkpoints": self.checkpoints.list(owner, model_id)}

    def training_runs(self, owner: str, limit: int, offset: int) -> dict:
        """Live runs and those with checkpoints on disk (after a restart), as the SDK's TrainingRun."""
        ids = sorted({*(m for m, r in self.trainer.runs.items() if r.owner == owner),
                      *self.checkpoints.saved_runs(owner)})
        runs = []
        for model_id in ids[offset:offset + limit]:
            live = self.trainer.runs.get(model_id)
            saved = self.checkpoints.list(owner, model_id)
            rank = live.rank if live else None
            last = saved[-1]["time"] if saved else None
            runs.append({"training_run_id": model_id, "base_model": self.config.model, "model_owner": owner,
                         "is_lora": True, "lora_rank": rank, "last_request_time": last or _now_iso(),
                         "last_checkpoint": next((c for c in reversed(saved) if c["checkpoint_type"] == "training"),
                                                 None)})
        return {"training_runs": runs, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    # ---- sampling -------------------------------------------------------------------------------------
    def _sampler(self, route: str) -> Sampler:
        if self.sampler is None:
            raise NotSupported(f"{route}: this server runs without a sampling engine (started with sampling off)")
        return self.sampler

    def save_weights_for_sampler(self, owner: str, body: dict) -> FutureRecord:
        sampler = self._sampler("save_weights_for_sampler")
        model_id = get(body, "model_id", str)
        run = self.trainer.run_for(model_id, owner)
        name = checkpoint_name(get(body, "path", str, None), "path")
        kind = get(body, "kind", str, "snapshot")
        if kind not in ("snapshot", "inflight"):
            raise BadRequest("kind", f"{kind!r} is not snapshot or inflight")
        if name is None:
            get(body, "sampling_session_seq_id", int)

        def publish() -> dict:
            version = sampler.publish(run, name)
            if name is not None and self.checkpoints.root is not None:  # a PEFT directory too: it stays samplable
                self.checkpoints.save(self.trainer, run, "sampler_weights", name, overwrite=True)
                version.directory = str(self.checkpoints.directory(run.model_id, "sampler_weights", name))
            if name is not None:
                return {"type": "save_weights_for_sampler", "path": version.path}
            session = sampler.new_session(owner, version, inflight=kind == "inflight")
            return {"type": "save_weights_for_sampler", "path": version.path,
                    "sampling_session_id": session.sampling_session_id}
        return self._queue(owner, "SaveWeightsForSampler", model_id, publish)

    def create_sampling_session(self, owner: str, body: dict) -> dict:
        sampler = self._sampler("create_sampling_session")
        self.session_for(owner, get(body, "session_id", str))
        get(body, "sampling_session_seq_id", int)
        path, base = get(body, "model_path", str, None), get(body, "base_model", str, None)
        if path is not None:
            session = sampler.new_session(owner, sampler.version_at(path, owner))
        elif base is not None:
            if not self.is_base_model(base):
                raise BadRequest("base_model", f"this server samples {self.config.model!r} only, not {base!r}")
            session = sampler.new_session(owner, None)
        else:
            raise BadRequest("model_path", "give model_path (tinker://...) or base_model")
        return {"type": "create_sampling_session", "sampling_session_id": session.sampling_session_id}

    def get_sampler(self, owner: str, sampling_session_id: str) -> dict:
        session = self._sampler("samplers").session_for(owner, sampling_session_id)
        return {"sampler_id": session.sampling_session_id, "base_model": self.config.model,
                "model_path": session.version.path if session.version else None}

    def asample(self, owner: str, body: dict) -> dict:
        sampler = self._sampler("asample")
        session_id = get(body, "sampling_session_id", str, None)
        if session_id is not None:
            session = sampler.session_for(owner, session_id)
        elif get(body, "model_path", str, None) is not None:
            session = sampler.new_session(owner, sampler.version_at(body["model_path"], owner))
        elif self.is_base_model(get(body, "base_model", str, self.config.model)):
            session = sampler.new_session(owner, None)
        else:
            raise BadRequest("base_model", f"this server samples {self.config.model!r} only")
        spec = sampler.check_sample(body)
        record = self.futures.create(owner, "Sample")
        self.worker.submit(Job(record, None, sample=(session, spec)))
        return {"request_id": record.request_id,
                "sample_sequence_ids": [f"{record.request_id}-{j}" for j in range(spec.num_samples)]}

    def close(self) -> None:
        """After the worker stopped: free the engine's LoRA slots of every run (a shared engine outlives us)."""
        if self.sampler is not None:
            self.sampler.close()

    def _queue(self, owner: str, kind: str, model_id: str | None, action) -> FutureRecord:
        record = self.futures.create(owner, kind)
        self.worker.submit(Job(record, model_id, action=action))
        return record


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def checkpoint_name(name: str | None, field_name: str) -> str | None:
    """A checkpoint's name: one path component (it becomes a directory and part of a tinker:// path)."""
    if name is not None and not _NAME.fullmatch(name):
        raise BadRequest(field_name, f"{name!r}: use letters, digits, '.', '_' and '-' (at most 128, no '/')")
    return name


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()
