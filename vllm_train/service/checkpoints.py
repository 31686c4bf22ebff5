"""Named checkpoints under ``--state-dir``: ordinary PEFT adapter directories, plus the optimizer's state.

Layout: ``STATE_DIR/<model id>/weights/<name>/`` (save_state / save_weights: adapter + optimizer) and
``.../sampler_weights/<name>/`` (save_weights_for_sampler with a name: adapter only), each holding
``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT, loadable by PEFT and vLLM as they are),
``optimizer.safetensors`` (AdamW's per-parameter moments and step counts, in the adapter's parameter order)
and ``checkpoint.json`` (the run's LoRA settings, optimizer hyperparameters, step count, owner digest). A
checkpoint is written into a temporary directory beside its place and renamed into it, so a reader sees a
whole checkpoint or none. Only safetensors and JSON are read back. The ``tinker://<model id>/weights/<name>``
path the SDK gets names the directory; a restarted server finds every checkpoint from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_train.lora.peft_io import read_adapter_dir, write_adapter_dir
from vllm_train.service.problems import BadRequest, NotFound
from vllm_train.service.training import Run, Trainer

KINDS = {"weights": "training", "sampler_weights": "sampler"}
META = "checkpoint.json"
OPTIMIZER = "optimizer.safetensors"


def parse_path(path: str, field: str = "path") -> tuple[str, str, str]:
    """(model id, kind, name) of ``tinker://<model id>/<weights|sampler_weights>/<name>``."""
    prefix, sep, rest = path.partition("://")
    parts = rest.split("/")
    if prefix != "tinker" or not sep or len(parts) != 3 or parts[1] not in KINDS or not all(parts):
        raise BadRequest(field, f"{path!r} is not tinker://RUN/weights/NAME or tinker://RUN/sampler_weights/NAME")
    if any(p in (".", "..") for p in parts):
        raise BadRequest(field, f"{path!r}: no '.' or '..' components")
    return parts[0], parts[1], parts[2]


class CheckpointStore:
    def __init__(self, root: str | None):
        self.root = Path(root) if root else None

    def _require_root(self, route: str) -> Path:
        if self.root is None:
            raise BadRequest(route, "this server keeps no checkpoints: start it with --state-dir DIR")
        return self.root

    def directory(self, model_id: str, kind: str, name: str) -> Path:
        return self._require_root("path") / model_id / kind / name

    # ---- writing (worker thread) -----------------------------------------------------------------------
    def save(self, trainer: Trainer, run: Run, kind: str, name: str, overwrite: bool,
             user_metadata: dict | None = None) -> str:
        final = self.directory(run.model_id, kind, name)
        if final.exists() and not overwrite:
            raise BadRequest("path", f"checkpoint {name!r} exists (pass overwrite=True to replace it)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        try:
            tenants = trainer.tenants
            write_adapter_dir(tmp, tenants.peft_state_dict(run.slot), tenants.peft_config(run.slot, trainer.base_model))
            meta = {"owner": run.owner, "model_id": run.model_id, "base_model": trainer.base_model, "kind": kind,
                    "name": name, "rank": run.rank, "seed": run.seed, "targets": list(run.targets),
                    "steps": run.steps, "time": time.time(), "user_metadata": user_metadata or {}}
            if kind == "weights":
                tensors, meta["optimizer"] = _optimizer_tensors(run.optimizer)
                save_file(tensors, str(tmp / OPTIMIZER))
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():  # overwrite: the old one goes aside first, so a crash leaves one whole copy
                aside = final.with_name(f".{name}.old-{os.getpid()}")
                os.rename(final, aside)
                os.rename(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return f"tinker://{run.model_id}/{kind}/{name}"

    # ---- reading ---------------------------------------------------------------------------------------
    def find(self, path: str, owner: str, field: str = "path") -> tuple[Path, dict]:
        """The checkpoint directory and its metadata, for this key (another key's is "not found")."""
        model_id, kind, name = parse_path(path, field)
        directory = self.directory(model_id, kind, name)
        meta = _read_meta(directory)
        if meta is None or meta.get("owner") != owner:
            raise NotFound(f"{field}: no checkpoint {path!r} for this API key")
        return directory, meta

    def read_adapter(self, directory: Path) -> dict[str, torch.Tensor]:
        _, state = read_adapter_dir(directory)
        return state

    def read_optimizer(self, directory: Path, meta: dict) -> dict:
        """AdamW's state_dict as saved (param indices 0..n-1 in the adapter's parameter order)."""
        if not (directory / OPTIMIZER).is_file() or "optimizer" not in meta:
            raise BadRequest("optimizer", f"checkpoint {meta.get('name')!r} holds no optimizer state")
        tensors = load_file(str(directory / OPTIMIZER))
        state: dict[int, dict] = {}
        for key, tensor in tensors.items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = tensor
        groups = [dict(g, betas=tuple(g["betas"])) for g in meta["optimizer"]["param_groups"]]
        return {"state": state, "param_groups": groups}

    def list(self, owner: str, model_id: str) -> list[dict]:
        """The run's checkpoints as the SDK's Checkpoint objects (JSON), oldest first."""
        out = []
        for kind, checkpoint_type in KINDS.items():
            base = self.root / model_id / kind if self.root else None
            for directory in sorted(base.iterdir()) if base and base.is_dir() else []:
                meta = _read_meta(directory)
                if meta is None or meta.get("owner") != owner:
                    continue
                size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
                out.append({"checkpoint_id": f"{kind}/{directory.name}", "checkpoint_type": checkpoint_type,
                            "time": datetime.fromtimestamp(meta["time"], UTC).isoformat(),
                            "tinker_path": f"tinker://{model_id}/{kind}/{directory.name}", "size_bytes": size,
                            "user_metadata": meta.get("user_metadata") or None})
        return sorted(out, key=lambda c: c["time"])

    def saved_runs(self, owner: str) -> list[str]:
        """Model ids with at least one checkpoint of this key (a restarted server lists them)."""
        if self.root is None or not self.root.is_dir():
            return []
        return [d.name for d in sorted(self.root.iterdir()) if d.is_dir() and self.list(owner, d.name)]


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, values in state["state"].items() for name, value in values.items()
               if isinstance(value, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state["param_groups"]]
    return tensors, {"param_groups": groups}
