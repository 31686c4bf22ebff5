"""The RL loop's bookkeeping on a fake engine (seconds, no vLLM): importance weights, the overlapped
rollout of ``max_staleness=1``, what each step trains on. The fake samples from the trainer's own HF
model and reports its log-probs (tests/fakes.py); test_rl.py runs the loop against real vLLM."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fakes import FakeEngine

from vllm_train.config import LoRATrainConfig, RLHFConfig
from vllm_train.errors import VllmTrainError
from vllm_train.losses.ppo import truncated_importance_weights
from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records
from vllm_train.trainers.rl_rollouts import Rollout


def spread_reward(prompt, completion, example) -> float:
    return len(set(completion)) + 0.01 * len(completion)  # differs between a group's (hot-sampled) completions


def make_trainer(tiny_model, tmp_path, **kw) -> tuple[RLHFTrainer, FakeEngine]:
    lora = LoRATrainConfig(rank=4, alpha=8, learning_rate=1e-2, batch_size=64, warmup_ratio=0.0,
                           lr_scheduler="constant", output_dir=str(tmp_path))
    # temperature 3: the trained toy model's samples differ within a group, so advantages are not all zero
    config = RLHFConfig(lora_config=lora, rollout_batch_size=4, group_size=4, max_new_tokens=6, temperature=3.0,
                        seed=0, **kw)
    engine = FakeEngine()
    trainer = RLHFTrainer(tiny_model, config=config, reward_fn=spread_reward, engine=engine, progress=False,
                          tensorboard=False)
    with torch.no_grad():  # a non-zero adapter: LoRA A and B both get gradients
        for p in trainer.injector.get_trainable_params():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    trainer._version += 1
    return trainer, engine.attach(trainer)


def test_importance_weights_are_truncated_ratios():
    old_BT = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.3]]))
    sampler_BT = torch.log(torch.tensor([[0.25, 0.5, 0.4], [0.2, 0.3, 0.3]], dtype=torch.float64))
    mask_BT = torch.tensor([[True, True, True], [True, True, False]])
    weights = truncated_importance_weights(old_BT, sampler_BT, mask_BT, cap=1.5)
    expected = torch.tensor([[1.5, 1.0, 0.25], [1.0, 1.5, 0.0]])  # 0.5/0.25 = 2 and 0.9/0.3 = 3 capped
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    assert truncated_importance_weights(old_BT, sampler_BT, mask_BT, cap=None) is None


@pytest.mark.parametrize("shift, cap, ratio", [(0.0, 2.0, 1.0), (-1.0, 2.0, 2.0), (-1.0, None, 1.0)])
def test_truncated_importance_weights_scale_the_gradient(tiny_model, tmp_path, shipped, shift, cap, ratio):
    """Samples whose sampler log-probs are 1 nat below the trainer's get weight min(e, 2) = 2 each, so
    the step's gradient doubles; on-policy samples (weight 1) and an unset cap leave it unchanged."""
    records = load_prompt_records(shipped("rl_train.jsonl"))[:4]
    plain, _ = make_trainer(tiny_model, tmp_path / "plain")
    rollout = plain.generate_rollouts(records, seed=0)
    reference = plain.ppo_step(records, rollout=rollout)["grad_norm"]
    weighted, _ = make_trainer(tiny_model, tmp_path / "weighted", tis_cap=cap)
    shifted = Rollout(**{**rollout.__dict__, "vllm_logps": [[lp + shift for lp in lps] for lps in rollout.vllm_logps]})
    stats = weighted.ppo_step(records, rollout=shifted)
    assert stats["grad_norm"] == pytest.approx(ratio * reference, rel=1e-4)
    assert stats["mismatch_abs_logp"] == pytest.approx(abs(shift), abs=1e-5)


