"""--report-to: metrics.jsonl always, TensorBoard by default, Weights & Biases when asked (offline here).

Oracle for W&B: the run file wandb itself writes (`wandb/offline-run-*/run-*.wandb`, records in the
LevelDB log framing wandb uses, each a `wandb_internal_pb2.Record`), read back and compared with our
metrics.jsonl step by step.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError


def test_report_to_takes_trls_spellings(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B without a login is refused (tests/test_bad_input_table.py)
    assert LoRATrainConfig().report_to == ["tensorboard"]
    assert LoRATrainConfig(report_to="none").report_to == []
    assert LoRATrainConfig(report_to=["none"]).report_to == []
    assert LoRATrainConfig(report_to="all").report_to == ["tensorboard", "wandb"]
    assert LoRATrainConfig(report_to="wandb,tensorboard").report_to == ["wandb", "tensorboard"]
    with pytest.raises(VllmTrainError, match="report_to"):
        LoRATrainConfig(report_to="mlflow")


def _wandb_history(run_file) -> tuple[list[dict], dict]:
    """(history rows, config) from a wandb run file: 7-byte file header, then 32 KiB blocks of records,
    each chunk with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunk)
            chunk = b""
    rows, config = [], {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return rows, config


def test_sft_reports_to_wandb_offline_the_same_metrics(tiny_model, tmp_path):
    pytest.importorskip("wandb")
    from vllm_train.assets import data_file
    from vllm_train.metrics import read_metrics

    out = tmp_path / "sft"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "vllm-train-test"}
    done = subprocess.run(
        [sys.executable, "-m", "vllm_train", "sft", "--model", tiny_model, "--data", str(data_file("sft_train.jsonl")),
         "--output-dir", str(out), "--max-steps", "6", "--logging-steps", "2", "--batch-size", "8",
         "--gradient-accumulation-steps", "1", "--max-length", "64", "--report-to", "wandb", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ours] == [2, 4, 6]
    assert not (out / "tb").exists()  # --report-to wandb alone: no TensorBoard

    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((out / "wandb").rglob("*"))
    rows, config = _wandb_history(run_files[0])
    logged = {row["_step"]: row for row in rows if "loss" in row}
    assert sorted(logged) == [2, 4, 6]
    for r in ours:
        for key, value in r.items():
            if key != "step":
                assert logged[r["step"]][key] == pytest.approx(value, rel=1e-12), key
    assert config["rank"] == 8 and config["kind"] == "sft"  # the resolved config, as resolved_config.json has it
