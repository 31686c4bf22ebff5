"""The shared SFT/DPO/RM loop (`trainers/loop.py`): a non-finite loss or gradient norm stops the run,
naming the step, before the optimizer step; no adapter is saved and the checkpoints stay intact. Weights
the step made non-finite stop it too, nothing non-finite is ever written, and divergence with finite
numbers is warned about, logged (``diverged``) and, if asked, stopped (`trainers/guards.py`).
(Epochs, accumulation, logging and resume are covered through the trainers in test_trainer.py,
test_dpo.py and test_reward_model.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vllm_train.assets import data_file
from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.trainers.common import Checkpointable
from vllm_train.trainers.sft import LoRATrainer

STOP_RE = re.compile(r"^error: step (\d+): (loss|grad_norm) is (nan|inf|-inf); stopping\. "
                     r"The last good checkpoint is kept: (\S+)$")


def test_exploding_sft_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_model, tmp_path):
    """learning rate 1e3: the loss blows up within a few steps. The run stops at the first non-finite
    step with exit status 2, writes no adapter, and the previous step's checkpoint is complete."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_train.cli", "sft", "--model", tiny_model, "--data",
         str(data_file("sft_train.jsonl")), "--output-dir", str(out), "--max-steps", "30", "--learning-rate", "1e3",
         "--warmup-ratio", "0", "--batch-size", "8", "--gradient-accumulation-steps", "1", "--save-steps", "1",
         "--logging-steps", "1", "--no-progress"], capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines and STOP_RE.match(lines[-1]), done.stderr[-2000:]
    step, _, _, kept = STOP_RE.match(lines[-1]).groups()
    step = int(step)
    assert 1 < step <= 30 and kept == str(out / "checkpoints" / f"step-{step - 1}")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "loss.png").exists()
    assert json.loads((out / "checkpoints" / f"step-{step - 1}" / "trainer_state.json").read_text())["step"] == step - 1
    adapter = load_file(str(out / "checkpoints" / f"step-{step - 1}" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step))  # the bad step is not logged


@pytest.mark.parametrize("poison", ["loss", "grad_norm"])
def test_non_finite_step_is_not_applied(tiny_model, tokenizer, tmp_path, monkeypatch, poison):
    """Step 3 goes bad (a NaN loss, or a NaN gradient): the error names it, and the live weights are
    still exactly step 2's checkpoint -- the bad step never reached the optimizer."""
    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.data.io import load_records

    data = CausalLMDataset(load_records(data_file("sft_train.jsonl"))[:64], tokenizer, 64)
    config = LoRATrainConfig(rank=4, alpha=8, learning_rate=1e-2, batch_size=8, gradient_accumulation_steps=1,
                             max_steps=6, save_steps=1, logging_steps=1, warmup_ratio=0.0, max_length=64,
                             output_dir=str(tmp_path / "run"))
    trainer = LoRATrainer(tiny_model, config, progress=False, tensorboard=False)
    original = LoRATrainer._accumulate
    calls = {"n": 0}

    def third_step_goes_bad(self, dataset, group):
        calls["n"] += 1
        loss_sum, n_tokens = original(self, dataset, group)
        if calls["n"] == 3:
            if poison == "loss":
                return float("nan"), n_tokens
            self.injector.get_trainable_params()[0].grad.fill_(float("nan"))
        return loss_sum, n_tokens

    monkeypatch.setattr(LoRATrainer, "_accumulate", third_step_goes_bad)
    with pytest.raises(VllmTrainError, match=rf"^step 3: {poison} is nan; stopping\. The last good checkpoint is "
                                             rf"kept: .*step-2$"):
        trainer.train(data)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"))
    live = trainer.injector.peft_state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert all(p.grad is None for p in trainer.injector.get_trainable_params())
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_trainable_states_are_checkpointable():
    from torch import nn

    from vllm_train.lora.injector import LoRAInjector
    from vllm_train.trainers.rm import RewardModelParams

    injector = LoRAInjector(LoRATrainConfig())
    assert isinstance(injector, Checkpointable)
    assert isinstance(RewardModelParams(injector, nn.Linear(4, 1, bias=False)), Checkpointable)
    assert not isinstance(object(), Checkpointable)


# ---- what a step writes, and divergence with finite numbers (trainers/guards.py) ---------------------------
def cli_lines(capsys) -> tuple[list[str], list[str]]:
    """(warning lines, error lines) the command printed on stderr."""
    err = capsys.readouterr().err.splitlines()
    return [s for s in err if s.startswith("warning:")], [s for s in err if s.startswith("error:")]


TRAINING = {"sft": "sft_train.jsonl", "dpo": "prefs_train.jsonl", "rm": "prefs_train.jsonl"}


def first_records(name: str, out, n: int = 64) -> str:
    """The first `n` records of a shipped data file (DPO's reference pass reads every pair)."""
    out.write_text("".join(data_file(name).read_text().splitlines(keepends=True)[:n]))
    return str(out)


