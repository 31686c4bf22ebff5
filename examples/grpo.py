"""GRPO on the toy world: teach the shipped tiny model to carry in two-digit addition.

    .venv/bin/python examples/grpo.py [--steps 40] [--algorithm grpo|dr_grpo|dapo|rloo]

Each step the trainer's newest LoRA adapter goes to vLLM, vLLM samples 8 answers for each of 16
problems, the checkable reward (1 for the right sum) scores them, and group-relative advantages update
the adapter. Prints held-out greedy accuracy before -> after; the run is in runs/example-grpo/.
"""

import argparse
import time

from vllm_train import LoRATrainConfig, RLHFConfig, RLHFTrainer
from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.config import ALL_LINEAR_MODULES
from vllm_train.evaluation import toy_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--algorithm", default="grpo", choices=["grpo", "dr_grpo", "dapo", "rloo"])
    parser.add_argument("--output-dir", default="runs/example-grpo")
    args = parser.parse_args()

    lora = LoRATrainConfig(rank=8, alpha=16, target_modules=list(ALL_LINEAR_MODULES), learning_rate=2e-3,
                           batch_size=128, warmup_ratio=0.0, lr_scheduler="constant", output_dir=args.output_dir)
    dapo = args.algorithm == "dapo"
    config = RLHFConfig(lora_config=lora, algorithm=args.algorithm, rollout_batch_size=16, group_size=8,
                        max_new_tokens=8, temperature=1.0, clip_range_high=0.28 if dapo else None,
                        dynamic_sampling=dapo, eval_steps=10, seed=0)
    trainer = RLHFTrainer(str(TINY_MODEL), config=config, reward_fn="vllm_train.toy:correctness_reward")
    eval_file = data_file("rl_eval.jsonl")
    before = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
    t0 = time.perf_counter()
    last = trainer.train(data_file("rl_train.jsonl"), num_steps=args.steps, eval_dataset=eval_file)
    seconds = time.perf_counter() - t0
    after = toy_accuracy(trainer.engine, eval_file, trainer.sync_adapter()[0])["accuracy"]
    print(f"\n{args.algorithm}: held-out accuracy {before:.1%} -> {after:.1%} ({args.steps} steps, {seconds:.0f} s)")
    print(f"  last step: sync {last['sync_ms']:.2f} ms, rollout {last['rollout_tok_per_s']:.0f} tok/s, "
          f"train/serve mismatch |dlogp| {last['mismatch_abs_logp']:.1e}, KL {last['mismatch_kl']:.1e}")
    print(f"  adapter + metrics.jsonl + curves.png in {args.output_dir}")
    trainer.close()


if __name__ == "__main__":  # vLLM spawns workers: keep the guard
    main()
