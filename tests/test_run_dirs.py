"""Run directories never lose data or mix runs: resume fingerprints, --overwrite, kill-time leftovers."""

import json
import os
import subprocess
import sys

import pytest

from vllm_train.cli import main
from vllm_train.commands._common import check_output_dir
from vllm_train.config import LoRATrainConfig
from vllm_train.data.causal_lm import CausalLMDataset
from vllm_train.engine.staging import SYNC_COPY_PREFIX, remove_dead_sync_copies
from vllm_train.errors import VllmTrainError
from vllm_train.metrics import read_metrics
from vllm_train.trainers.run_files import clean_leftovers
from vllm_train.trainers.sft import LoRATrainer


def make_config(out, **kw):
    base = dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], learning_rate=3e-3, batch_size=8,
                warmup_ratio=0.0, logging_steps=1, max_length=64, output_dir=str(out), seed=0, max_steps=2,
                save_steps=1)
    return LoRATrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def records():
    from vllm_train.assets import data_file
    from vllm_train.data.io import load_records

    return load_records(data_file("sft_train.jsonl"))[:32]


def train(tiny_model, tokenizer, config, records):
    LoRATrainer(tiny_model, config, progress=False, tensorboard=False).train(
        CausalLMDataset(records, tokenizer, 64))


@pytest.fixture(scope="module")
def checkpointed(tiny_model, tokenizer, records, tmp_path_factory):
    """A 3-step run with checkpoints at steps 1 and 2 (tests copy it)."""
    run = tmp_path_factory.mktemp("run") / "run"
    train(tiny_model, tokenizer, make_config(run, max_steps=3, save_steps=1), records)
    return run


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_other_config_and_data_naming_what_differs(tiny_model, tokenizer, records, checkpointed,
                                                                  tmp_path):
    run = copy_run(checkpointed, tmp_path / "run")
    with pytest.raises(VllmTrainError, match=r"learning_rate \(0.003 -> 0.001\)"):
        train(tiny_model, tokenizer, make_config(run, max_steps=3, learning_rate=1e-3, resume_from="latest"), records)
    with pytest.raises(VllmTrainError, match=r"training data"):
        train(tiny_model, tokenizer, make_config(run, max_steps=3, resume_from="latest"), records[::-1])
    with pytest.raises(VllmTrainError, match=r"global_batch_size \(8 -> 4\)"):
        train(tiny_model, tokenizer, make_config(run, max_steps=3, batch_size=4, resume_from="latest"), records)
    # what a resume may change: length, cadence, where it writes
    other = copy_run(checkpointed, tmp_path / "other")
    train(tiny_model, tokenizer, make_config(other, max_steps=4, save_steps=2, logging_steps=2,
                                             save_total_limit=5, resume_from=str(run / "checkpoints" / "step-2")),
          records)
    assert [r["step"] for r in read_metrics(other / "metrics.jsonl") if "loss" in r] == [1, 2, 4]


def test_checkpoint_without_fingerprint_resumes_with_a_warning(tiny_model, tokenizer, records, checkpointed,
                                                               tmp_path, capsys):
    run = copy_run(checkpointed, tmp_path / "run")
    state = run / "checkpoints" / "step-2" / "trainer_state.json"
    meta = json.loads(state.read_text())
    del meta["fingerprint"]
    state.write_text(json.dumps(meta))
    train(tiny_model, tokenizer, make_config(run, max_steps=3, learning_rate=1e-3, resume_from="latest"), records)
    err = capsys.readouterr().err
    assert "warning:" in err and "no run fingerprint" in err and "step-2" in err


def test_training_start_removes_kill_time_leftovers(tiny_model, tokenizer, records, checkpointed, tmp_path):
    run = copy_run(checkpointed, tmp_path / "run")
    (run / "checkpoints" / ".step-3.tmp-abc12" / "adapter").mkdir(parents=True)
    (run / ".merged.tmp-xyz").mkdir()
    (run / "metrics.tmp").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    train(tiny_model, tokenizer, make_config(run, max_steps=3, resume_from="latest"), records)
    assert not (run / "checkpoints" / ".step-3.tmp-abc12").exists()
    assert not (run / ".merged.tmp-xyz").exists() and not (run / "metrics.tmp").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert clean_leftovers(tmp_path / "missing") is None  # no run dir yet: nothing to do


def test_resume_latest_refuses_a_non_empty_dir_without_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("my notes")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(VllmTrainError, match="holds no checkpoint"):
        check_output_dir(run, "latest", overwrite=False)
    assert (run / "README.md").read_text() == "my notes"
    check_output_dir(tmp_path / "fresh", "latest", overwrite=False)  # empty/missing: a fresh start is fine
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    check_output_dir(run, "latest", overwrite=False)  # a run to continue
    assert (run / "metrics.jsonl").exists()


def test_overwrite_clears_the_old_run_but_not_unknown_files(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoints/step-50/adapter", "tb"):
        (run / name).mkdir(parents=True)
    for name in ("resolved_config.json", "metrics.jsonl", "loss.png", "adapter_config.json",
                 "adapter_model.safetensors", "README.md", "tb/events.out", "mine.txt"):
        (run / name).write_text("x")
    check_output_dir(run, None, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
    # not a run (no resolved_config.json): --overwrite deletes nothing
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("project readme")
    check_output_dir(other, None, overwrite=True)
    assert (other / "README.md").read_text() == "project readme"
    # --overwrite with a resume keeps the run it resumes
    (run / "resolved_config.json").write_text("{}")
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    check_output_dir(run, "latest", overwrite=True)
    assert (run / "checkpoints" / "step-2").is_dir()


def test_cli_overwrite_old_checkpoints_cannot_shadow_the_new_run(tiny_model, tmp_path, capsys):
    from vllm_train.assets import data_file

    out = tmp_path / "run"
    (out / "checkpoints" / "step-50").mkdir(parents=True)
    (out / "checkpoints" / "step-50" / "trainer_state.json").write_text('{"step": 50}')
    (out / "resolved_config.json").write_text("{}")
    args = ["sft", "--model", tiny_model, "--data", str(data_file("sft_train.jsonl")), "--output-dir", str(out),
            "--max-steps", "1", "--batch-size", "4", "--rank", "2", "--target-modules", "q_proj",
            "--no-progress", "--max-length", "32"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "checkpoints" / "step-50").exists()
    assert (out / "adapter_model.safetensors").is_file()


def test_dead_engines_adapter_copies_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{SYNC_COPY_PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{SYNC_COPY_PREFIX}{os.getpid()}-def"
    unknown = tmp_path / f"{SYNC_COPY_PREFIX}xyz"  # an older copy without a pid: its owner is unknown
    for d in (stale, alive, unknown):
        (d / "adapter").mkdir(parents=True)
    assert remove_dead_sync_copies(tmp_path) == [stale]
    assert alive.is_dir() and unknown.is_dir() and not stale.exists()
