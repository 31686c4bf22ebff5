"""RLHFTrainer against the real vLLM engine (the session's `engine` fixture) on the toy world.

Oracles: vLLM's own log-probs vs the trainer's (new weights), held-out greedy accuracy from vLLM, the
shipped checkable reward. Budgets are CI-sized (2 CPU cores); assertions are on measured gains.
"""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
from tolerances import (
    FP32_REORDER_TOL,
    IS_GRAD_REL_TOL,
    MISMATCH_TOL,
    SCORER_REL_TOL,
    assert_served_logprobs,
    reference_logprobs,
)

from vllm_train.cli import main as cli_main
from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig, RLHFConfig
from vllm_train.data.tokenize import completion_ids
from vllm_train.data.tokenize import prompt_ids as encode_prompt
from vllm_train.errors import VllmTrainError
from vllm_train.evaluation import completion_logprobs, toy_accuracy
from vllm_train.rewards import TOY_REWARD, load_reward_function, score_with_function
from vllm_train.toy import correctness_reward
from vllm_train.trainers.rl import RLHFTrainer, Rollout, load_prompt_records
from vllm_train.trainers.rl_policy import CompletionBatch


def _config(tmp_path, algorithm="grpo", lr=2e-3, **kw) -> RLHFConfig:
    lora = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), learning_rate=lr,
                           batch_size=128, warmup_ratio=0.0, lr_scheduler="constant", output_dir=str(tmp_path))
    defaults = dict(rollout_batch_size=16, group_size=8, max_new_tokens=8, seed=0)
    return RLHFConfig(lora_config=lora, algorithm=algorithm, **{**defaults, **kw})


@pytest.fixture
def rl_trainer(tiny_model, engine):
    """Makes RLHFTrainers on the session engine and closes them after the test, which removes their
    adapters from the engine (so no pinned slot outlives its test)."""
    made = []

    def make(config: RLHFConfig, reward_fn=TOY_REWARD, **kwargs) -> RLHFTrainer:
        made.append(RLHFTrainer(tiny_model, config=config, reward_fn=reward_fn, engine=engine, progress=False,
                                **kwargs))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


# ---- rewards -------------------------------------------------------------------------------------
def nan_reward(prompt, completion, example):
    return float("nan")


def text_reward(prompt, completion, example):
    return "1.0"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    ("vllm_train.toy:no_such_function", "has no attribute 'no_such_function'"),
    ("vllm_train.toy", "expected 'module:function'"),
    ("missing_file.py:f", "file not found"),
])
def test_bad_reward_spec_fails_clearly(spec, message):
    with pytest.raises(VllmTrainError, match=message):
        load_reward_function(spec)


def test_reward_returning_nan_or_text_fails_clearly():
    with pytest.raises(VllmTrainError, match=r"nan_reward returned nan .* rewards must be finite"):
        score_with_function(nan_reward, ["p"], ["42"], [{}])
    with pytest.raises(VllmTrainError, match="returned '1.0' \\(str\\), expected a float"):
        score_with_function(text_reward, ["p"], ["42"], [{}])
    toy = load_reward_function(TOY_REWARD)
    assert score_with_function(toy, ["p", "p"], ["85", "75"], [{"answer": 85}] * 2) == [1.0, 0.0]


