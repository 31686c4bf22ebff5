"""Adapters that are broken by value (for the validation tests of every command that reads one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
K_B = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"

# case -> the words the one-line error must contain (the tiny model: hidden 128, k/v out 64, rank 8)
BAD_VALUE_CASES = {
    "nan_weight": f"tensor {Q_B} holds 1 non-finite value(s)",
    "inf_alpha": "field 'lora_alpha' is inf, expected a finite number > 0",
    "int64_tensor": f"tensor {Q_A} has dtype int64",
    "wrong_shape": f"tensor {K_B} has shape (128, 8) but",
    "one_by_n": f"tensor {Q_A} has shape (1, 128) but adapter_config.json says rank 8",
    # finite, but it overflows every activation it touches (issue #31: it made every model on a server answer
    # HTTP 400): refused by magnitude, ||scaling B A|| against the base weight's norm
    "huge_values": "the adapter's update has norm",
}


def make_bad_adapter(good: Path, out: Path, case: str) -> Path:
    """A copy of the rank-8 adapter `good` with one defect `case` (a key of BAD_VALUE_CASES)."""
    shutil.copytree(good, out)
    weights, config_file = out / "adapter_model.safetensors", out / "adapter_config.json"
    state = load_file(weights)
    config = json.loads(config_file.read_text())
    if case == "nan_weight":
        state[Q_B][3, 1] = float("nan")
    elif case == "inf_alpha":
        config["lora_alpha"] = float("inf")  # json writes Infinity, which json (and PEFT) read back as inf
    elif case == "int64_tensor":
        state[Q_A] = (state[Q_A] * 100).long()
    elif case == "wrong_shape":
        state[K_B] = torch.zeros(128, 8)  # k_proj of the tiny model has 64 outputs (one KV head)
    elif case == "huge_values":
        state = {k: v * 1e30 if ".lora_B." in k else v for k, v in state.items()}
    elif case == "one_by_n":
        state[Q_A], state[Q_B] = state[Q_A][:1].clone(), state[Q_B][:, :1].clone()
    else:
        raise ValueError(case)
    save_file(state, weights)
    config_file.write_text(json.dumps(config))
    return out
