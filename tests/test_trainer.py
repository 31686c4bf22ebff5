"""SFT training loop: learning, PEFT-format output, gradient accumulation, resume."""

import json

import pytest
import torch

from vllm_train.config import LoRATrainConfig
from vllm_train.data.causal_lm import CausalLMDataset
from vllm_train.metrics import read_metrics
from vllm_train.trainers.sft import LoRATrainer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_config(out, **kw):
    base = dict(rank=8, alpha=16, target_modules=ALL_LINEAR, learning_rate=3e-3, batch_size=16,
                gradient_accumulation_steps=1, warmup_ratio=0.0, logging_steps=1, max_length=64,
                output_dir=str(out), seed=0)
    base.update(kw)
    return LoRATrainConfig(**base)


@pytest.fixture(scope="module")
def sft_data(tokenizer):
    from vllm_train.assets import data_file
    from vllm_train.data.io import load_records

    return CausalLMDataset(load_records(data_file("sft_train.jsonl"))[:256], tokenizer, 64)


def test_loss_decreases_and_outputs_are_written(tiny_model, sft_data, tmp_path):
    trainer = LoRATrainer(tiny_model, make_config(tmp_path / "run", max_steps=40), progress=False)
    trainer.train(sft_data)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "resolved_config.json",
                 "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "resolved_config.json").read_text())["rank"] == 8
    assert any((run / "tb").iterdir())


def test_saved_adapter_loads_in_peft_with_the_trainers_logits(tiny_model, sft_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = LoRATrainer(tiny_model, make_config(tmp_path / "run", max_steps=5), progress=False)
    trainer.train(sft_data)
    ids = sft_data[0]["input_ids"][None]
    with torch.no_grad():
        ours = trainer.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "run")
        theirs = peft_model.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_gradient_accumulation_is_token_weighted(tiny_model, sft_data, tmp_path):
    """The accumulated gradient over 16 examples is the same whether they come as one micro-batch or
    four of different token counts: normalised by the group's token count, not a mean of means."""
    trainer = LoRATrainer(tiny_model, make_config(tmp_path / "ga"), progress=False)
    trainer.setup_training()
    params = trainer.injector.get_trainable_params()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # B != 0 so every LoRA weight gets a gradient

    def grads(groups):
        for p in params:
            p.grad = None
        loss_sum, n_tokens = trainer._accumulate(sft_data, groups)
        return torch.cat([p.grad.flatten() for p in params]), loss_sum, n_tokens

    g1, l1, n1 = grads([list(range(16))])
    g4, l4, n4 = grads([[0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    assert n1 == n4 and l1 == pytest.approx(l4, rel=1e-6)
    assert torch.allclose(g1, g4, atol=1e-6, rtol=1e-4), (g1 - g4).abs().max()


def test_resume_after_interruption_reproduces_the_loss_curve(tiny_model, sft_data, tmp_path, monkeypatch):
    def run_dir(name):
        return make_config(tmp_path / name, max_steps=12, save_steps=4, batch_size=8, gradient_accumulation_steps=2)

    LoRATrainer(tiny_model, run_dir("full"), progress=False, tensorboard=False).train(sft_data)
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]

    calls = {"n": 0}
    original = LoRATrainer._accumulate

    def crash_in_step_seven(self, dataset, group):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # like Ctrl-C after the step-4 checkpoint
        return original(self, dataset, group)

    monkeypatch.setattr(LoRATrainer, "_accumulate", crash_in_step_seven)
    with pytest.raises(KeyboardInterrupt):
        LoRATrainer(tiny_model, run_dir("cut"), progress=False, tensorboard=False).train(sft_data)
    monkeypatch.setattr(LoRATrainer, "_accumulate", original)
    assert (tmp_path / "cut" / "checkpoints" / "step-4").is_dir()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()

    resumed_cfg = run_dir("cut")
    resumed_cfg.resume_from = "latest"
    LoRATrainer(tiny_model, resumed_cfg, progress=False, tensorboard=False).train(sft_data)
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert [s for s, _ in resumed] == [s for s, _ in full] == list(range(1, 13))
    for (_, a), (_, b) in zip(full, resumed):
        assert a == pytest.approx(b, rel=1e-5)


def test_eval_steps_evaluates_every_n_steps_and_at_the_end(tiny_model, sft_data, tokenizer, tmp_path):
    """--eval-steps 3 over 7 steps: eval_* at steps 3, 6 and 7 (the end); the last equals a fresh evaluation
    of the final weights."""
    from vllm_train.assets import data_file

    eval_set = CausalLMDataset(data_file("sft_eval.jsonl"), tokenizer, 64)
    trainer = LoRATrainer(tiny_model, make_config(tmp_path / "run", max_steps=7, eval_steps=3, logging_steps=1),
                          progress=False)
    final = trainer.train(sft_data, eval_set)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]
    assert final["eval_loss"] == pytest.approx(trainer.evaluate(eval_set)["loss"], rel=1e-6)
