"""RL command plumbing shared by `vllm-train grpo` and `vllm-train ppo`: their arguments, config and run."""

from __future__ import annotations

import argparse

from vllm_train.commands._common import (
    ADAPTER_HELP,
    add_config_args,
    add_model_args,
    config_from_args,
    config_values,
    resolve_model_args,
)
from vllm_train.commands._data import add_data_args, data_sources
from vllm_train.commands._output import add_output_args, check_output_dir, command_inputs

# LoRATrainConfig fields RL does not use (it runs --num-steps rollout steps; seed/saving are RL fields).
RL_UNUSED_LORA_FIELDS = tuple(f"lora_config.{name}" for name in (
    "num_epochs", "max_steps", "gradient_accumulation_steps", "seed", "logging_steps", "save_steps", "eval_steps"))


def add_rl_args(p: argparse.ArgumentParser, skip: tuple[str, ...]) -> None:
    from vllm_train.config import RLHFConfig

    add_model_args(p)
    add_data_args(p, "prompt records", "held-out prompts: greedy reward before/after (and every --eval-steps)",
                  "--prompts", "--eval-prompts")
    p.add_argument("--num-steps", "--max-steps", type=int, default=100, help="RL steps (default: 100)")
    p.add_argument("--adapter", metavar="DIR", help="start from this PEFT adapter (e.g. an SFT run)" + ADAPTER_HELP)
    add_output_args(p)
    add_config_args(p, RLHFConfig, skip=RL_UNUSED_LORA_FIELDS + skip)


def rl_config_from_args(args: argparse.Namespace, algorithm: str | None):
    """RLHFConfig from --config and the flags; `algorithm` fixed by the command (None: --algorithm)."""
    from vllm_train.config import RLHFConfig
    from vllm_train.errors import VllmTrainError

    values = config_values(args, RLHFConfig)
    lora = values.get("lora_config")
    if isinstance(lora, dict) and "max_length" in lora:  # lora_config not a mapping: RLHFConfig names it
        # RLHFTrainer does not truncate yet: a max_length would be silently ignored, so it is refused.
        raise VllmTrainError("--max-length (lora_config.max_length) is not supported by RL yet: completions are "
                             "capped by --max-new-tokens and prompts are used whole")
    return config_from_args(args, RLHFConfig, {"lora_config.output_dir": args.output_dir, "algorithm": algorithm},
                            values=values)


def run_rl(args: argparse.Namespace, algorithm: str | None) -> int:
    from pathlib import Path

    from vllm_train.agents.tool_calls import get_parser
    from vllm_train.errors import VllmTrainError
    from vllm_train.models import check_prompt_lengths
    from vllm_train.rewards import load_reward_function
    from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records
    from vllm_train.trainers.rl_sampling import check_environment, load_agent_environment

    config = rl_config_from_args(args, algorithm)
    config.check_episode_fields(config.environment is not None)  # the CLI's one source of an environment
    if algorithm is None and config.algorithm == "ppo":
        raise VllmTrainError("--algorithm ppo: use `vllm-train ppo` (it takes --reward-model too)")
    if args.num_steps < 1:
        raise VllmTrainError(f"--num-steps: {args.num_steps} is invalid (an integer >= 1)")
    prompts, eval_prompts = data_sources(args, "prompts", "eval_prompts")
    model_dir = resolve_model_args(args)  # --model, --adapter and --reward-model: local directories or hub ids
    output = check_output_dir(args.output_dir, config.lora_config.resume_from, args.overwrite, "adapter",
                              command_inputs(args, model_dir))
    # Everything the user gave is checked before any model or engine loads.
    reward_fn = load_reward_function(args.reward) if getattr(args, "reward", None) else None
    reward_model = getattr(args, "reward_model", None)
    environment = load_agent_environment(config.environment, reward_model, reward_fn)  # None: single-turn
    if config.tool_parser is not None:
        get_parser(config.tool_parser)
    if reward_model and not Path(reward_model).is_dir():
        raise VllmTrainError(f"--reward-model: directory not found: {reward_model}")
    if config.rollout_servers:
        from vllm_train.engine.publish import AdapterPublisher

        AdapterPublisher(config.rollout_servers).states("start the servers before training with --rollout-servers")
    records = load_prompt_records(prompts, "prompts", reward_fn)  # with the fields the reward reads
    eval_records = load_prompt_records(eval_prompts, "eval prompts", reward_fn) if eval_prompts else None
    if environment is not None:
        check_environment(environment, records[0], config.tool_timeout)
    for path, recs in ((prompts, records), (eval_prompts, eval_records or [])):
        check_prompt_lengths(model_dir, [r["prompt"] for r in recs], "record", str(path), config.max_new_tokens)

    trainer = RLHFTrainer(args.model, reward_model, config, reward_fn=reward_fn, adapter=args.adapter,
                          progress=not args.no_progress, revision=args.revision,
                          environment_factory=environment.cls if environment is not None else None)
    try:
        output.prepare()  # every input read and checked: only now may --overwrite clear the earlier run
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
