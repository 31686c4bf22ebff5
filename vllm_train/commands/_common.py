"""Argument plumbing shared by the training commands: config file + flags -> a validated config.

One mechanism maps flags onto config fields. The flags are generated from the config dataclass: field
``learning_rate`` -> ``--learning-rate``, and the fields of a nested config (``RLHFConfig.lora_config``)
the same way, without a prefix. `FLAG_NAMES` renames the few flags whose name differs from their field,
`FIELD_HELP` explains each field. `TRL_ALIASES` adds the names TRL / PEFT users bring (``--lora-r`` for
``--rank``, ...) as second spellings of the same flags and config keys. Values are merged as defaults < the
``--config`` file (read once; keys with dashes or underscores, TRL's names too, a nested config's fields
at the top level or under its name) < flags < what the command fixes (e.g. ``output_dir`` from
``--output-dir``). A ``--config`` file may hold a whole run: its keys that name one of the command's own
options (``model``, ``data``, ``output_dir``, ...) become those options, and flags still win
(`_parse.run_options_from_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, get_type_hints

from vllm_train.config import LoRATrainConfig, config_from_dict
from vllm_train.errors import VllmTrainError
from vllm_train.files import load_config_file, parse_bool

DEST_PREFIX = "config."  # argparse dest of a config flag: "config." + the field's dotted path

FLAG_NAMES = {"loss_type": "loss"}  # field -> flag name, where they differ

# TRL's / PEFT's names -> ours: second spellings of the same flag and config key (where the command has the
# field, and the name is not a field of its own there: DPO's --beta stays DPO's beta)
TRL_ALIASES = {
    "per_device_train_batch_size": "batch_size", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lora_target_modules": "target_modules", "num_train_epochs": "num_epochs", "lr_scheduler_type": "lr_scheduler",
    "max_seq_length": "max_length", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
    "beta": "kl_coef", "micro_batch_size": "batch_size",
}
ALIASES_HELP = ("TRL / PEFT names are accepted too: " + ", ".join(
    f"--{alias.replace('_', '-')} (= --{FLAG_NAMES.get(field, field).replace('_', '-')})"
    for alias, field in TRL_ALIASES.items()) + "; --target-modules all-linear = every linear layer but the "
    "output layer; a bool flag alone means true (--use-rslora); --config keys may use dashes or underscores "
    "and may hold the run's options too (model, data, output_dir, ...; flags win)")

# Help per field. "<Context>.<field>" keys win over plain field names: the context is the config class
# that declares the field, or the name of the nested config it is reached through (e.g. lora_config).
FIELD_HELP = {
    "rank": "LoRA rank r (any r >= 1; vLLM serves it with max_lora_rank rounded up to 1/8/16/32/...)",
    "alpha": "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --use-rslora)",
    "target_modules": "comma-separated module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj, or "
                      "all-linear (every linear layer but the output layer, as in PEFT)",
    "dropout": "LoRA dropout on the layer input, 0 <= p < 1",
    "use_rslora": "rank-stabilised scaling alpha/sqrt(r)",
    "learning_rate": "peak learning rate (AdamW)",
    "batch_size": "examples per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "num_epochs": "passes over the data (ignored when --max-steps is set)",
    "warmup_ratio": "share of steps with linear warmup",
    "max_grad_norm": "gradient clipping norm",
    "weight_decay": "AdamW weight decay on LoRA weights",
    "report_to": "where metrics go besides metrics.jsonl: tensorboard (default), wandb (pip install wandb; "
                 "WANDB_PROJECT, WANDB_MODE=offline are honoured), both (all, or a comma list), or none",
    "lr_scheduler": "cosine | linear | constant (after warmup), or a transformers.get_scheduler name: constant_"
                    "with_warmup, cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr, ...",
    "lr_scheduler_kwargs": "a transformers schedule's arguments as JSON, e.g. '{\"min_lr_rate\": 0.1}'",
    "warmup_steps": "warmup steps, in place of --warmup-ratio when > 0 (below 1: a ratio of the run)",
    "optim": "optimizer, as TRL names it: adamw_torch or adamw_torch_fused (AdamW, fused on CUDA either way)",
    "max_length": "truncate examples to this many tokens",
    "max_steps": "stop after this many optimizer steps (-1: run all epochs)",
    "seed": "random seed (data order, LoRA init, sampling)",
    "precision": "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16",
    "gradient_checkpointing": "recompute each layer's activations during backward instead of keeping them "
                              "(less memory for long sequences or big batches, ~30% more compute)",
    "tensor_parallel_size": "under torchrun: shard the model's attention and MLP linears (and the LoRA) over "
                            "groups of K ranks, each group also one vLLM engine; data parallel across groups",
    "logging_steps": "log metrics every N optimizer steps",
    "save_steps": "checkpoint every N steps (0: at the end of each epoch)",
    "save_total_limit": "checkpoints to keep",
    "resume_from": "checkpoint dir to resume from, or 'latest' (newest under the output dir)",
    "stop_on_divergence": "stop (exit status 2, checkpoints kept) when the training diverges: the loss far above "
                          "its best for 5 logged steps, or the weights grown 100x; without it a warning is "
                          "printed and the metric 'diverged' logged",
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
    "environment": "MODULE:CLASS or FILE.py:CLASS: multi-turn episodes with this environment (one instance per "
                   "episode: reset(**record), tools, respond(text), get_reward() -- vllm_train.agents.environment)",
    "max_turns": "model turns per episode (default: until the environment ends it)",
    "max_episode_tokens": "model + environment tokens per episode after the prompt (default: no cap)",
    "tool_timeout": "seconds a tool call may run; a timeout goes back to the model as the tool's text",
    "tool_parser": "tool-call format: hermes, llama3_json, none (default: the one the chat template implies)",
    "lora_config.batch_size": "sequences per micro-batch",
    "lora_config.max_length": "rejected: RL does not truncate yet (completions are capped by --max-new-tokens, "
                              "prompts are used whole; default: not applied)",
}

FIELD_HELP.update({  # `vllm-train service` (ServiceConfig)
    "ServiceConfig.host": "address to bind (default: 127.0.0.1, this machine only)",
    "ServiceConfig.port": "port to listen on; 0 = any free port (default: 8000)",
    "ServiceConfig.max_adapters": "LoRA adapters (training runs) alive at once; vLLM gets one slot each",
    "ServiceConfig.max_lora_rank": "largest LoRA rank a run may ask for: 1, 8, 16, 32, 64, ... (vLLM's "
                                   "max_lora_rank)",
    "ServiceConfig.state_dir": "where save_state / save_weights_for_sampler(name) write checkpoints; a restart "
                               "lists and loads them (default: none, no checkpoints)",
    "ServiceConfig.max_batch_tokens": "tokens in one forward/backward pass and in one request",
    "ServiceConfig.sampling": "start a vLLM engine for sampling (false: training only)",
    "ServiceConfig.kv_cache_gib": "vLLM's KV cache in GiB (CPU default 0.5; GPU default: a share of its memory)",
    "ServiceConfig.poll_seconds": "how long a retrieve_future call waits for its result before 'try again'",
    "ServiceConfig.session_ttl_seconds": "a session without a heartbeat this long ends and its runs are unloaded "
                                         "(the SDK heartbeats every 10 s)",
})

# The flag groups of `--help`, by the config class that declares the fields (or the nested config's name).
GROUP_TITLES = {"DPOConfig": "DPO options", "RewardModelConfig": "reward-model options", "RLHFConfig": "RL options",
                "LoRATrainConfig": "training options", "lora_config": "LoRA and optimizer options",
                "ServiceConfig": "service options"}


@dataclasses.dataclass
class ConfigFlag:
    path: str  # dotted field path, e.g. "beta" or "lora_config.rank"
    flag: str  # e.g. "--beta"
    metavar: str  # BOOL for true/false fields, else V
    help: str
    group: str  # its `--help` section
    aliases: tuple[str, ...] = ()  # TRL's spellings of the same flag


def config_flags(config_cls: type, skip: tuple[str, ...] = ()) -> list[ConfigFlag]:
    """One flag per settable field of `config_cls` (nested config dataclasses expanded); `skip` lists the
    dotted paths a command does not offer. ``output_dir`` never is a config flag: --output-dir sets it."""
    out = []
    names = {f.name for f, *_ in _leaf_fields(config_cls)}
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
        aliases = tuple("--" + a.replace("_", "-") for a, field in TRL_ALIASES.items() if field == f.name
                        and a not in names)
        out.append(ConfigFlag(path, flag, "BOOL" if hint is bool else "V", text, group, aliases))
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
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of config fields (and of this "
                        "command's options: model, data, output_dir, ...); flags override it. " + ALIASES_HELP)
    groups: dict[str, Any] = {}
    for flag in config_flags(config_cls, skip):
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        bare = {"nargs": "?", "const": "true"} if flag.metavar == "BOOL" else {}  # --use-rslora alone: true
        groups[flag.group].add_argument(flag.flag, *flag.aliases, dest=DEST_PREFIX + flag.path, default=None,
                                        metavar=flag.metavar, help=flag.help.replace("%", "%%"), **bare)


def config_values(args: argparse.Namespace, config_cls: type = LoRATrainConfig) -> dict:
    """The config fields the user gave, as a nested dict: the --config file (read here, once; or its config
    fields as `_parse.run_options_from_config` left them) with keys as `config_cls` names them, overlaid with the
    config flags."""
    values = getattr(args, CONFIG_FILE_VALUES, None)
    if values is None:
        values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values = canonical_keys(values, config_cls, getattr(args, "config", None) or "--config")
    for dest, value in vars(args).items():
        if dest.startswith(DEST_PREFIX) and value is not None:
            set_path(values, dest[len(DEST_PREFIX):], value)
    return values


def canonical_keys(values: dict, config_cls: type, source: str = "--config") -> dict:
    """Config-file keys as `config_cls` names its fields: dashes read as underscores, TRL's names as ours
    (`TRL_ALIASES`), and the fields of a nested config (RLHFConfig.lora_config) given at the top level (a flat
    file, like the flags) moved under it. Two keys for one field with different values (``lora_r`` and
    ``rank``, ``learning-rate`` and ``learning_rate``) are refused in one line naming both. Unknown keys stay,
    for `config_from_dict` to name."""
    out: dict = {}
    spelled: dict[str, tuple[str, Any]] = {}  # dotted field path -> (the key that set it, its value)
    for path, key, value in _field_items(values, config_cls):
        if path in spelled and not same_value(spelled[path][1], value):
            raise VllmTrainError(f"{source}: '{spelled[path][0]}: {spelled[path][1]}' and '{key}: {value}' set the "
                                 f"same field ({path}); keep one")
        spelled.setdefault(path, (key, value))
        set_path(out, path, value)
    return out


def _field_items(values: dict, config_cls: type, prefix: str = ""):
    """(dotted field path, key as written, value) of each key of a config file (see `canonical_keys`)."""
    hints = get_type_hints(config_cls)
    own = {f.name for f in dataclasses.fields(config_cls)}
    nested = {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if dataclasses.is_dataclass(hints[f.name])}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in own and name in TRL_ALIASES:
            name = TRL_ALIASES[name]
        if name in nested and isinstance(value, dict):
            for path, inner, inner_value in _field_items(value, nested[name], f"{prefix}{key}."):
                yield f"{name}.{path}", inner, inner_value
            continue
        home = next((n for n, cls in nested.items() if name not in own and name in
                     {f.name for f in dataclasses.fields(cls)}), None)
        yield f"{home}.{name}" if home is not None else name, f"{prefix}{key}", value


def same_value(a: Any, b: Any) -> bool:
    """Whether two spellings' values say the same (4 and "4", 0.001 and "1e-3", true and "yes" do)."""
    if a == b or str(a).strip() == str(b).strip():
        return True
    for read in (parse_bool, float):
        try:
            return read(a) == read(b)
        except (TypeError, ValueError, VllmTrainError):
            continue
    return False


