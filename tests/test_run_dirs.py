"""Run directories never lose data or mix runs: resume fingerprints, --overwrite, kill-time leftovers."""

import json
import os
import subprocess
import sys

import pytest

from vllm_train.cli import main
from vllm_train.commands._output import check_output_dir
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


# ---- --overwrite: validate everything, then remove the earlier run's own files (its manifest) -----------
def sft_args(tiny_model, out, *extra):
    from vllm_train.assets import data_file

    return ["sft", "--model", tiny_model, "--data", str(data_file("sft_train.jsonl")), "--output-dir", str(out),
            "--batch-size", "4", "--rank", "2", "--target-modules", "q_proj", "--no-progress", "--max-length", "32",
            "--max-steps", "1", *extra]


@pytest.fixture(scope="module")
def cli_run(tiny_model, tmp_path_factory):
    """A 3-step run made by `vllm-train sft`, checkpoints at steps 1 and 2 (tests copy it)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(sft_args(tiny_model, run, "--max-steps", "3", "--save-steps", "1")) == 0
    return run


def snapshot(directory):
    """Every file below `directory` -> its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("data", ["malformed", "missing"])
def test_overwrite_checks_every_input_before_it_deletes(tiny_model, cli_run, tmp_path, capsys, data):
    run = copy_run(cli_run, tmp_path / "run")
    before = snapshot(run)
    bad = tmp_path / "bad.jsonl"
    if data == "malformed":
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    args = sft_args(tiny_model, run, "--overwrite")
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    assert str(bad) in one_error_line(capsys)
    assert snapshot(run) == before  # the earlier run is whole


def test_overwrite_removes_the_runs_files_and_keeps_the_users(tiny_model, cli_run, tmp_path, capsys):
    run = copy_run(cli_run, tmp_path / "run")
    (run / "config.json").write_text('{"mine": true}')
    (run / "adapter").mkdir()
    (run / "adapter" / "my_notes.txt").write_text("notes")
    (run / "checkpoints" / "step-2" / "trainer_state.json").read_text()  # the old run has checkpoints
    assert main(sft_args(tiny_model, run, "--overwrite")) == 0
    assert (run / "config.json").read_text() == '{"mine": true}'
    assert (run / "adapter" / "my_notes.txt").read_text() == "notes"
    assert not (run / "checkpoints").exists()  # they would shadow the new run on --resume-from latest
    assert json.loads((run / "resolved_config.json").read_text())["max_steps"] == 1
    assert (run / "adapter_model.safetensors").is_file()


def test_overwrite_refuses_to_delete_what_the_user_changed_or_wrote(tiny_model, cli_run, tmp_path, capsys):
    run = copy_run(cli_run, tmp_path / "run")
    (run / "README.md").write_text("my own notes about this run")
    before = snapshot(run)
    assert main(sft_args(tiny_model, run, "--overwrite")) == 2
    assert "README.md was changed after vllm-train wrote it" in one_error_line(capsys)
    assert snapshot(run) == before
    # a file of the user's where the new run writes (a crashed run never wrote its README.md)
    (run / "run_manifest.json").write_text(json.dumps({"version": 1, "paths": {"resolved_config.json": {}}}))
    assert main(sft_args(tiny_model, run, "--overwrite")) == 2
    assert "was not written by the earlier run" in one_error_line(capsys)
    assert (run / "README.md").read_text() == "my own notes about this run"


def test_overwrite_never_writes_into_a_directory_that_is_not_a_run(tiny_model, tmp_path, capsys):
    other = tmp_path / "project"
    other.mkdir()
    (other / "README.md").write_text("project readme")
    (other / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    before = snapshot(other)
    assert main(sft_args(tiny_model, other, "--overwrite")) == 2
    assert "holds no vllm-train run" in one_error_line(capsys)
    assert main(sft_args(tiny_model, other)) == 2
    assert "holds no vllm-train run" in one_error_line(capsys)
    assert snapshot(other) == before
    (other / "resolved_config.json").write_text("{}")  # a run of a version without manifests
    assert main(sft_args(tiny_model, other, "--overwrite")) == 2
    assert "older vllm-train" in one_error_line(capsys)
    assert snapshot(other) == {**before, "resolved_config.json": b"{}"}


def test_overwrite_never_deletes_an_input_of_the_same_command(tiny_model, cli_run, tmp_path, capsys):
    run = copy_run(cli_run, tmp_path / "run")
    before = snapshot(run)
    assert main(sft_args(tiny_model, run, "--overwrite", "--adapter", str(run))) == 2
    assert f"--adapter {run} is in --output-dir" in one_error_line(capsys)
    data = run / "train.jsonl"
    data.write_text('{"text": "1 + 1 = 2"}\n')
    args = sft_args(tiny_model, run, "--overwrite")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    assert "--data" in one_error_line(capsys)
    assert snapshot(run) == {**before, "train.jsonl": data.read_bytes()}


def test_reward_model_overwrite_keeps_the_users_adapter_notes(tiny_model, tmp_path, capsys):
    """rm writes adapter/ files and a model directory beside them: --overwrite replaces those and keeps a
    note of the user's in adapter/; the saved reward model is a model directory `--model` accepts."""
    from vllm_train.assets import data_file
    from vllm_train.models import resolve_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(data_file("prefs_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    run = tmp_path / "rm"
    args = ["rm", "--model", tiny_model, "--data", str(data), "--output-dir", str(run), "--max-steps", "1",
            "--batch-size", "4", "--rank", "2", "--target-modules", "q_proj", "--no-progress"]
    assert main(args) == 0
    resolve_model(str(run))
    (run / "adapter" / "my_notes.txt").write_text("notes")
    old_weights = (run / "model.safetensors").read_bytes()
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert (run / "adapter" / "my_notes.txt").read_text() == "notes"
    assert (run / "model.safetensors").read_bytes() != old_weights
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_and_overwrite_keep_what_they_resume(cli_run, tmp_path):
    run = copy_run(cli_run, tmp_path / "run")
    check_output_dir(run, "latest", overwrite=True).prepare()  # --overwrite with a resume keeps its run
    assert (run / "checkpoints" / "step-2").is_dir()


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
