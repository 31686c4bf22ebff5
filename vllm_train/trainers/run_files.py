"""Run directories that never lose data or mix runs.

A checkpoint records the run's fingerprint: the model, a hash of the training records, and the resolved
config minus the fields a resume may change (where it writes, how long it runs, how often it logs, saves
and evaluates, and how the global batch is split over ranks). Resuming from a checkpoint with another
fingerprint is refused, naming what differs; a checkpoint written before fingerprints resumes with a
warning.

``--overwrite`` over an earlier run removes exactly the paths its manifest lists (its checkpoints above all,
which would otherwise shadow the new run's on a later ``--resume-from latest``; `vllm_train.run_manifest`);
`RUN_WRITES` says where a new run writes, which must hold no file of the user's. Leftovers of a killed run
(temp dirs of an interrupted save) are removed when the next run starts. Under torchrun rank 0 alone deletes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from vllm_train import distributed
from vllm_train.errors import VllmTrainError

# Config fields a resumed run may change. The data-parallel split (batch_size per rank, ranks, tensor
# parallelism) may change too, as long as the global batch stays: it is fingerprinted instead.
RESUMABLE_FIELDS = frozenset({"output_dir", "resume_from", "max_steps", "num_steps", "logging_steps", "save_steps",
                              "eval_steps", "save_total_limit", "tensor_parallel_size", "batch_size", "report_to",
                              "rollout_servers", "stop_on_divergence"})

# Where a new run of each kind writes (beside the files of every run): --overwrite refuses to start a run
# that would write over a file the earlier run did not write (`run_manifest.plan_overwrite`). Over-wide on
# purpose: a name here that a run does not write only makes --overwrite stricter.
EVERY_RUN_WRITES = ("resolved_config.json", "metrics.jsonl", "tb", "wandb", "checkpoints", "loss.png", "curves.png")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
RUN_WRITES = {
    "adapter": (*EVERY_RUN_WRITES, "adapter_config.json", "adapter_model.safetensors", "README.md",
                "value_head.safetensors", "demo_summary.json"),
    "reward_model": (*EVERY_RUN_WRITES, "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "adapter/README.md", "model.safetensors", "config.json", "rm_eval.json", *TOKENIZER_FILES),
}
LEFTOVER_PATTERNS = ("checkpoints/.step-*.tmp-*", ".merged.tmp-*", "metrics.tmp", "*.tmp.png")


def fingerprint(config: Any, model_name: str, records: Any, world_size: int) -> dict:
    """What determines a run, as stored in its checkpoints."""
    flat = _flat(dataclasses.asdict(config))
    values = {k: v for k, v in flat.items() if k.rpartition(".")[2] not in RESUMABLE_FIELDS}
    lora = getattr(config, "lora_config", config)
    values["global_batch_size"] = lora.batch_size * world_size
    path = Path(model_name)
    model = str(path.resolve()) if path.exists() else str(model_name)
    return {"model": model, "data": data_hash(records), "config": values}


def data_hash(records: Any) -> str:
    """sha256 of the training records (a dataset's loaded records, or a list of dicts)."""
    records = getattr(records, "records", records)
    text = json.dumps(list(records), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_fingerprint(saved: dict | None, current: dict, checkpoint: Path) -> None:
    """Refuse a resume whose run differs from the checkpoint's; warn for a checkpoint without a fingerprint."""
    if saved is None:
        if distributed.is_main():
            print(f"warning: {checkpoint} has no run fingerprint (written by an older version): resuming "
                  f"without checking that model, data and config match", file=sys.stderr, flush=True)
        return
    diffs = []
    if saved.get("model") != current["model"]:
        diffs.append(f"model ({saved.get('model')} -> {current['model']})")
    if saved.get("data") != current["data"]:
        diffs.append("training data (the records differ)")
    old, new = saved.get("config", {}), current["config"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} ({old.get(key, 'unset')} -> {new.get(key, 'unset')})")
    if diffs:
        raise VllmTrainError(f"resume_from: {checkpoint} belongs to a different run: {'; '.join(diffs)} "
                             f"(resume with the same settings, or start a new run with --overwrite)")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def clean_leftovers(run_dir: Path) -> None:
    """Remove the temp dirs and files a killed run left behind (rank 0)."""
    if not distributed.is_main() or not Path(run_dir).is_dir():
        return
    for pattern in LEFTOVER_PATTERNS:
        for leftover in Path(run_dir).glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