@pytest.mark.parametrize("command", TRAINING)
def test_divergence_is_warned_once_logged_and_stopped_when_asked(tiny_model, tmp_path, capsys, command):
    """--learning-rate 1e4: the weights grow ten-thousandfold and the loss sticks far above its start.
    Every logged step says diverged 1; one warning line; --stop-on-divergence: exit status 2, no adapter."""
    from vllm_train.cli import main

    args = [command, "--model", tiny_model, "--data", first_records(TRAINING[command], tmp_path / "data.jsonl"),
            "--max-steps", "12",
            "--learning-rate", "1e4", "--batch-size", "8", "--gradient-accumulation-steps", "1", "--logging-steps",
            "4", "--rank", "2", "--no-progress", "--max-length", "64"]
    assert main([*args, "--output-dir", str(tmp_path / "warned")]) == 0
    warnings, errors = cli_lines(capsys)
    assert len(warnings) == 1 and "training is diverging" in warnings[0] and not errors, warnings + errors
    logged = [json.loads(line) for line in (tmp_path / "warned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["diverged"] for r in logged if "loss" in r] == [1, 1, 1]
    assert main([*args, "--output-dir", str(tmp_path / "stopped"), "--stop-on-divergence"]) == 2
    warnings, errors = cli_lines(capsys)
    assert not warnings and len(errors) == 1, warnings + errors
    assert re.match(r"error: step 4: training diverged: .*weights' norm grew .*\(--stop-on-divergence\)", errors[0])
    assert not (tmp_path / "stopped" / "adapter_model.safetensors").exists()


def test_a_healthy_run_is_not_called_divergent(tiny_model, tmp_path, capsys):
    """The demo's SFT recipe (lr 3e-3, all linear layers) for 40 steps: no warning, diverged 0 throughout."""
    from vllm_train.cli import main

    out = tmp_path / "run"
    assert main(["sft", "--model", tiny_model, "--data", str(data_file("sft_train.jsonl")), "--output-dir", str(out),
                 "--max-steps", "40", "--learning-rate", "3e-3", "--batch-size", "32", "--gradient-accumulation-steps",
                 "1", "--rank", "8", "--alpha", "16", "--target-modules", "all-linear", "--logging-steps", "5",
                 "--no-progress", "--max-length", "64", "--stop-on-divergence"]) == 0
    warnings, errors = cli_lines(capsys)
    assert not warnings and not errors
    assert {json.loads(line)["diverged"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {0}


def test_weights_the_last_step_made_non_finite_stop_the_run(tiny_model, tokenizer, tmp_path, monkeypatch, capsys):
    """The guard before the step cannot see what the step writes: an update that leaves a weight infinite
    (here: step 2's, forced) stops the run right after it, and no adapter is saved from those weights.
    rm's --head-learning-rate inf is refused as a value; 1e38 overflows AdamW's step size: one line too."""
    from vllm_train.cli import main
    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.data.io import load_records

    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def overflowing_second_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_second_step)
    config = LoRATrainConfig(rank=2, batch_size=8, gradient_accumulation_steps=1, max_steps=4, save_steps=1,
                             max_length=64, output_dir=str(tmp_path / "run"))
    trainer = LoRATrainer(tiny_model, config, progress=False, tensorboard=False)
    with pytest.raises(VllmTrainError, match=r"^step 2: after the update 1 weight value\(s\) are NaN or infinite.*"
                                             r"kept: .*step-1$"):
        trainer.train(CausalLMDataset(load_records(data_file("sft_train.jsonl"))[:32], tokenizer, 64))
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    args = ["rm", "--model", tiny_model, "--data", str(data_file("prefs_train.jsonl")), "--max-steps", "1",
            "--batch-size", "4", "--gradient-accumulation-steps", "1", "--rank", "2", "--no-progress",
            "--output-dir", str(tmp_path / "rm")]
    assert main([*args, "--head-learning-rate", "inf"]) == 2
    errors = cli_lines(capsys)[1]
    assert len(errors) == 1 and "head_learning_rate" in errors[0], errors
    assert main([*args, "--head-learning-rate", "1e38"]) == 2
    errors = cli_lines(capsys)[1]
    assert len(errors) == 1 and "step 1: the update overflows the weights' dtype" in errors[0], errors
    assert not (tmp_path / "rm").exists()


def test_non_finite_weights_are_never_written_and_the_previous_files_stay(tiny_model, tmp_path):
    """Adapter, checkpoint and PPO value head: a NaN fails the save with one line naming file and tensor;
    the files written before are byte for byte what they were, and no temp file is left."""
    from vllm_train.trainers import common
    from vllm_train.trainers.rl_policy import PolicyAndValueHead, zero_value_head

    trainer = LoRATrainer(tiny_model, LoRATrainConfig(rank=2, output_dir=str(tmp_path / "run")), progress=False)
    trainer.setup_training()
    saveable = PolicyAndValueHead(trainer.injector, zero_value_head(trainer.model))
    optimizer = common.make_optimizer(saveable.get_trainable_params(), trainer.config)
    scheduler = common.make_schedule(optimizer, 10, trainer.config)
    saveable.save(tmp_path / "adapter")
    common.save_checkpoint(tmp_path / "run", 1, saveable, optimizer, scheduler, {}, tiny_model, keep=2)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for poisoned in (trainer.injector.get_trainable_params()[0], saveable.value_head.weight):
        with torch.no_grad():
            original = poisoned[0, 0].item()
            poisoned[0, 0] = float("nan")
        with pytest.raises(VllmTrainError, match=r"\.safetensors: not written: tensor \S+ has 1 non-finite value"):
            saveable.save(tmp_path / "adapter")
        with pytest.raises(VllmTrainError, match="not written"):
            common.save_checkpoint(tmp_path / "run", 2, saveable, optimizer, scheduler, {}, tiny_model, keep=1)
        with torch.no_grad():
            poisoned[0, 0] = original
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
