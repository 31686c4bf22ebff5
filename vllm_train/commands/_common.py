"""Argument plumbing shared by the training commands: config file + flags -> a validated config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from vllm_train.config import LoRATrainConfig, config_from_dict, load_config_file
from vllm_train.errors import VllmTrainError

FIELD_HELP = {
    "rank": "LoRA rank r (any r >= 1; vLLM serves it with max_lora_rank rounded up to 1/8/16/32/...)",
    "alpha": "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora)",
    "target_modules": "comma-separated module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj "
                      "(add gate_proj,up_proj,down_proj for all linear layers)",
    "dropout": "LoRA dropout on the layer input, 0 <= p < 1",
    "use_rslora": "rank-stabilised scaling alpha/sqrt(r)",
    "learning_rate": "peak learning rate (AdamW)",
    "batch_size": "examples per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "num_epochs": "passes over the data (ignored when --max-steps is set)",
    "warmup_ratio": "share of steps with linear warmup",
    "max_grad_norm": "gradient clipping norm",
    "weight_decay": "AdamW weight decay on LoRA weights",
    "lr_scheduler": "cosine | linear | constant (after warmup)",
    "max_length": "truncate examples to this many tokens",
    "max_steps": "stop after this many optimizer steps (-1: run all epochs)",
    "seed": "random seed (data order, LoRA init, sampling)",
    "precision": "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16",
    "logging_steps": "log metrics every N optimizer steps",
    "save_steps": "checkpoint every N steps (0: at the end of each epoch)",
    "save_total_limit": "checkpoints to keep",
    "resume_from": "checkpoint dir to resume from, or 'latest' (newest under the output dir)",
    "output_dir": "where the adapter, metrics, plots and checkpoints go",
    # reward models (RewardModelConfig)
    "base_preference_coef": "weight of a training-only loss that also asks the reward's last-token state to "
                            "predict the base LM's own chosen-vs-rejected log-prob preference (0: off)",
    # RL (RLHFConfig)
    "algorithm": "grpo | dr_grpo | dapo | rloo | ppo",
    "rollout_batch_size": "prompts per RL step",
    "group_size": "completions sampled per prompt (>= 2 for the group-relative algorithms)",
    "max_new_tokens": "longest completion vLLM samples",
    "temperature": "sampling temperature of the rollouts (the loss uses the same)",
    "top_p": "nucleus sampling of the rollouts (1: off)",
    "rollout_servers": "URL[,URL...] of running vLLM OpenAI servers (`vllm-train serve`, any machine) to sample "
                       "the rollouts and the evaluation from, instead of a vLLM engine in this process; API key: "
                       "$VLLM_TRAIN_API_KEY",
    "ppo_epochs": "passes over each rollout batch",
    "num_minibatches": "optimizer steps per pass over a rollout batch",
    "clip_range": "policy ratio clip (lower side; both sides unless --clip-range-high is set)",
    "clip_range_high": "upper ratio clip (DAPO's clip-higher uses 0.28)",
    "value_clip_range": "PPO value clip",
    "kl_coef": "penalty on the KL to the reference policy (see --kl-reference)",
    "kl_reference": "the KL's reference: 'initial' = the policy the run starts from (--adapter, e.g. your SFT "
                    "run; the base model without one), 'base' = the base model (adapter disabled)",
    "whiten_rewards": "PPO: scores to zero mean, unit variance over the batch before the KL penalty (a reward "
                      "model's scale is arbitrary)",
    "log_ref_kl": "log the KL to the reference every step even when --kl-coef is 0 (one no-grad forward)",
    "gamma": "PPO: GAE discount",
    "gae_lambda": "PPO: GAE lambda",
    "value_loss_coef": "PPO: weight of the value loss",
    "whiten_advantages": "PPO: advantages to zero mean and unit variance over the batch",
    "dynamic_sampling": "drop groups whose rewards are all equal (no signal), then refill the batch (DAPO)",
    "dynamic_sampling_rounds": "with --dynamic-sampling: at most this many extra rollouts to refill the batch",
    "tis_cap": "truncated importance sampling: weight tokens by min(p_trainer / p_vllm, cap) (>= 1)",
    "max_staleness": "1: sample the next step's rollout while this step updates (it lags one update; "
                     "corrected by importance weights, --tis-cap 2 if unset); 0: on-policy, one after the other",
    "eval_steps": "greedy eval on --eval-prompts every N steps (0: before and after only)",
}


def add_config_args(parser: argparse.ArgumentParser, config_cls=LoRATrainConfig, skip=("output_dir",),
                    title: str = "training options (override --config)") -> None:
    """--config FILE plus one --kebab-case flag per config field (default: unset, so the file wins)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of config fields; flags override it")
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or dataclasses.is_dataclass(f.type) or f.name.endswith("_config"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None, metavar="V",
                           help=f"{FIELD_HELP.get(f.name, f.name)} (default: {shown})")


def config_from_args(args: argparse.Namespace, config_cls=LoRATrainConfig, **fixed: Any):
    """defaults < --config file < flags < `fixed` (e.g. output_dir from --output-dir)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]] = value
    values.update({k: v for k, v in fixed.items() if v is not None})
    return config_from_dict(config_cls, values, source=args.config or "flags")


def check_output_dir(path: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless resuming or told to overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VllmTrainError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not resume_from and not overwrite:
        raise VllmTrainError(f"--output-dir {path} is not empty (pass --overwrite, or --resume-from latest "
                             f"to continue that run)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="directory for the adapter and run files")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
