"""The three stages of RLHF on the toy world: SFT -> reward model -> PPO with vLLM rollouts.

    .venv/bin/python examples/rlhf_ppo.py [--ppo-steps 30] [--output-dir runs/example-rlhf]

1. SFT: a LoRA adapter on the shipped chat data (`LoRATrainer`).
2. Reward model: Bradley-Terry on the shipped preference pairs (`RewardModelTrainer`), saved as a
   sequence-classification checkpoint.
3. PPO from the SFT adapter (`RLHFTrainer`): vLLM samples with the newest adapter every step, the reward
   model scores in-process (next to the one vLLM engine), a value head on the policy gives GAE
   advantages, KL to the base model is penalised per token.
Prints held-out greedy accuracy after each stage.

Known problem (open): on the toy world the PPO stage reward-hacks the learned reward model. The policy
drifts to completions the RM scores well outside its training data, and held-out accuracy falls
(measured: SFT 81.7% -> PPO 1.3%, RM pair accuracy 83%). The example shows the three stages working
together, not a gain. PPO with the checkable reward (`--reward vllm_train.toy:correctness_reward` on the
CLI) does raise reward.
"""

import argparse
import time
from pathlib import Path

from vllm_train import LoRATrainConfig, LoRATrainer, RLHFConfig, RLHFTrainer
from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.config import ALL_LINEAR_MODULES

LORA = dict(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES))


def sft(out: Path, steps: int) -> Path:
    config = LoRATrainConfig(**LORA, learning_rate=3e-3, batch_size=32, gradient_accumulation_steps=1,
                             max_steps=steps, warmup_ratio=0.05, max_length=64, output_dir=str(out))
    trainer = LoRATrainer(str(TINY_MODEL), config)
    trainer.setup_training()
    trainer.train(data_file("sft_train.jsonl"))
    return out


def reward_model(out: Path, steps: int) -> Path:
    from vllm_train.trainers.rm import RewardModelConfig, RewardModelTrainer

    config = RewardModelConfig(**LORA, learning_rate=1e-3, head_learning_rate=1e-2, batch_size=64,
                               gradient_accumulation_steps=1, max_steps=steps, warmup_ratio=0.1, max_length=64,
                               base_preference_coef=1.0, output_dir=str(out))
    trainer = RewardModelTrainer(str(TINY_MODEL), config)
    trainer.setup_training()
    final = trainer.train(data_file("prefs_train.jsonl"), data_file("prefs_eval.jsonl"))
    print(f"      reward model: pair accuracy on held-out preferences {final.get('eval_accuracy', float('nan')):.1%}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/example-rlhf")
    parser.add_argument("--sft-steps", type=int, default=60, help="kept short so RL has room to improve")
    parser.add_argument("--rm-steps", type=int, default=800)
    parser.add_argument("--ppo-steps", type=int, default=30)
    args = parser.parse_args()
    root = Path(args.output_dir)
    t0 = time.perf_counter()

    print("[1/3] SFT ...", flush=True)
    sft_dir = sft(root / "sft", args.sft_steps)
    print("[2/3] reward model ...", flush=True)
    rm_dir = reward_model(root / "rm", args.rm_steps)

    print("[3/3] PPO from the SFT adapter ...", flush=True)
    lora = LoRATrainConfig(**LORA, learning_rate=2e-3, batch_size=128, warmup_ratio=0.0, lr_scheduler="constant",
                           output_dir=str(root / "ppo"))
    config = RLHFConfig(lora_config=lora, algorithm="ppo", rollout_batch_size=16, group_size=4, max_new_tokens=8,
                        kl_coef=0.02, ppo_epochs=2, num_minibatches=2, seed=0)
    trainer = RLHFTrainer(str(TINY_MODEL), str(rm_dir), config, adapter=str(sft_dir))
    # Accuracy is always judged by the checkable answer, whatever reward trained the policy.
    from vllm_train.evaluation import toy_accuracy

    eval_file = data_file("rl_eval.jsonl")
    base = toy_accuracy(trainer.engine, eval_file)["accuracy"]
    after_sft = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
    last = trainer.train(data_file("rl_train.jsonl"), num_steps=args.ppo_steps)
    after_ppo = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
    print(f"\nheld-out accuracy: base {base:.1%} -> SFT {after_sft:.1%} -> PPO {after_ppo:.1%} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"  PPO last step: reward {last['reward_mean']:.3f}, KL to base {last.get('kl_ref', float('nan')):.4f}, "
          f"sync {last['sync_ms']:.2f} ms, mismatch |dlogp| {last['mismatch_abs_logp']:.1e}")
    print(f"  runs in {root}/ (sft, rm, ppo: adapters, metrics.jsonl, curves)")
    trainer.close()


if __name__ == "__main__":  # vLLM spawns workers: keep the guard
    main()
