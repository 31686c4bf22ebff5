"""One validation of a PEFT LoRA adapter directory, by value, used by every reader of an adapter
(`push`, `serve --adapter`, and `--adapter` of generate / eval / dpo / grpo / ppo).

Checked: the config (rank in vLLM's range, finite positive alpha, target modules, no DoRA), every tensor
(floating point, finite), the LoRA pairs (``lora_A`` (r, in) and ``lora_B`` (out, r) for each module, r as
configured, the module targeted) and, with a base model, each pair's shape against the base model's
config.json (hidden / intermediate / head sizes; vLLM's fused ``qkv_proj`` / ``gate_up_proj`` are the sums
of their parts) and its layer index. The first problem is raised as one `VllmTrainError` line naming the
file and the field or tensor. No vLLM import here: commands check an adapter before starting an engine.

With a base model the adapter is also checked by magnitude: finite values can still be absurd (a diverged
run's weights of 1e4, an adapter scaled by 1e30) and overflow every activation they touch. Per adapted
module, the update's norm ||scaling * B A||_F must stay within `MAX_DELTA_RATIO` times the base weight's
||W||_F. A trained adapter's update is a fraction of W (random rank-8 test adapters: ~4x on the tiny model).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from vllm_train.config import MAX_DELTA_RATIO, VLLM_MAX_LORA_RANKS
from vllm_train.errors import VllmTrainError
from vllm_train.hub import repo_id_of
from vllm_train.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FUSED_PROJECTIONS, PEFT_PREFIX, read_adapter_dir

LORA_KEY_RE = re.compile(rf"^{re.escape(PEFT_PREFIX)}(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


OTHER_BASE_HINT = " (pass --allow-other-base to apply it anyway)"  # the commands that may: generate, eval
BASE_ROWS_READ = 256  # rows of each base weight read to estimate its norm (an order-of-magnitude check)


def validate_adapter(adapter_dir: str | Path, base_model: str | None = None, max_lora_rank: int | None = None,
                     *, check_base_name: bool = False, allow_hint: str = "",
                     max_delta_ratio: float = MAX_DELTA_RATIO) -> dict:
    """Check a PEFT adapter directory before anything loads it; returns its adapter config.

    `base_model`: a local model directory whose config.json gives the expected tensor shapes.
    `max_lora_rank`: the serving engine's limit. `check_base_name`: also require that the adapter's
    ``base_model_name_or_path`` names `base_model` (servers, where the adapter reaches other users; generate
    and eval unless --allow-other-base); `allow_hint` ends that error (how to allow it anyway).
    `max_delta_ratio`: the magnitude bound, with a base model (inf: unchecked)."""
    path = Path(adapter_dir)
    config, state = read_adapter_dir(path)
    where, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    rank, rank_pattern = _check_config(config, where)
    top = max([rank, *rank_pattern.values()])
    if max_lora_rank is not None and top > max_lora_rank:
        raise VllmTrainError(f"{where}: adapter rank r={top} is above the server's max_lora_rank "
                             f"{max_lora_rank} (start the server with --max-lora-rank >= {top})")
    pairs = _lora_pairs(state, weights)
    targets = config.get("target_modules")
    for mod, ab in pairs.items():
        if isinstance(targets, list) and not any(_matches(mod, t) for t in targets):
            raise VllmTrainError(f"{weights}: tensor {_key(mod, 'A')} is for module '{mod}', which is not in "
                                 f"{ADAPTER_CONFIG} target_modules {targets}")
        expected_r = next((r for pattern, r in rank_pattern.items() if _pattern_matches(mod, pattern)), rank)
        if ab["A"][0] != expected_r:
            raise VllmTrainError(f"{weights}: tensor {_key(mod, 'A')} has shape {_shape(ab['A'])} but "
                                 f"{ADAPTER_CONFIG} says rank {expected_r} (expected ({expected_r}, in))")
    if base_model is not None:
        if check_base_name:
            trained_on = config.get("base_model_name_or_path")
            if trained_on and not _same_model(str(trained_on), base_model):
                raise VllmTrainError(f"{where}: adapter was trained on base model '{trained_on}', not on "
                                     f"'{base_model}'{allow_hint}")
        _check_base_shapes(pairs, weights, base_model)
        _check_magnitude(config, state, pairs, weights, Path(base_model), max_delta_ratio)
    return config


def _check_config(config: dict, where: Path) -> tuple[int, dict[str, int]]:
    """(r, rank_pattern) after checking the config's numbers and target modules."""

    def rank_ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= VLLM_MAX_LORA_RANKS[-1]

    def alpha_ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    rule = f"an integer from 1 to {VLLM_MAX_LORA_RANKS[-1]}"
    if not rank_ok(config["r"]):
        raise VllmTrainError(f"{where}: field 'r' is {config['r']!r}, expected {rule}")
    if not alpha_ok(config.get("lora_alpha", 8)):  # PEFT's default alpha is 8
        raise VllmTrainError(f"{where}: field 'lora_alpha' is {config['lora_alpha']!r}, expected a finite number > 0")
    patterns = {}
    for field, ok, expect in (("rank_pattern", rank_ok, rule), ("alpha_pattern", alpha_ok, "a finite number > 0")):
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise VllmTrainError(f"{where}: field '{field}' must be an object (module pattern -> value)")
        for key, v in value.items():
            if not ok(v):
                raise VllmTrainError(f"{where}: field '{field}' entry {key!r} is {v!r}, expected {expect}")
        patterns[field] = value
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise VllmTrainError(f"{where}: field 'target_modules' is {targets!r}, expected a non-empty list of "
                             f"module names (or a regex string)")
    if config.get("use_dora"):
        raise VllmTrainError(f"{where}: DoRA adapters (use_dora: true) are not supported")
    return config["r"], patterns["rank_pattern"]


