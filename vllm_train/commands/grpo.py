"""`vllm-train grpo`: critic-free RL (GRPO, Dr.GRPO, DAPO, RLOO) of a LoRA adapter with vLLM rollouts.

The shared RL plumbing (`add_rl_args`, `run_rl`) is also used by `vllm-train ppo`.
"""

from __future__ import annotations

import argparse
import dataclasses

from vllm_train.commands._common import add_config_args, add_output_args, check_output_dir, config_from_args

DESCRIPTION = """\
Reinforcement learning of a LoRA adapter from a reward function. Each step: the newest adapter goes to
vLLM, vLLM samples --group-size completions for each of --rollout-batch-size prompts, the reward
function scores them, group-relative advantages drive a clipped policy-gradient update.

  --algorithm grpo      advantages (r - mean) / std per prompt; loss averaged per sequence
  --algorithm dr_grpo   advantages r - mean; loss summed over tokens / (sequences x max_new_tokens)
  --algorithm dapo      token-level loss (pair with --clip-range-high 0.28 --dynamic-sampling true:
                        groups whose rewards are all equal are dropped, and up to
                        --dynamic-sampling-rounds more rollouts refill the batch)
  --algorithm rloo      leave-one-out baseline; token-level loss

Prompts (.jsonl/.json/.parquet): {"prompt": "text" or [chat messages], ...any fields your reward reads}.
Reward: a Python function `(prompt, completion, example) -> float` given as module:function or
path/to/file.py:function; `example` is the prompt's record. The toy world's: vllm_train.toy:correctness_reward.

Written to --output-dir: the adapter (PEFT format, servable by vLLM), resolved_config.json,
metrics.jsonl (reward, KL to reference, length, sync time, rollout tok/s, train/serve mismatch),
tb/, curves.png, checkpoints/step-N/ (resume with --resume-from latest).
"""

EXAMPLE = """\
example (toy world, a few minutes on a laptop CPU):
  vllm-train grpo --model vllm_train/assets/tiny-llama --prompts vllm_train/assets/data/rl_train.jsonl \\
      --eval-prompts vllm_train/assets/data/rl_eval.jsonl --reward vllm_train.toy:correctness_reward \\
      --output-dir runs/grpo --num-steps 40 --rank 8 --learning-rate 1e-2 --batch-size 128 \\
      --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --max-new-tokens 8
"""

# LoRATrainConfig fields RL does not use (it runs --num-steps rollout steps; seed/saving are RL fields).
_UNUSED_LORA_FIELDS = ("output_dir", "num_epochs", "max_steps", "gradient_accumulation_steps", "seed",
                       "logging_steps", "save_steps")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grpo", help="GRPO / Dr.GRPO / DAPO / RLOO with vLLM rollouts", description=DESCRIPTION,
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", required=True, metavar="MODULE:FUNCTION", help="reward function")
    add_rl_args(p, skip=())
    p.set_defaults(run=lambda args: run_rl(args, algorithm=None))


def add_rl_args(p: argparse.ArgumentParser, skip: tuple[str, ...]) -> None:
    from vllm_train.config import LoRATrainConfig, RLHFConfig

    p.add_argument("--model", required=True, metavar="PATH", help="local Hugging Face model directory")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompt records (.jsonl/.json/.parquet)")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts: greedy reward before/after "
                   "(and every --eval-steps)")
    p.add_argument("--num-steps", type=int, default=100, help="RL steps (default: 100)")
    p.add_argument("--adapter", metavar="DIR", help="start from this PEFT adapter (e.g. an SFT run)")
    add_output_args(p)
    add_config_args(p, RLHFConfig, skip=("lora_config", *skip), title="RL options (override --config)")
    group = p.add_argument_group("LoRA and optimizer options (override --config's lora_config)")
    for f in dataclasses.fields(LoRATrainConfig):
        if f.name in _UNUSED_LORA_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        from vllm_train.commands._common import FIELD_HELP

        help_text = FIELD_HELP.get(f.name, f.name) if f.name != "batch_size" else "sequences per micro-batch"
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"lora_{f.name}", default=None, metavar="V",
                           help=f"{help_text} (default: {shown})")


def rl_config_from_args(args: argparse.Namespace, algorithm: str | None):
    from vllm_train.config import RLHFConfig, load_config_file

    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    lora = dict(file_values.get("lora_config") or {})
    lora.update({k[5:]: v for k, v in vars(args).items() if k.startswith("lora_") and v is not None})
    lora["output_dir"] = args.output_dir
    return config_from_args(args, RLHFConfig, lora_config=lora, algorithm=algorithm)


def run_rl(args: argparse.Namespace, algorithm: str | None) -> int:
    from pathlib import Path

    from vllm_train.errors import VllmTrainError
    from vllm_train.rewards import load_reward_function
    from vllm_train.trainers.common import check_model_path
    from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records

    config = rl_config_from_args(args, algorithm)
    if algorithm is None and config.algorithm == "ppo":
        raise VllmTrainError("--algorithm ppo: use `vllm-train ppo` (it takes --reward-model too)")
    if args.num_steps < 1:
        raise VllmTrainError(f"--num-steps: {args.num_steps} is invalid (an integer >= 1)")
    check_model_path(args.model)
    check_output_dir(args.output_dir, config.lora_config.resume_from, args.overwrite)
    # Everything the user gave is checked before any model or engine loads.
    reward_fn = load_reward_function(args.reward) if getattr(args, "reward", None) else None
    reward_model = getattr(args, "reward_model", None)
    if reward_model and not Path(reward_model).is_dir():
        raise VllmTrainError(f"--reward-model: directory not found: {reward_model}")
    records = load_prompt_records(args.prompts, "prompts")
    eval_records = load_prompt_records(args.eval_prompts, "eval prompts") if args.eval_prompts else None

    trainer = RLHFTrainer(args.model, reward_model, config, reward_fn=reward_fn, adapter=args.adapter,
                          progress=not args.no_progress)
    try:
        before = trainer.evaluate(eval_records) if eval_records is not None else None
        final = trainer.train(records, args.num_steps)
        after = trainer.evaluate(eval_records) if eval_records is not None else None
    finally:
        trainer.close()
    out = args.output_dir
    print(f"{config.algorithm}: adapter written to {out} ({trainer.global_step} steps)")
    print(f"  last step: reward {final.get('reward_mean', float('nan')):.4f}, "
          f"length {final.get('response_len', float('nan')):.1f}, sync {final.get('sync_ms', 0):.1f} ms, "
          f"mismatch |dlogp| {final.get('mismatch_abs_logp', float('nan')):.2e}")
    if before is not None:
        print(f"  eval greedy reward: {before['reward']:.4f} -> {after['reward']:.4f}   "
              f"(share > 0: {before['accuracy']:.1%} -> {after['accuracy']:.1%})")
    print(f"  metrics: {out}/metrics.jsonl   curves: {out}/curves.png")
    return 0
