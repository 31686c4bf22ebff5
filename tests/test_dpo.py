"""DPO: losses against hand-worked values and the seed's formula; the reference is exactly the base
(or the starting adapter); DPO on the shipped pairs raises held-out reward accuracy and keeps the toy
skill (measured with the real vLLM engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vllm_train.assets import data_file
from vllm_train.losses.dpo import DPOLoss, dpo_sigmoid_loss, hinge_loss, ipo_loss, preference_loss

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Hand-worked pair: policy log-probs chosen -1, rejected -3; reference -2 and -2.
# h = (-1 - -2) - (-3 - -2) = 2. With beta = 0.5: beta*h = 1.
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_sigmoid_dpo_hand_worked():
    loss, m = dpo_sigmoid_loss(*PAIR, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)  # 0.3132617
    assert m["rewards/chosen"] == pytest.approx(0.5) and m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/margin"] == pytest.approx(1.0) and m["rewards/accuracy"] == 1.0
    # conservative DPO, eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    loss, _ = dpo_sigmoid_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228, abs=1e-12)


def test_ipo_hand_worked():
    loss, _ = ipo_loss(*PAIR, beta=0.5)  # (h - 1/(2*0.5))^2 = (2 - 1)^2
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    loss, _ = ipo_loss(*PAIR, beta=0.25)  # (2 - 2)^2
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_hinge_hand_worked():
    assert hinge_loss(*PAIR, beta=0.5)[0].item() == pytest.approx(0.0)  # max(0, 1 - 1)
    assert hinge_loss(*PAIR, beta=0.25)[0].item() == pytest.approx(0.5)  # max(0, 1 - 0.5)
    swapped = (PAIR[1], PAIR[0], PAIR[3], PAIR[2])  # h = -2
    loss, m = hinge_loss(*swapped, beta=0.25)
    assert loss.item() == pytest.approx(1.5) and m["rewards/accuracy"] == 0.0


def test_dpo_loss_module_equals_seed_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g) * 5 - 20 for _ in range(4))
    for beta in (0.05, 0.1, 1.0):
        seed = -F.logsigmoid(beta * (pc - rc) - beta * (pr - rr)).mean()  # the seed plan's DPOLoss.forward
        ours = DPOLoss(beta)(pc, pr, rc, rr)
        assert torch.allclose(ours, seed, atol=1e-6)
    assert DPOLoss(0.1, loss_type="ipo")(pc, pr, rc, rr).item() == pytest.approx(
        preference_loss("ipo", pc, pr, rc, rr, 0.1)[0].item())
    # gradients flow to the policy inputs only
    pc.requires_grad_(True)
    DPOLoss(0.1)(pc, pr, rc, rr).backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


def test_config_validation_names_the_field():
    from vllm_train.errors import VllmTrainError
    from vllm_train.trainers.dpo import DPOConfig

    with pytest.raises(VllmTrainError, match="'beta'"):
        DPOConfig(beta=0)
    with pytest.raises(VllmTrainError, match="'label_smoothing'"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(VllmTrainError, match="'loss_type'"):
        DPOConfig(loss_type="kto")


def _randomize(injector, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in injector.lora_layers.values():
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=g) * 0.3)


def test_adapter_disabled_logps_equal_base_model(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.data.preference import PreferenceDataset
    from vllm_train.models import load_policy, pair_logps

    data = PreferenceDataset(data_file("prefs_eval.jsonl"), tokenizer, 64)
    data.examples = data.examples[:24]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base_c, base_r = pair_logps(base, data, tokenizer.pad_token_id, 8)
    model, _, injector = load_policy(tiny_model, LoRATrainConfig(target_modules=ALL_LINEAR))
    _randomize(injector)
    with injector.disable_adapter():
        off_c, off_r = pair_logps(model, data, tokenizer.pad_token_id, 8)
    on_c, _ = pair_logps(model, data, tokenizer.pad_token_id, 8)
    assert torch.equal(off_c, base_c) and torch.equal(off_r, base_r)  # exactly the base
    assert (on_c - base_c).abs().max() > 1e-2  # and the adapter really does something


def test_starting_adapter_is_the_reference(tiny_model, tokenizer, tmp_path):
    """With --adapter, the reference log-probs are the starting adapter's, not the base's."""
    from vllm_train.config import LoRATrainConfig
    from vllm_train.data.preference import PreferenceDataset
    from vllm_train.models import load_policy, pair_logps
    from vllm_train.trainers.dpo import DPOConfig, DPOTrainer

    data = PreferenceDataset(data_file("prefs_eval.jsonl"), tokenizer, 64)
    data.examples = data.examples[:16]
    model, _, injector = load_policy(tiny_model, LoRATrainConfig(rank=4, target_modules=ALL_LINEAR))
    _randomize(injector, seed=3)
    injector.save(tmp_path / "sft", tiny_model)
    start_c, start_r = pair_logps(model, data, tokenizer.pad_token_id, 8)
    with injector.disable_adapter():
        base_c, _ = pair_logps(model, data, tokenizer.pad_token_id, 8)

    trainer = DPOTrainer(tiny_model, DPOConfig(rank=4, target_modules=ALL_LINEAR, output_dir=str(tmp_path / "dpo")),
                         adapter=str(tmp_path / "sft"), progress=False, tensorboard=False)
    trainer.setup_training()
    ref_c, ref_r = trainer.reference_logps(data)
    assert torch.allclose(ref_c, start_c, atol=1e-6) and torch.allclose(ref_r, start_r, atol=1e-6)
    assert (ref_c - base_c).abs().max() > 1e-2
    ev = trainer.evaluate(data)  # at step 0 the policy is its reference: no margin yet
    assert ev["reward_margin"] == pytest.approx(0.0, abs=1e-6)

    from vllm_train.errors import VllmTrainError

    with pytest.raises(VllmTrainError, match="precompute_ref_logps"):
        DPOTrainer(tiny_model, DPOConfig(precompute_ref_logps=False), adapter=str(tmp_path / "sft"))


def test_live_reference_matches_precomputed(tiny_model, tokenizer, tmp_path):
    """precompute_ref_logps on/off give the same first steps (same reference, same updates)."""
    from vllm_train.data.preference import PreferenceDataset
    from vllm_train.trainers.dpo import DPOConfig, DPOTrainer

    data = PreferenceDataset(data_file("prefs_train.jsonl"), tokenizer, 64)
    data.examples = data.examples[:32]
    losses = []
    for pre in (True, False):
        cfg = DPOConfig(rank=4, target_modules=["q_proj", "v_proj"], learning_rate=1e-2, batch_size=8,
                        gradient_accumulation_steps=2, max_steps=2, logging_steps=1, warmup_ratio=0.0,
                        precompute_ref_logps=pre, output_dir=str(tmp_path / f"run{pre}"))
        trainer = DPOTrainer(tiny_model, cfg, progress=False, tensorboard=False)
        last = trainer.train(data)
        losses.append(last["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_dpo_cli_writes_a_servable_run(tiny_model, tmp_path, engine):
    """`vllm-train dpo` end to end (2 steps): PEFT adapter vLLM loads, resolved config, metrics, curve."""
    from vllm_train.cli import main

    out = tmp_path / "run"
    rc = main(["dpo", "--model", tiny_model, "--data", str(data_file("prefs_eval.jsonl")), "--output-dir", str(out),
               "--max-steps", "2", "--batch-size", "8", "--beta", "0.5", "--loss", "ipo", "--no-progress",
               "--logging-steps", "1"])
    assert rc == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "resolved_config.json", "metrics.jsonl",
                 "loss.png"):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["beta"] == 0.5 and resolved["loss_type"] == "ipo" and resolved["kind"] == "dpo"
    assert "rewards/accuracy" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    adapter = engine.load_adapter(out, family="dpo-cli")
    assert engine.generate([[{"role": "user", "content": "What is 47 + 38?"}]], adapter, max_tokens=4)[0][0].text


def test_dpo_raises_reward_accuracy_and_keeps_toy_skill(tiny_model, tmp_path, engine):
    """The acceptance test: held-out reward accuracy >= 0.9 after DPO; toy accuracy not lower."""
    from vllm_train.evaluation import preference_eval, toy_accuracy
    from vllm_train.trainers.dpo import DPOConfig, DPOTrainer

    cfg = DPOConfig(rank=16, alpha=32, target_modules=ALL_LINEAR, learning_rate=3e-3, batch_size=32,
                    gradient_accumulation_steps=1, max_steps=DPO_STEPS, warmup_ratio=0.1, lr_scheduler="cosine",
                    beta=0.5, rpo_alpha=1.0, logging_steps=50, max_length=64, seed=0, output_dir=str(tmp_path / "dpo"))
    trainer = DPOTrainer(tiny_model, cfg, progress=False, tensorboard=False)
    trainer.setup_training()
    eval_set = trainer._as_dataset(data_file("prefs_eval.jsonl"))
    before = trainer.evaluate(eval_set)
    trainer.train(data_file("prefs_train.jsonl"))
    after = trainer.evaluate(eval_set)
    print(f"held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
          f"logp accuracy {before['logp_accuracy']:.3f} -> {after['logp_accuracy']:.3f}")
    assert before["reward_accuracy"] == 0.0  # the policy starts as its reference: no pair is preferred yet
    # Measured (seed 0, 5,700 pairs, 600 steps): 0.957 with RPO (+ NLL of the chosen answers), toy
    # accuracy 0.497 -> 0.86. Plain DPO reached 0.967 but pushed the chosen answers down too and lowered
    # greedy toy accuracy to 0.437 (below). With the first 2,000 pairs, rank 8, 190 steps: 0.87.
    assert after["reward_accuracy"] >= DPO_MIN_REWARD_ACCURACY
    assert after["logp_accuracy"] > before["logp_accuracy"]

    # the same numbers through `vllm-train eval`'s function, from the saved adapter
    saved = preference_eval(tiny_model, str(tmp_path / "dpo"), str(data_file("prefs_eval.jsonl")), max_length=64,
                            batch_size=64, beta=0.5)
    assert saved["preference/adapter"]["reward_accuracy"] == pytest.approx(after["reward_accuracy"], abs=1e-6)

    toy_before = toy_accuracy(engine, data_file("rl_eval.jsonl"))["accuracy"]
    toy_after = toy_accuracy(engine, data_file("rl_eval.jsonl"), engine.load_adapter(tmp_path / "dpo"))["accuracy"]
    print(f"toy accuracy {toy_before:.3f} -> {toy_after:.3f}")
    assert toy_after >= toy_before


DPO_STEPS = 600
DPO_MIN_REWARD_ACCURACY = 0.9
