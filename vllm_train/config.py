"""Validated configuration dataclasses. Every run writes its resolved config next to its outputs.

Configs load from YAML or JSON files (`vllm_train.files.load_config_file`) and are checked when constructed,
so a bad value fails before any model is loaded, with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

from vllm_train import distributed, run_manifest
from vllm_train.errors import VllmTrainError
from vllm_train.files import parse_bool
from vllm_train.metrics import report_backends
from vllm_train.schedules import check_optimizer, check_schedule, scheduler_kwargs

# The LoRA ranks a vLLM engine accepts as `max_lora_rank` (vLLM 0.26 and 0.32 alike). An adapter of any
# smaller rank is served by an engine whose max_lora_rank is the next value up.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# An adapter's update of a module may be at most this many times the base weight's norm (lora/validate.py)
MAX_DELTA_RATIO = 100.0

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# target_modules ["all-linear"]: every linear layer but the output layer, as in PEFT (resolved on the model)
ALL_LINEAR = "all-linear"


def engine_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that can serve an adapter of rank `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VllmTrainError(f"rank: {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})")


def _check(ok: bool, field_name: str, value: Any, rule: str) -> None:
    if not ok:
        raise VllmTrainError(f"config field '{field_name}': {value!r} is invalid ({rule})")


MAX_SEED = 2**32 - 1  # numpy's and vLLM's seeds are 32-bit; a larger one overflows deep inside a run


def _check_numbers(config: Any) -> None:
    """Every float field finite (inf is meaningless for each of them: a clip range, a cap, a learning rate)
    and the seed in range, so neither fails or silently disables something mid-run."""
    for f in fields(config):
        value = getattr(config, f.name)
        _check(not isinstance(value, float) or math.isfinite(value), f.name, value, "a finite number")
    _check(isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED, "seed", config.seed,
           f"an integer from 0 to {MAX_SEED}")


@dataclass
class LoRATrainConfig:
    # LoRA settings
    rank: int = 8
    alpha: float = 16
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha/sqrt(rank) instead of alpha/rank

    # Training settings
    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    num_epochs: int = 3
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # ours, or any transformers.get_scheduler name (vllm_train/schedules.py)
    lr_scheduler_kwargs: dict | None = None  # its extra arguments (transformers' schedules), e.g. min_lr_rate
    warmup_steps: float | None = None  # > 0: warmup steps (< 1: a ratio), in place of warmup_ratio (TRL's key)
    optim: str | None = None  # TRL's optimizer name; AdamW only: None, adamw_torch or adamw_torch_fused
    max_length: int = 512
    max_steps: int = -1  # optimizer steps; -1 = run num_epochs
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    tensor_parallel_size: int = 1  # under torchrun: shard the model's linears over groups of this many ranks
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (non-reentrant)

    # Logging and checkpoints
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + wandb; "none" = metrics.jsonl only
    logging_steps: int = 10
    save_steps: int = 0  # 0 = checkpoint only at the end of each epoch
    eval_steps: int = 0  # evaluate on the eval set every N optimizer steps (0 = at the end of each epoch)
    save_total_limit: int = 2
    resume_from: str | None = None  # a checkpoint dir, or "latest" for the newest under output_dir
    stop_on_divergence: bool = False  # stop (exit status 2) where a divergence warning would be printed

    # Output
    output_dir: str = "./lora_output"

    def __post_init__(self) -> None:
        _check_numbers(self)
        self.target_modules = list(self.target_modules)
        _check(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "an integer >= 1")
        engine_max_lora_rank(self.rank)  # > 512 cannot be served by vLLM
        _check(self.alpha > 0 and math.isfinite(self.alpha), "alpha", self.alpha, "a finite number > 0")
        _check(len(self.target_modules) > 0 and all(isinstance(m, str) and m for m in self.target_modules),
               "target_modules", self.target_modules, "a non-empty list of module names")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0 <= dropout < 1")
        _check(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate",
               self.learning_rate, "must be > 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
               self.gradient_accumulation_steps, "an integer >= 1")
        _check(self.num_epochs >= 1, "num_epochs", self.num_epochs, "an integer >= 1")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio, "0 <= warmup_ratio < 1")
        _check(self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm), "max_grad_norm", self.max_grad_norm,
               "a finite number > 0")
        _check(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay", self.weight_decay,
               "a finite number >= 0")
        self.lr_scheduler_kwargs = scheduler_kwargs(self.lr_scheduler_kwargs) or None
        check_schedule(self.lr_scheduler, self.lr_scheduler_kwargs or {}, self.warmup_steps)
        check_optimizer(self.optim)
        _check(self.max_length >= 2, "max_length", self.max_length, "an integer >= 2")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", self.max_steps, "-1 or >= 1")
        _check(self.precision in ("auto", "fp32", "bf16"), "precision", self.precision, "auto, fp32 or bf16")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
               self.tensor_parallel_size, "an integer >= 1")
        self.report_to = report_backends(self.report_to)
        _check(self.logging_steps >= 1, "logging_steps", self.logging_steps, "an integer >= 1")
        _check(self.save_steps >= 0, "save_steps", self.save_steps, "an integer >= 0")
        _check(isinstance(self.eval_steps, int) and self.eval_steps >= 0, "eval_steps", self.eval_steps,
               "an integer >= 0")
        _check(self.save_total_limit >= 1, "save_total_limit", self.save_total_limit, "an integer >= 1")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a path")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def engine_max_lora_rank(self) -> int:
        return engine_max_lora_rank(self.rank)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(LoRATrainConfig):
    """LoRATrainConfig plus the preference-loss settings (all validated)."""

    beta: float = 0.1  # strength of the pull towards the reference (IPO: tau)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid only)
    precompute_ref_logps: bool = True  # reference log-probs once, before training (required with --adapter)
    rpo_alpha: float = 0.0  # weight of the NLL of the chosen completions added to the loss (RPO); 0 = off

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "must be > 0")
        _check(self.loss_type in DPO_LOSS_TYPES, "loss_type", self.loss_type, "one of " + ", ".join(DPO_LOSS_TYPES))
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing,
               "0 <= label_smoothing < 0.5")
        _check(self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha), "rpo_alpha", self.rpo_alpha, "must be >= 0")
        _check(self.label_smoothing == 0.0 or self.loss_type == "sigmoid", "label_smoothing",
               self.label_smoothing, "only with loss_type sigmoid")


@dataclass
class RewardModelConfig(LoRATrainConfig):
    """LoRATrainConfig plus the head's learning rate. The head starts near zero (std 0.02), so the
    LoRA layers get almost no gradient until it has grown: a higher head rate gets training going."""

    head_learning_rate: float | None = None  # None: 10 x learning_rate
    # > 0: add this weight times a distillation loss of the base LM's preference (see `base_preference_loss`)
    base_preference_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        head_lr = self.head_learning_rate
        _check(head_lr is None or (head_lr > 0 and math.isfinite(head_lr)), "head_learning_rate", head_lr,
               "None or a finite number > 0")
        _check(self.base_preference_coef >= 0, "base_preference_coef", self.base_preference_coef, "must be >= 0")

    @property
    def head_lr(self) -> float:
        return self.head_learning_rate if self.head_learning_rate is not None else 10 * self.learning_rate


RL_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "ppo")


@dataclass
class RLHFConfig:
    """RL fine-tuning of a LoRA policy with vLLM rollouts (PPO, GRPO, Dr.GRPO, DAPO, RLOO).

    ``lora_config`` supplies the adapter shape and the optimizer (learning_rate, lr_scheduler,
    warmup_ratio, max_grad_norm, weight_decay), ``batch_size`` as the micro-batch size of the update,
    precision, output_dir, resume_from and save_total_limit; its epoch/step/seed fields are not used
    here (RL runs ``num_steps`` rollout steps seeded by ``seed``).
    """

    lora_config: LoRATrainConfig = field(default_factory=LoRATrainConfig)
    algorithm: Literal["grpo", "dr_grpo", "dapo", "rloo", "ppo"] = "grpo"

    # Rollouts (vLLM)
    rollout_batch_size: int = 16  # prompts per step
    group_size: int = 8  # completions per prompt (>= 2 for the group-relative algorithms)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    # vLLM OpenAI servers to sample from (`vllm-train serve` replicas, any machine; engine/remote.py) instead
    # of a vLLM engine in this process: each adapter version is published to all of them, then sampled
    rollout_servers: list[str] | None = None

    # Update
    ppo_epochs: int = 1  # passes over each rollout batch
    num_minibatches: int = 1  # optimizer steps per pass
    clip_range: float = 0.2  # ratio clip (lower side; both sides unless clip_range_high is set)
    clip_range_high: float | None = None  # asymmetric upper clip (DAPO uses 0.28); None: = clip_range
    value_clip_range: float = 0.2  # PPO value clip
    kl_coef: float = 0.0  # penalty on KL to the reference policy (see kl_reference)
    # "initial": the policy the run starts from (the --adapter, e.g. an SFT run; with no adapter that is the
    # base model); "base": the base model with the adapter disabled, whatever the start
    kl_reference: Literal["initial", "base"] = "initial"
    log_ref_kl: bool = True  # measure KL to the reference every step even when kl_coef = 0 (one no-grad forward)
    gamma: float = 1.0  # GAE discount (PPO)
    gae_lambda: float = 0.95  # GAE lambda (PPO)
    value_loss_coef: float = 0.5  # PPO
    whiten_advantages: bool = True  # PPO: advantages to zero mean, unit variance over the batch
    whiten_rewards: bool = True  # PPO: sequence scores to zero mean, unit variance over the batch before the KL
    # penalty is added (a reward model's scale and offset are arbitrary; unscaled, they swamp kl_coef)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (no signal; DAPO)
    dynamic_sampling_rounds: int = 4  # then sample more prompts, up to N times, to refill the batch
    tis_cap: float | None = None  # truncated importance sampling: weight tokens by min(pi_train/pi_vllm, cap)
    # Rollouts overlap the update: step n+1's rollout is sampled (from the weights before step n's update)
    # while step n updates, so it lags by up to this many updates; 0 = exactly on-policy, one after the other.
    # The lag is corrected by truncated importance sampling against vLLM's sampled-token log-probs
    # (tis_cap, 2.0 when unset).
    max_staleness: int = 0

    # Multi-turn episodes (vllm_train.agents): an environment the model talks to between its turns
    environment: str | None = None  # MODULE:CLASS or path/to/file.py:CLASS; one instance per episode
    max_turns: int | None = None  # model turns per episode (None: until the environment ends it)
    max_episode_tokens: int | None = None  # model + environment tokens after the prompt (None: no cap)
    tool_timeout: float = 10.0  # seconds a tool call may run (its timeout goes back to the model as text)
    tool_parser: str | None = None  # tool-call format: hermes, llama3_json, none (None: the chat template's)

    # Intervals and seed
    save_steps: int = 0  # checkpoint every N steps (0: only the final adapter)
    eval_steps: int = 0  # greedy eval on the eval prompts every N steps (0: before and after only)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.lora_config, LoRATrainConfig), "lora_config", self.lora_config,
               "a LoRATrainConfig (or a mapping of its fields)")
        _check_numbers(self)
        _check(self.algorithm in RL_ALGORITHMS, "algorithm", self.algorithm, f"one of {', '.join(RL_ALGORITHMS)}")
        _check(self.rollout_batch_size >= 1, "rollout_batch_size", self.rollout_batch_size, "an integer >= 1")
        min_group = 1 if self.algorithm == "ppo" else 2
        _check(self.group_size >= min_group, "group_size", self.group_size,
               f"an integer >= {min_group} for {self.algorithm}")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature > 0 and math.isfinite(self.temperature), "temperature", self.temperature,
               "must be > 0 (RL samples)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "0 < top_p <= 1")
        _check(self.rollout_servers is None or (isinstance(self.rollout_servers, list) and len(self.rollout_servers) > 0
               and all(isinstance(u, str) and u.strip() for u in self.rollout_servers)), "rollout_servers",
               self.rollout_servers, "None or a non-empty list of server URLs")
        _check(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "an integer >= 1")
        _check(1 <= self.num_minibatches <= self.rollout_batch_size * self.group_size, "num_minibatches",
               self.num_minibatches, "between 1 and rollout_batch_size * group_size")
        _check(0.0 < self.clip_range < 1.0, "clip_range", self.clip_range, "0 < clip_range < 1")
        _check(self.clip_range_high is None or self.clip_range_high > 0, "clip_range_high",
               self.clip_range_high, "None or > 0")
        _check(self.value_clip_range > 0, "value_clip_range", self.value_clip_range, "must be > 0")
        _check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        _check(self.kl_reference in ("initial", "base"), "kl_reference", self.kl_reference, "'initial' or 'base'")
        _check(0.0 <= self.gamma <= 1.0, "gamma", self.gamma, "0 <= gamma <= 1")
        _check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", self.gae_lambda, "0 <= gae_lambda <= 1")
        _check(self.value_loss_coef >= 0, "value_loss_coef", self.value_loss_coef, "must be >= 0")
        _check(self.dynamic_sampling_rounds >= 0, "dynamic_sampling_rounds", self.dynamic_sampling_rounds,
               "an integer >= 0")
        _check(self.tis_cap is None or self.tis_cap >= 1.0, "tis_cap", self.tis_cap, "None or >= 1")
        _check(self.max_staleness in (0, 1), "max_staleness", self.max_staleness,
               "0 (on-policy) or 1 (the next rollout overlaps the update)")
        _check(not (self.max_staleness and self.dynamic_sampling), "max_staleness", self.max_staleness,
               "0 with dynamic_sampling (refill rounds sample inside the step, from the newest weights)")
        self._check_episodes()
        _check(self.save_steps >= 0, "save_steps", self.save_steps, "an integer >= 0")
        _check(self.eval_steps >= 0, "eval_steps", self.eval_steps, "an integer >= 0")

    def check_episode_fields(self, has_environment: bool) -> None:
        """The episode-only fields are set only for a run with an environment -- this config's, or the class
        given to the trainer (``RLHFTrainer(environment_factory=...)``), which the config cannot see."""
        for name in ("max_turns", "max_episode_tokens", "tool_parser"):
            _check(has_environment or getattr(self, name) is None, name, getattr(self, name),
                   "set only with environment (multi-turn episodes)")

    def _check_episodes(self) -> None:
        env = self.environment
        _check(env is None or (isinstance(env, str) and env.count(":") == 1 and all(env.split(":"))),
               "environment", env, "None or 'module:Class' / 'path/to/file.py:Class'")
        _check(self.max_turns is None or self.max_turns >= 1, "max_turns", self.max_turns, "None or an integer >= 1")
        _check(self.max_episode_tokens is None or self.max_episode_tokens >= 1, "max_episode_tokens",
               self.max_episode_tokens, "None or an integer >= 1")
        _check(self.tool_timeout > 0 and math.isfinite(self.tool_timeout), "tool_timeout", self.tool_timeout,
               "seconds > 0")
        _check(self.tool_parser is None or (isinstance(self.tool_parser, str) and self.tool_parser.strip() != ""),
               "tool_parser", self.tool_parser, "None or a parser name")

    @property
    def output_dir(self) -> str:
        return self.lora_config.output_dir

    @property
    def importance_cap(self) -> float | None:
        """The truncation of the importance weights pi_trainer / pi_sampler (None: not weighted)."""
        if self.tis_cap is None and self.max_staleness > 0:
            return 2.0
        return self.tis_cap

    @property
    def clip_high(self) -> float:
        return self.clip_range if self.clip_range_high is None else self.clip_range_high


ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], values: dict, source: str = "config") -> ConfigT:
    """Build `cls` from a dict, rejecting unknown keys and values of the wrong type by name."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise VllmTrainError(f"{source}: unknown config field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
    hints = get_type_hints(cls)
    converted = {}
    for name, value in values.items():
        converted[name] = _coerce(hints[name], value, name, cls, source)
    try:
        return cls(**converted)
    except TypeError as exc:  # e.g. comparing a str with an int inside validation
        raise VllmTrainError(f"{source}: {exc}") from None


