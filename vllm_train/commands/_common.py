"""Argument plumbing shared by the training commands: config file + flags -> a validated config.

One mechanism maps flags onto config fields. The flags are generated from the config dataclass: field
``learning_rate`` -> ``--learning-rate``, and the fields of a nested config (``RLHFConfig.lora_config``)
the same way, without a prefix. `FLAG_NAMES` renames the few flags whose name differs from their field,
`FIELD_HELP` explains each field. Values are merged as defaults < the ``--config`` file (read once) <
flags < what the command fixes (e.g. ``output_dir`` from ``--output-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any, get_type_hints

from vllm_train import distributed
from vllm_train.config import LoRATrainConfig, config_from_dict, load_config_file
from vllm_train.errors import VllmTrainError

DEST_PREFIX = "config."  # argparse dest of a config flag: "config." + the field's dotted path

FLAG_NAMES = {"loss_type": "loss"}  # field -> flag name, where they differ

# Help per field. "<Context>.<field>" keys win over plain field names: the context is the config class
# that declares the field, or the name of the nested config it is reached through (e.g. lora_config).
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
    "tensor_parallel_size": "under torchrun: shard the model's attention and MLP linears (and the LoRA) over "
                            "groups of K ranks, each group also one vLLM engine; data parallel across groups",
    "logging_steps": "log metrics every N optimizer steps",
    "save_steps": "checkpoint every N steps (0: at the end of each epoch)",
    "save_total_limit": "checkpoints to keep",
    "resume_from": "checkpoint dir to resume from, or 'latest' (newest under the output dir)",
    # DPO (DPOConfig)
    "beta": "how strongly to stay near the reference; larger = sharper preference",
    "loss_type": "preference loss: sigmoid (DPO) | ipo | hinge",
    "label_smoothing": "assumed share of flipped labels, 0 <= e < 0.5 (conservative DPO; sigmoid only)",
    "precompute_ref_logps": "reference log-probs once before training (true) or every step (false; base "
                            "reference only)",
    "rpo_alpha": "add V x the per-token NLL of the chosen answers (RPO): keeps their likelihood from falling "
                 "while the margin grows (0 = plain preference loss)",
    # reward models (RewardModelConfig)
    "head_learning_rate": "learning rate of the scalar head, which starts near zero (default: 10 x --learning-rate)",
    "base_preference_coef": "weight of a training-only loss that also asks the reward's last-token state to "
                            "predict the base LM's own chosen-vs-rejected log-prob preference (0: off)",
    # RL (RLHFConfig, and the LoRATrainConfig it holds as lora_config)
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
    "eval_steps": "evaluate on --eval-data every N optimizer steps (0: at the end of each epoch)",
    "RLHFConfig.eval_steps": "greedy eval on --eval-prompts every N steps (0: before and after only)",
    "RLHFConfig.save_steps": "checkpoint every N RL steps (0: only the final adapter)",
    "RLHFConfig.seed": "random seed (prompt order, LoRA init, sampling)",
    "lora_config.batch_size": "sequences per micro-batch",
    "lora_config.max_length": "rejected: RL does not truncate yet (completions are capped by --max-new-tokens, "
                              "prompts are used whole; default: not applied)",
}

# The flag groups of `--help`, by the config class that declares the fields (or the nested config's name).
GROUP_TITLES = {"DPOConfig": "DPO options", "RewardModelConfig": "reward-model options", "RLHFConfig": "RL options",
                "LoRATrainConfig": "training options", "lora_config": "LoRA and optimizer options"}


@dataclasses.dataclass
class ConfigFlag:
    path: str  # dotted field path, e.g. "beta" or "lora_config.rank"
    flag: str  # e.g. "--beta"
    metavar: str  # BOOL for true/false fields, else V
    help: str
    group: str  # its `--help` section


def config_flags(config_cls: type, skip: tuple[str, ...] = ()) -> list[ConfigFlag]:
    """One flag per settable field of `config_cls` (nested config dataclasses expanded); `skip` lists the
    dotted paths a command does not offer. ``output_dir`` never is a config flag: --output-dir sets it."""
    out = []
    for f, hint, context, path in _leaf_fields(config_cls):
        if path in skip or f.name == "output_dir":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        text = FIELD_HELP.get(f"{context}.{f.name}", FIELD_HELP.get(f.name, f.name))
        if "default:" not in text:
            text = f"{text} (default: {shown})"
        where = f"--config's {path.rpartition('.')[0]}" if "." in path else "--config"
        group = f"{GROUP_TITLES.get(context, context)} (override {where})"
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        out.append(ConfigFlag(path, flag, "BOOL" if hint is bool else "V", text, group))
    return out


def _leaf_fields(config_cls: type, prefix: str = ""):
    """(field, type, context, dotted path) of every non-config field: the class's own fields first, then the
    inherited ones, then those of nested configs (context: the class that declares a field, or the
    nested config's name)."""
    hints = get_type_hints(config_cls)
    own = config_cls.__dict__.get("__annotations__", {})
    fields = dataclasses.fields(config_cls)
    nested = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
    leaves = sorted((f for f in fields if f not in nested), key=lambda f: f.name not in own)  # stable sort
    for f in leaves:
        declared_by = next(c.__name__ for c in config_cls.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
        yield f, hints[f.name], prefix[:-1] or declared_by, prefix + f.name
    for f in nested:
        yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")


def add_config_args(parser: argparse.ArgumentParser, config_cls: type = LoRATrainConfig,
                    skip: tuple[str, ...] = ()) -> None:
    """--config FILE plus the flags of `config_flags` (default: unset, so the file's value wins)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of config fields; flags override it")
    groups: dict[str, Any] = {}
    for flag in config_flags(config_cls, skip):
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        groups[flag.group].add_argument(flag.flag, dest=DEST_PREFIX + flag.path, default=None,
                                        metavar=flag.metavar, help=flag.help)


def config_values(args: argparse.Namespace) -> dict:
    """The config fields the user gave, as a nested dict: the --config file (read here, once) overlaid
    with the config flags."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for dest, value in vars(args).items():
        if dest.startswith(DEST_PREFIX) and value is not None:
            set_path(values, dest[len(DEST_PREFIX):], value)
    return values


def set_path(values: dict, path: str, value: Any) -> None:
    """values["a"]["b"] = value for path "a.b" (a nested config given in a file must be a mapping)."""
    *parents, leaf = path.split(".")
    for name in parents:
        inner = values.setdefault(name, {})
        if not isinstance(inner, dict):
            raise VllmTrainError(f"config field '{name}': {inner!r} is invalid (a mapping of its fields)")
        values = inner
    values[leaf] = value


def config_from_args(args: argparse.Namespace, config_cls: type = LoRATrainConfig, fixed: dict | None = None,
                     values: dict | None = None):
    """The validated config: defaults < --config file < flags < `fixed` (dotted paths; None = not fixed).
    Pass `values` from `config_values` when the command has already looked at them."""
    values = config_values(args) if values is None else values
    for path, value in (fixed or {}).items():
        if value is not None:
            set_path(values, path, value)
    return config_from_dict(config_cls, values, source=getattr(args, "config", None) or "flags")


def check_output_dir(path: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless resuming or told to overwrite.

    ``--resume-from latest`` continues the run in `path` (a fresh start when `path` is empty); a non-empty
    `path` without a checkpoint is refused, so resuming never rewrites another run's or a user's files.
    ``--overwrite`` (not resuming) clears an earlier run's files first (`run_files.clear_run`; rank 0)."""
    from vllm_train.trainers import common, run_files

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VllmTrainError(f"--output-dir {path} exists and is not a directory")
    not_empty = path.is_dir() and any(path.iterdir())
    if not_empty and not resume_from and not overwrite:
        raise VllmTrainError(f"--output-dir {path} is not empty (pass --overwrite, or --resume-from latest "
                             f"to continue that run)")
    resumes = resume_from and (resume_from != "latest" or common.list_checkpoints(path))
    if not_empty and resume_from == "latest" and not resumes and not overwrite:
        raise VllmTrainError(f"--resume-from latest: --output-dir {path} is not empty but holds no checkpoint "
                             f"to resume (pass --overwrite to start a new run there)")
    if not_empty and overwrite and not resumes:
        run_files.clear_run(path)
    distributed.barrier()  # under torchrun: every rank has looked (rank 0 has cleared) before rank 0 writes


@dataclasses.dataclass
class NewOutputDir:
    """The --output-dir a command starts in: removed again when the command fails before its first
    checkpoint (`remove_failed`), so a failed start never leaves a half-made run behind."""

    path: Path
    existed: bool  # an empty directory the user made: emptied, not removed

    @classmethod
    def of(cls, args: argparse.Namespace) -> NewOutputDir | None:
        """None when the command has no --output-dir or the directory already holds files (a resume, an
        --overwrite: that run's files are not this command's to remove)."""
        value = getattr(args, "output_dir", None)
        if value is None:
            return None
        path = Path(value)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            return None
        return cls(path, path.exists())

    def remove_failed(self) -> None:
        from vllm_train.trainers.common import list_checkpoints

        if not distributed.is_main() or not self.path.is_dir() or list_checkpoints(self.path):
            return
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="directory for the adapter and run files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in a non-empty --output-dir: its checkpoints, metrics, TensorBoard "
                             "logs, plots and adapter files are deleted first (other files stay)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