CONFIG_FILE_VALUES = "config_file_values"  # args attribute: the --config file's config fields, read once


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
    values = config_values(args, config_cls) if values is None else values
    for path, value in (fixed or {}).items():
        if value is not None:
            set_path(values, path, value)
    return config_from_dict(config_cls, values, source=getattr(args, "config", None) or "flags")


# ---- models and adapters by hub id (vllm_train/hub.py) -----------------------------------------------
MODEL_HELP = ("local Hugging Face model directory, or a hub id ORG/NAME (fetched once into the hub cache, "
              "shared by HF and vLLM; HF_HOME and HF_HUB_OFFLINE=1 are honoured)")
ADAPTER_HELP = " (a local directory, or a hub id ORG/NAME)"


def add_model_args(parser: argparse.ArgumentParser, help_suffix: str = "", chat_template: bool = True) -> None:
    """--model (a directory or a hub id), --revision (of a hub id) and, unless told not to, --chat-template."""
    parser.add_argument("--model", required=True, metavar="PATH|ORG/NAME", help=MODEL_HELP + help_suffix)
    parser.add_argument("--revision", metavar="REV", help="hub branch, tag or commit of --model (default: main)")
    if chat_template:
        parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to render chat messages with, "
                            "in place of the model's own (needed for chat data when the model has none)")


def resolve_model_args(args: argparse.Namespace) -> str:
    """Hub ids given as --adapter / --reward-model become their local directories (downloaded once), and
    --chat-template is read and put to use; returns the checked local directory of --model. args.model stays
    as given: a trained adapter records it as its base (`hub.model_reference`)."""
    from vllm_train import hub
    from vllm_train.data.tokenize import use_chat_template
    from vllm_train.files import read_text
    from vllm_train.model_dir import check_model_dir
    from vllm_train.models import resolve_model

    template = Path(args.chat_template) if getattr(args, "chat_template", None) else None
    if template is not None and not template.exists():
        raise VllmTrainError(f"--chat-template: file not found: {template}")
    use_chat_template(read_text(template) if template else None)
    for name in ("adapter", "reward_model"):
        if getattr(args, name, None):
            setattr(args, name, hub.resolve(getattr(args, name), what="--" + name.replace("_", "-")))
    local = resolve_model(args.model, getattr(args, "revision", None))
    check_model_dir(local, template)  # config, weights, tokenizer and chat template: before anything loads
    return local