def test_cli_bad_reward_exits_2(tmp_path, tiny_model, shipped, capsys):
    common = ["--model", tiny_model, "--prompts", str(shipped("rl_train.jsonl")), "--output-dir", str(tmp_path)]
    assert cli_main(["grpo", *common, "--reward", "no_such_module_xyz:f"]) == 2
    assert "module 'no_such_module_xyz' not found" in capsys.readouterr().err
    assert cli_main(["ppo", *common, "--reward", "vllm_train.toy:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert cli_main(["grpo", *common, "--reward", TOY_REWARD, "--group-size", "1"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_trainer_reward_nan_stops_the_step(tmp_path, tiny_model, engine, shipped, rl_trainer):
    trainer = rl_trainer(_config(tmp_path, rollout_batch_size=2, group_size=2), reward_fn=nan_reward)
    with pytest.raises(VllmTrainError, match="rewards must be finite"):
        trainer.ppo_step(load_prompt_records(shipped("rl_train.jsonl"))[:2], seed=0)


# ---- live adapter: vLLM serves exactly the trainer's new weights ----------------------------------
def test_vllm_logprobs_equal_trainer_after_update(tmp_path, tiny_model, engine, shipped, rl_trainer):
    trainer = rl_trainer(_config(tmp_path, rollout_batch_size=4, group_size=4, lr=2e-2))
    records = load_prompt_records(shipped("rl_train.jsonl"))
    prompt_ids = encode_prompt(trainer.tokenizer, records[0]["prompt"])
    completion = completion_ids(trainer.tokenizer, records[0]["prompt"], "123")  # a fixed, wrong answer + EOS
    before = completion_logprobs(trainer.model, prompt_ids, completion)
    stale = reference_logprobs(trainer.model, prompt_ids, completion)
    for step in range(2):
        stats = trainer.ppo_step(records[4 * step:4 * step + 4], seed=step)
        # on-policy rollouts: vLLM's sampled-token log-probs match the trainer's pre-update ones (a mean
        # over the rollout's tokens; its k3 KL is ~mean(Δ²)/2, below the same bound)
        assert stats["mismatch_abs_logp"] < MISMATCH_TOL and abs(stats["mismatch_kl"]) < MISMATCH_TOL
    adapter, _ = trainer.sync_adapter()
    ours = completion_logprobs(trainer.model, prompt_ids, completion)
    theirs = engine.completion_logprobs(prompt_ids, completion, adapter)
    assert (ours - before).abs().max().item() > 1e-3  # the update changed the policy ...
    # ... and vLLM serves the new weights, not the first version's
    assert_served_logprobs(theirs, reference_logprobs(trainer.model, prompt_ids, completion), alternative=stale)
    assert adapter.id in engine.llm.llm_engine.list_loras()
    trainer.close()  # on a borrowed engine: the trainer's adapter goes, the engine stays
    assert adapter.id not in engine.llm.llm_engine.list_loras()
    assert engine.generate(["1 + 1 ="], max_tokens=2)[0][0].token_ids


@pytest.mark.parametrize("targets", [list(ALL_LINEAR_MODULES), ["q_proj", "lm_head"]])
def test_trainer_logprobs_equal_a_plain_hf_forward(tmp_path, tiny_model, shipped, targets):
    """The trainer's completion log-probs (chunked over the frozen head; through the module when the head
    has a LoRA) equal a plain HF forward's, at temperature 1 and 0.7, for completions of unequal length."""
    records = load_prompt_records(shipped("rl_train.jsonl"))[:3]
    for temperature in (1.0, 0.7):
        config = _config(tmp_path, temperature=temperature)
        config.lora_config.target_modules = targets
        config.lora_config.precision = "fp32"  # an exactness test: fp32 on CUDA too
        trainer = RLHFTrainer(tiny_model, config=config, reward_fn=TOY_REWARD, progress=False)
        with torch.no_grad():  # a non-zero adapter, so the LoRA path is exercised too
            for p in trainer.injector.get_trainable_params():
                p.normal_(0, 0.05)
        texts = ["123", "7", "45 + 1"]
        prompts = [encode_prompt(trainer.tokenizer, r["prompt"]) for r in records]
        comps = [completion_ids(trainer.tokenizer, r["prompt"], t) for r, t in zip(records, texts)]
        rollout = Rollout(prompts=[r["prompt"] for r in records], examples=records, prompt_ids=prompts,
                          completion_ids=comps, completions=texts, vllm_logps=[[] for _ in comps], sync_ms=0.0,
                          seconds=0.0)
        with torch.no_grad():
            logps_BT, _ = trainer.policy.forward(CompletionBatch.of(rollout, [0, 1, 2]), torch.arange(3))
        for i, (p_ids, c_ids) in enumerate(zip(prompts, comps)):
            ids = torch.tensor([p_ids + c_ids], device=trainer.policy.device)
            logits = trainer.model(input_ids=ids).logits[0, len(p_ids) - 1:-1].cpu()
            expected = torch.log_softmax(logits.float() / temperature, -1)
            expected = expected.gather(-1, torch.tensor(c_ids)[:, None])[:, 0]
            torch.testing.assert_close(logps_BT[i, :len(c_ids)], expected.detach(), rtol=0, atol=FP32_REORDER_TOL)
            assert (logps_BT[i, len(c_ids):] == 0).all()  # padding


def _lora_weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.injector.get_trainable_params()]


@pytest.mark.parametrize("reference", ["initial", "base"])
def test_kl_reference_is_the_starting_adapter_or_the_base(tmp_path, shipped, rl_trainer, reference):
    """Started from an adapter, the KL reference is that adapter ('initial': the first step's KL to it is 0,
    and the swap leaves the trained weights in place) or the base model ('base': KL > 0 from the start)."""
    start = rl_trainer(_config(tmp_path / "start"))
    with torch.no_grad():
        for p in start.injector.get_trainable_params():
            p.normal_(0, 0.05)
    start.save_checkpoint(tmp_path / "start-adapter")
    config = _config(tmp_path / "run", "grpo", lr=2e-2, kl_reference=reference, log_ref_kl=True)
    trainer = rl_trainer(config, adapter=str(tmp_path / "start-adapter"))
    initial = _lora_weights(trainer)
    records = load_prompt_records(shipped("rl_train.jsonl"))
    first = trainer.ppo_step(records[:4], seed=0)
    second = trainer.ppo_step(records[4:8], seed=1)
    if reference == "initial":
        assert abs(first["kl_ref"]) < 1e-7  # the policy before its first update is the reference
        assert second["kl_ref"] > 1e-5  # ... and moves away from it
    else:
        assert first["kl_ref"] > 1e-3
    trained = _lora_weights(trainer)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(trained, initial))  # the update was not undone
    if trainer.policy.reference_weights is not None:  # the reference copy was not trained
        assert all(torch.equal(a, b) for a, b in zip(trainer.policy.reference_weights, initial))