def _lora_pairs(state: dict[str, torch.Tensor], weights: Path) -> dict[str, dict[str, torch.Size]]:
    """module path -> {"A": shape, "B": shape}, after checking every tensor's dtype and values."""
    pairs: dict[str, dict[str, torch.Size]] = {}
    for key, tensor in state.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise VllmTrainError(f"{weights}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                 f"expected a floating-point dtype")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise VllmTrainError(f"{weights}: tensor {key} holds {bad} non-finite value(s) (NaN or inf)")
        m = LORA_KEY_RE.match(key)
        if m:
            pairs.setdefault(m["mod"], {})[m["ab"]] = tensor.shape
    if not pairs:
        raise VllmTrainError(f"{weights}: holds no '{PEFT_PREFIX}*.lora_A/B.weight' tensors")
    for mod, ab in pairs.items():
        for half, other in (("A", "B"), ("B", "A")):
            if half not in ab:
                raise VllmTrainError(f"{weights}: tensor {_key(mod, other)} has no {_key(mod, half)} partner")
            if len(ab[half]) != 2:
                raise VllmTrainError(f"{weights}: tensor {_key(mod, half)} has shape {_shape(ab[half])}, "
                                     f"expected a matrix")
        if ab["A"][0] != ab["B"][1]:
            raise VllmTrainError(f"{weights}: tensors {_key(mod, 'A')} {_shape(ab['A'])} and {_key(mod, 'B')} "
                                 f"{_shape(ab['B'])} are not a LoRA pair (A: (r, in), B: (out, r))")
    return pairs


def _check_base_shapes(pairs: dict[str, dict[str, torch.Size]], weights: Path, base_model: str) -> None:
    cfg = _text_config(Path(base_model) / "config.json")
    dims, base_names = expected_dims(cfg), None
    layers = cfg.get("num_hidden_layers")
    for mod, ab in pairs.items():
        layer = re.search(r"\.layers\.(\d+)\.", f".{mod}.")
        if isinstance(layers, int) and layer and int(layer[1]) >= layers:
            raise VllmTrainError(f"{weights}: tensor {_key(mod, 'A')} is for layer {layer[1]} but '{base_model}' "
                                 f"has {layers} layers: adapter is for another base model")
        leaf = mod.rsplit(".", 1)[-1]
        if leaf not in dims:  # a module the config does not describe: the base's weights must have it
            if base_names is None:
                base_names = set(_weight_files(Path(base_model)))
            if base_names and f"{mod}.weight" not in base_names and leaf != "lm_head":  # lm_head: maybe tied
                raise VllmTrainError(f"{weights}: tensor {_key(mod, 'A')} is for module '{mod}', which "
                                     f"'{base_model}' does not have: adapter is for another base model")
            continue
        fan_in, fan_out = dims[leaf]
        r = ab["A"][0]
        for half, want in (("A", (r, fan_in)), ("B", (fan_out, r))):
            if tuple(ab[half]) != want:
                raise VllmTrainError(f"{weights}: tensor {_key(mod, half)} has shape {_shape(ab[half])} but "
                                     f"'{base_model}' needs {want}: adapter is for another base model")


def _check_magnitude(config: dict, state: dict[str, torch.Tensor], pairs: dict, weights: Path, base_model: Path,
                     max_ratio: float) -> None:
    """Refuse a module whose update ||scaling * B A||_F exceeds `max_ratio` x ||W||_F of its base weight.
    ||B A||_F^2 = sum((B^T B) * (A A^T)) costs r x r; W's norm is estimated from its first rows."""
    if not math.isfinite(max_ratio):
        return
    base_norms = _base_weight_norms(base_model, [f"{mod}.weight" for mod in pairs])
    alphas = config.get("alpha_pattern") or {}
    for mod in pairs:
        w_norm = base_norms.get(f"{mod}.weight")
        if not w_norm:
            continue  # not in the base's files (or unreadable): the loader reports it
        a, b = state[_key(mod, "A")].double(), state[_key(mod, "B")].double()
        alpha = next((v for pattern, v in alphas.items() if _pattern_matches(mod, pattern)),
                     config.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(a.shape[0]) if config.get("use_rslora") else a.shape[0])
        delta = scaling * math.sqrt(max(0.0, float(((b.T @ b) * (a @ a.T)).sum())))
        if not delta <= max_ratio * w_norm:
            raise VllmTrainError(f"{weights}: module {mod}: the adapter's update has norm {delta:.3g}, "
                                 f"{delta / w_norm:.3g}x that of the base weight ({w_norm:.3g}); more than "
                                 f"{max_ratio:g}x is refused (weights of a diverged run?)")


def _base_weight_norms(model_dir: Path, names: list[str]) -> dict[str, float]:
    """Frobenius norm of each named weight of a safetensors model directory, estimated from its first
    `BASE_ROWS_READ` rows (only those are read); {} when the files cannot be read."""
    from safetensors import safe_open

    try:
        where = _weight_files(model_dir)
        norms = {}
        for file in sorted({where[n] for n in names if n in where}):
            with safe_open(str(model_dir / file), "pt") as handle:
                for name in (n for n in names if where.get(n) == file):
                    part = handle.get_slice(name)
                    rows = part.get_shape()[0]
                    block = part[:min(rows, BASE_ROWS_READ)].double()
                    norms[name] = float(block.norm()) * math.sqrt(rows / max(1, block.shape[0]))
        return norms
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return {}


def _weight_files(model_dir: Path) -> dict[str, str]:
    """Weight name -> the safetensors file of `model_dir` holding it (from the index, else the headers);
    {} when they cannot be read (the model loader reports that)."""
    from safetensors import safe_open

    try:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        where = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                where.update(dict.fromkeys(handle.keys(), file.name))
        return where
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return {}


def _text_config(config_file: Path) -> dict:
    """The decoder's config (``text_config`` of multimodal models); {} when unreadable (then the shapes
    go unchecked here and the model loader reports the broken file)."""
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    text = cfg.get("text_config", cfg)
    return text if isinstance(text, dict) else {}


def expected_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of the LoRA-able projections of a decoder from its config.json, fused ones
    included (their outputs are the sums of their parts')."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size")
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden)}
    if isinstance(inter, int):
        dims.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    for fused, parts in FUSED_PROJECTIONS.items():
        if all(p in dims for p in parts):
            dims[fused] = (dims[parts[0]][0], sum(dims[p][1] for p in parts))
    return dims


def _matches(module: str, target: str) -> bool:
    """PEFT's matching of a target_modules entry: the full path or its dotted suffix."""
    return module == target or module.endswith(f".{target}")


def _pattern_matches(module: str, pattern: str) -> bool:
    """PEFT's matching of a rank_pattern key: a regex for the path's end."""
    try:
        return re.match(rf"(.*\.)?({pattern})$", module) is not None
    except re.error:
        return _matches(module, pattern)


def _same_model(a: str, b: str) -> bool:
    a, b = repo_id_of(a), repo_id_of(b)  # a hub-cache snapshot directory is its hub id
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def _key(module: str, half: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{half}.weight"


def _shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape)