def _coerce(hint: Any, value: Any, name: str, cls: type, source: str) -> Any:
    """Turn YAML/JSON/CLI values into the field's type; nested config dataclasses too."""
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value, f"{source}: {name}")
    if dataclasses.is_dataclass(hint):
        return value
    text = str(hint)
    try:
        if value is None:
            return None
        if hint is bool or text == "bool":
            return parse_bool(value, f"{source}: config field '{name}'")
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if text.startswith("list[") and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if "int | None" in text and isinstance(value, str):
            return None if value.lower() == "none" else int(value)
        if "float | None" in text and isinstance(value, str):
            return None if value.lower() == "none" else float(value)
    except (TypeError, ValueError):
        raise VllmTrainError(f"{source}: config field '{name}': {value!r} is not a valid {hint}") from None
    return value


def write_resolved_config(config: Any, out_dir: str | Path, name: str = "resolved_config.json", **extra) -> Path:
    """Write the config as it was actually used (defaults filled in) next to a run's outputs (rank 0
    alone in a data-parallel run, with the world size recorded); it is the run marker, and the run's
    manifest starts beside it (`vllm_train.run_manifest`)."""
    out = Path(out_dir)
    if not distributed.is_main():
        return out / name
    extra.setdefault("world_size", distributed.world_size())
    out.mkdir(parents=True, exist_ok=True)
    payload = {**dataclasses.asdict(config), **extra}
    target = out / name
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(target)
    run_manifest.start(out)  # from here on the run's writes are listed beside its marker
    run_manifest.note(target)
    return target