def test_ppo_whitened_rewards_make_the_update_invariant_to_the_reward_scale(tmp_path, shipped, rl_trainer):
    """With whiten_rewards, a reward model's arbitrary scale and offset do not change PPO's update:
    rewards r and 100 r + 1000 give the same adapter after a step; without it they do not."""
    records = load_prompt_records(shipped("rl_train.jsonl"))[:8]
    scaled_reward = lambda p, c, e: 100.0 * correctness_reward(p, c, e) + 1000.0  # noqa: E731
    gaps = {}
    for whiten in (True, False):
        adapters = []
        for reward in (correctness_reward, scaled_reward):
            config = _config(tmp_path / f"{whiten}-{len(adapters)}", "ppo", lr=1e-2, group_size=4,
                             kl_coef=0.05, whiten_rewards=whiten)
            trainer = rl_trainer(config, reward_fn=reward)
            trainer.ppo_step(records, seed=3)
            adapters.append(_lora_weights(trainer))
        gaps[whiten] = max((a - b).abs().max().item() for a, b in zip(*adapters))
    # Whitened: float32 rounding of 100 r + 1000 only (Adam's first step, about lr * sign(g), lifts it on
    # near-zero gradients: 7e-5 measured). Unwhitened: steps in other directions, about 2 * lr.
    assert gaps[True] < 1e-3 < gaps[False]


