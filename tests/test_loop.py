"""The shared SFT/DPO/RM loop (`trainers/loop.py`): a non-finite loss or gradient norm stops the run,
naming the step, before the optimizer step; no adapter is saved and the checkpoints stay intact.
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