def test_max_staleness_one_samples_the_next_rollout_during_the_update(tiny_model, tmp_path, shipped):
    trainer, engine = make_trainer(tiny_model, tmp_path, max_staleness=1)
    assert trainer.config.importance_cap == 2.0  # the lag is corrected by default
    trainer.train(shipped("rl_train.jsonl"), num_steps=4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]  # step n+1 sampled from the weights before step n's update
    assert rows[0]["mismatch_kl"] < 1e-9 < min(r["mismatch_kl"] for r in rows[1:])  # behaviour vs current policy
    generates = [e for e in engine.events if e[0] == "generate"]
    assert generates[0][1] == "MainThread" and all(e[1].startswith("vllm-train-rollout") for e in generates[1:])
    assert len(generates) == 4  # one rollout per step, none thrown away
    # each rollout was sampled from the version synced just before it started (the fake asserts that no
    # sync ran during a generation); the versions served were 2, 3, 4 after the first
    assert [e[2] for e in generates] == [1, 1, 2, 3]
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_on_policy_loop_syncs_the_newest_weights_before_every_rollout(tiny_model, tmp_path, shipped):
    trainer, engine = make_trainer(tiny_model, tmp_path)
    trainer.train(shipped("rl_train.jsonl"), num_steps=3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["staleness"] for r in rows] == [0, 0, 0]
    assert max(r["mismatch_abs_logp"] for r in rows) < 1e-4  # the fake served exactly the trainer's weights
    assert [e[0] for e in engine.events] == ["sync", "generate"] * 3
    assert all(e[1] == "MainThread" for e in engine.events)


def test_staleness_with_dynamic_sampling_is_refused():
    with pytest.raises(VllmTrainError, match="max_staleness"):
        RLHFConfig(max_staleness=1, dynamic_sampling=True)
    with pytest.raises(VllmTrainError, match="max_staleness"):
        RLHFConfig(max_staleness=2)
    assert math.isclose(RLHFConfig(max_staleness=1, tis_cap=3.0).importance_cap, 3.0)


def test_non_finite_loss_stops_the_step_before_the_optimizer(tiny_model, tmp_path, shipped):
    """A NaN in the policy stops the step with its number, before the optimizer spreads it; a reward model
    that scores NaN stops the step too (reward functions are checked in test_rl.py)."""
    trainer, _ = make_trainer(tiny_model, tmp_path)
    records = load_prompt_records(shipped("rl_train.jsonl"))[:4]
    rollout = trainer.generate_rollouts(records, seed=0)
    params = trainer.injector.get_trainable_params()
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    others = [p.detach().clone() for p in params[1:]]
    with pytest.raises(VllmTrainError, match=r"step 1: (loss|grad_norm) is nan; stopping\. No checkpoint"):
        trainer.ppo_step(records, rollout=rollout)
    assert all(torch.equal(a, p) for a, p in zip(others, params[1:]))  # no optimizer step was taken

    class NanScorer:
        name = "nan-rm"

        def __call__(self, prompts, completions, examples):
            return [0.5] * (len(prompts) - 1) + [float("nan")]

    trainer.reward_model = NanScorer()
    with pytest.raises(VllmTrainError, match="reward model nan-rm scored nan .* scores must be finite"):
        trainer.compute_rewards(["p", "q"], ["1", "2"])


def length_reward(prompt, completion, example) -> float:
    return float(len(completion))


def test_resume_with_another_reward_is_refused(tiny_model, tmp_path, shipped):
    """The reward is part of the run: a checkpoint resumed with another reward function is refused by name."""
    trainer, _ = make_trainer(tiny_model, tmp_path, save_steps=1)
    trainer.train(shipped("rl_train.jsonl"), num_steps=2)  # checkpoints/step-1
    trainer.close()
    trainer, _ = make_trainer(tiny_model, tmp_path, save_steps=1)
    trainer.config.lora_config.resume_from = "latest"
    trainer.reward_fn = length_reward
    with pytest.raises(VllmTrainError, match="reward .*spread_reward.* -> .*length_reward"):
        trainer.train(shipped("rl_train.jsonl"), num_steps=3)