# ---- learning on the toy world -------------------------------------------------------------------
def test_grpo_raises_heldout_accuracy(tmp_path, tiny_model, engine, shipped, rl_trainer):
    """On-policy GRPO gains >= 15 points of held-out accuracy in 20 steps; with max_staleness=1 (each
    rollout sampled during the previous update, one update old) it does too, and over three seeds its mean
    accuracy is within 3 points of the on-policy runs' (measured on CPU: on-policy 0.723 / 0.737 / 0.713,
    stale 0.667 / 0.703 / 0.727, a mean gap of 2.6 points; one seed alone varies by +-5)."""
    eval_file = shipped("rl_eval.jsonl")
    accuracy: dict[int, list[float]] = {0: [], 1: []}
    for seed, staleness in itertools.product((0, 1, 2), (0, 1)):
        run_dir = tmp_path / f"seed-{seed}-staleness-{staleness}"
        trainer = rl_trainer(_config(run_dir, "grpo", save_steps=10, max_staleness=staleness, seed=seed))
        before = toy_accuracy(engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
        t0 = time.perf_counter()
        last = trainer.train(shipped("rl_train.jsonl"), num_steps=20)
        seconds = time.perf_counter() - t0
        after = toy_accuracy(engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
        accuracy[staleness].append(after)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(f"\nGRPO (seed {seed}, max_staleness {staleness}) held-out accuracy {before:.3f} -> {after:.3f} in "
              f"20 steps, {seconds:.0f}s; sync {sum(r['sync_ms'] for r in records) / len(records):.1f} ms/step; "
              f"mismatch |dlogp| {max(r['mismatch_abs_logp'] for r in records):.1e}")
        assert after - before >= 0.15
        assert [r["staleness"] for r in records] == [0] + [staleness] * 19
        for key in ("sync_ms", "rollout_tok_per_s", "mismatch_abs_logp", "mismatch_kl", "reward_mean",
                    "response_len", "accuracy", "loss"):
            assert key in last
        assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "curves.png").is_file()
        assert (run_dir / "checkpoints" / "step-10" / "trainer_state.json").is_file()
        assert json.loads((run_dir / "resolved_config.json").read_text())["algorithm"] == "grpo"
    assert abs(sum(accuracy[1]) - sum(accuracy[0])) / 3 <= 0.03


def test_ppo_raises_mean_reward(tmp_path, tiny_model, engine, shipped, rl_trainer):
    config = _config(tmp_path, "ppo", lr=1e-3, group_size=4, kl_coef=0.01, ppo_epochs=2, num_minibatches=2)
    trainer = rl_trainer(config)
    eval_records = load_prompt_records(shipped("rl_eval.jsonl"))[:100]
    before = trainer.evaluate(eval_records)["reward"]
    trainer.train(shipped("rl_train.jsonl"), num_steps=15)
    after = trainer.evaluate(eval_records)["reward"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["reward_mean"] for r in records[:3]) / 3
    late = sum(r["reward_mean"] for r in records[-3:]) / 3
    print(f"\nPPO greedy eval reward {before:.3f} -> {after:.3f}; rollout reward {early:.3f} -> {late:.3f}")
    assert after > before + 0.05
    assert all("value_loss" in r and "kl_ref" in r for r in records)
    assert (tmp_path / "value_head.safetensors").is_file()


def test_resume_continues_the_same_run(tmp_path, tiny_model, engine, shipped, rl_trainer):
    def run(steps, resume=None, **kw):
        config = _config(tmp_path, "rloo", rollout_batch_size=2, group_size=4, save_steps=1, **kw)
        config.lora_config.resume_from = resume
        trainer = rl_trainer(config)
        trainer.train(shipped("rl_train.jsonl"), num_steps=steps)
        return trainer

    full = run(3)
    a_full = {k: v.clone() for k, v in full.injector.peft_state_dict().items()}
    resumed = run(3, resume=str(tmp_path / "checkpoints" / "step-1"))
    assert resumed.global_step == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    for k, v in resumed.injector.peft_state_dict().items():
        torch.testing.assert_close(v, a_full[k], atol=1e-5, rtol=0)
    # a checkpoint of another run (here: another clip range) is refused before anything is written
    with pytest.raises(VllmTrainError, match=r"clip_range \(0.2 -> 0.3\)"):
        run(3, resume=str(tmp_path / "checkpoints" / "step-2"), clip_range=0.3)


def test_truncated_is_weighs_vllms_on_policy_samples_one(tmp_path, shipped, rl_trainer):
    """vLLM's sampled-token log-probs equal the trainer's (on-policy), so truncated importance weights are 1
    and a DAPO step's gradient equals the unweighted one; dynamic sampling keeps exactly the groups whose
    rewards differ. (test_rl_loop.py checks that off-policy weights scale the gradient.)"""
    records = load_prompt_records(shipped("rl_train.jsonl"))[:4]
    lengthy = lambda p, c, e: len(c) + correctness_reward(p, c, e)  # noqa: E731  (groups with equal rewards are rare)
    grad_norms = []
    for cap in (None, 2.0):
        config = _config(tmp_path / f"cap-{cap}", "dapo", rollout_batch_size=4, group_size=4, clip_range_high=0.28,
                         dynamic_sampling=True, tis_cap=cap, kl_coef=0.01)
        trainer = rl_trainer(config, reward_fn=lengthy)
        rollout = trainer.generate_rollouts(records, seed=0)  # the samples the step will draw (same seed)
        rewards_GN = trainer.compute_rewards(rollout.prompts, rollout.completions, rollout.examples).view(-1, 4)
        stats = trainer.ppo_step(records, seed=0)
        assert stats["groups_kept"] == int((rewards_GN.max(1).values > rewards_GN.min(1).values).sum()) > 0
        assert stats["mismatch_abs_logp"] < MISMATCH_TOL and stats["kl_ref"] >= 0 and "clipfrac" in stats
        grad_norms.append(stats["grad_norm"])
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=IS_GRAD_REL_TOL)


