"""Quiet as a library: a script that imports vllm_train, trains a step and generates with vLLM prints only its
own lines -- no vLLM log, no torch or transformers warnings, no weight-loading bars -- unless
VLLM_TRAIN_VERBOSE=1 (or `vllm_train.set_verbose()`), and a level the user exported still wins.
Own processes: the libraries read these settings when they are imported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    from vllm_train import LoRATrainConfig, LoRATrainer
    from vllm_train.assets import TINY_MODEL, data_file

    records = [json.loads(line) for line in data_file("sft_train.jsonl").read_text().splitlines()[:8]]
    config = LoRATrainConfig(rank=2, target_modules=["q_proj"], max_steps=1, batch_size=2,
                             gradient_accumulation_steps=1, output_dir=tempfile.mkdtemp(), report_to="none")
    trainer = LoRATrainer(str(TINY_MODEL), config, progress=False)
    trainer.setup_training()
    trainer.train(records)
    out = trainer.generate([[{"role": "user", "content": "What is 1 + 1?"}]], temperature=0.0, max_tokens=4)
    print("RESULT", repr(out[0].outputs[0].text))
""")
VLLM_LOG = re.compile(r"\b(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d")  # vLLM's line format


def _run(tmp_path, **env) -> list[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    clean = {k: v for k, v in os.environ.items() if k not in (
        "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS", "VLLM_TRAIN_VERBOSE")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**clean, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.vllm
def test_a_library_script_prints_only_its_own_lines(tmp_path):
    lines = _run(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("RESULT "), lines


@pytest.mark.vllm
def test_verbose_shows_the_libraries_and_a_users_own_level_wins(tmp_path):
    loud = _run(tmp_path, VLLM_TRAIN_VERBOSE="1")
    assert [line for line in loud if VLLM_LOG.search(line) and "INFO" in line]
    assert [line for line in loud if "Loading weights:" in line]  # transformers' bars are back
    own = _run(tmp_path, VLLM_LOGGING_LEVEL="INFO")  # exported by the user: vLLM's log, the rest still quiet
    assert [line for line in own if VLLM_LOG.search(line) and "INFO" in line]
    assert not [line for line in own if "Loading weights:" in line]


def test_set_verbose_changes_only_what_vllm_train_set(monkeypatch):
    import vllm_train
    from vllm_train import quiet

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's: never touched
    monkeypatch.delitem(quiet._set_by_us, "TRANSFORMERS_VERBOSITY", raising=False)
    for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delitem(quiet._set_by_us, name, raising=False)
    try:
        vllm_train.set_verbose()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and "TORCH_CPP_LOG_LEVEL" not in os.environ
        vllm_train.set_verbose(False)
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and quiet.verbose() is False
    finally:
        for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL"):
            quiet._set_by_us.pop(name, None)
