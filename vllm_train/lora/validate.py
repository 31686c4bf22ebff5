"""Check a PEFT adapter directory against a base model before anything loads it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vllm_train.errors import VllmTrainError
from vllm_train.lora.injector import ADAPTER_CONFIG, PEFT_PREFIX, read_adapter_dir


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


def _expected_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of the LoRA-able projections of a decoder from its config.json."""
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    if not hidden or not heads:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size")
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden)}
    if inter:
        dims.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    return dims


def validate_adapter(adapter_dir: str | Path, base_model: str | None = None,
                     max_lora_rank: int | None = None) -> dict:
    """Check a PEFT adapter directory before any server sees it: both files readable, A/B pairs with
    the configured rank, rank <= `max_lora_rank`, trained on `base_model` (name and tensor shapes, when
    the base model's config.json is readable here). Returns the adapter config; raises `VllmTrainError`."""
    path = Path(adapter_dir)
    config, state = read_adapter_dir(path)
    where = path / ADAPTER_CONFIG
    try:
        rank = int(config["r"])
    except (TypeError, ValueError):
        raise VllmTrainError(f"{where}: field 'r' must be an integer, got {config['r']!r}") from None
    ranks = [rank] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    top = max(ranks)
    if max_lora_rank is not None and top > max_lora_rank:
        raise VllmTrainError(f"{where}: adapter rank r={top} is above the server's max_lora_rank "
                             f"{max_lora_rank} (start the server with --max-lora-rank >= {top})")
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        m = re.match(rf"^{re.escape(PEFT_PREFIX)}(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$", key)
        if not m:
            continue
        pairs.setdefault(m["mod"], {})[m["ab"]] = tuple(tensor.shape)
    if not pairs:
        raise VllmTrainError(f"{path}: adapter_model.safetensors holds no '{PEFT_PREFIX}*.lora_A/B.weight' "
                             f"tensors")
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise VllmTrainError(f"{path}: tensors of {mod} are not a LoRA A/B pair ({ab})")
        if ab["A"][0] > top:
            raise VllmTrainError(f"{path}: {mod} has rank {ab['A'][0]} but {ADAPTER_CONFIG} says r={rank}")
    if base_model is None:
        return config
    trained_on = config.get("base_model_name_or_path")
    if trained_on and not _same_model(str(trained_on), base_model):
        raise VllmTrainError(f"{where}: adapter was trained on base model '{trained_on}' but the server "
                             f"serves '{base_model}'")
    model_config = Path(base_model) / "config.json"
    if model_config.is_file():
        try:
            cfg = json.loads(model_config.read_text())
            cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
        except (OSError, json.JSONDecodeError):
            cfg = {}
        dims = _expected_dims(cfg)
        layers = cfg.get("num_hidden_layers")
        for mod, ab in pairs.items():
            leaf = mod.rsplit(".", 1)[-1]
            layer = re.search(r"\.layers\.(\d+)\.", f".{mod}.")
            if layers and layer and int(layer[1]) >= layers:
                raise VllmTrainError(f"{path}: {mod} does not exist in '{base_model}' ({layers} layers): "
                                     f"adapter is for another base model")
            if leaf in dims and (ab["A"][1], ab["B"][0]) != dims[leaf]:
                raise VllmTrainError(f"{path}: {mod} is {ab['A'][1]}->{ab['B'][0]} but '{base_model}' has "
                                     f"{dims[leaf][0]}->{dims[leaf][1]}: adapter is for another base model")
    return config