def test_dapo_refills_the_batch_with_informative_groups(tmp_path, shipped, rl_trainer):
    """Dynamic sampling drops groups with equal rewards and samples more prompts until the batch is full."""
    records = load_prompt_records(shipped("rl_train.jsonl"))[:8]
    flat = [{**r, "flat": True} for r in records[:4]]  # every completion scores 0: no signal
    varied = [{**r, "flat": False} for r in records[4:]]  # every completion scores differently
    counter = itertools.count()

    def reward(prompt, completion, example):
        return 0.0 if example["flat"] else float(next(counter))

    config = _config(tmp_path, "dapo", rollout_batch_size=4, group_size=4, dynamic_sampling=True)
    trainer = rl_trainer(config, reward_fn=reward)
    asked = []

    def more_records(k):
        asked.append(k)
        return varied[:k]

    stats = trainer.ppo_step(flat[:2] + varied[:2], seed=0, more_records=more_records)
    assert asked == [4]  # 2 groups missing / 1 in 2 informative so far
    assert stats["refill_rounds"] == 1 and stats["groups_kept"] == 4 and "skipped" not in stats
    stats = trainer.ppo_step(flat, seed=1, more_records=lambda k: flat[:k])  # never informative
    assert stats["refill_rounds"] == config.dynamic_sampling_rounds and stats["skipped"] == 1


def test_reward_model_scores_equal_hf_forward(tmp_path, tiny_model):
    """PPO's --reward-model path: batched, right-padded in-process scoring = one unpadded HF forward each."""
    from transformers import AutoModelForSequenceClassification

    from vllm_train.data.tokenize import prompt_ids
    from vllm_train.models import load_tokenizer
    from vllm_train.rewards.model import RewardModelScorer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(tmp_path)
    tok = load_tokenizer(tiny_model)
    tok.save_pretrained(tmp_path)
    scorer = RewardModelScorer(tmp_path, batch_size=3)
    prompts = [[{"role": "user", "content": f"What is {a} + 38?"}] for a in (4, 47, 90, 12)]
    completions = ["42", "85", "128 is the answer", "5"]
    got = scorer(prompts, completions, [{}] * 4)
    for p, c, g in zip(prompts, completions, got):
        ids = torch.tensor([prompt_ids(tok, p) + completion_ids(tok, p, c)])
        with torch.no_grad():
            want = rm(input_ids=ids).logits[0, 0].item()
        assert abs(g - want) < SCORER_REL_TOL * max(1.0, abs(want))
    with pytest.raises(VllmTrainError, match="ForSequenceClassification"):
        RewardModelScorer(tiny_model)
