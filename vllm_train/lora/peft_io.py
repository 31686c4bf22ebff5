"""PEFT's adapter file format: the names, and reading and writing an adapter directory.

PEFT format = ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank),
B unscaled. vLLM (``LoRARequest``), PEFT (``PeftModel.from_pretrained``) and ``vllm serve
--lora-modules`` read these files unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vllm_train.errors import VllmTrainError
from vllm_train.files import json_problem, read_text
from vllm_train.outputs import save_weights, write_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# vLLM fuses these projections; their LoRAs stay per logical projection (PEFT's names), in slice order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

ADAPTER_CARD = """---
library_name: peft
base_model: {base}
tags: [lora, vllm-train, {kind}]
---
# LoRA adapter ({kind})

Trained with vllm-train from `{base}`: rank {rank}, alpha {alpha}, target modules {targets},
{steps} optimizer steps. PEFT format: load with `PeftModel.from_pretrained(base, DIR)`, or serve with
vLLM via `LoRARequest(name, id, DIR)` / `vllm serve ... --enable-lora --lora-modules name=DIR`.
"""


def peft_key(module_path: str, matrix: str) -> str:
    """The file key of a module's LoRA matrix `matrix` ("A" or "B")."""
    return f"{PEFT_PREFIX}{module_path}.lora_{matrix}.weight"


def lora_adapter_config(rank: int, alpha: float, modules: list[str], base_model_name_or_path: str | None,
                        dropout: float = 0.0, use_rslora: bool = False) -> dict:
    """``adapter_config.json`` of a LoRA adapter on `modules` (leaf names), as PEFT writes it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(modules),
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def adapter_card(base: str, kind: str, config, steps: int) -> str:
    """The README.md written beside an adapter: what it was trained from and how to load it.
    `config` is the run's LoRATrainConfig (rank, alpha, target_modules)."""
    return ADAPTER_CARD.format(base=base, kind=kind, rank=config.rank, alpha=config.alpha,
                               targets=", ".join(config.target_modules), steps=steps)


def read_adapter_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT adapter dir; one-line errors for anything missing/corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise VllmTrainError(f"adapter directory not found: {path}")
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise VllmTrainError(f"{path}: missing {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not weights_file.is_file():
        raise VllmTrainError(f"{path}: missing {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    try:
        config = json.loads(read_text(config_file))
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{config_file}:{exc.lineno}: malformed JSON ({json_problem(exc)})") from None
    if not isinstance(config, dict):
        raise VllmTrainError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise VllmTrainError(f"{config_file}: not a LoRA adapter config (needs peft_type LORA and 'r')")
    try:
        state = load_file(str(weights_file))
    except Exception as exc:
        raise VllmTrainError(f"{weights_file}: cannot read safetensors ({exc})") from None
    return config, state


def write_adapter_dir(path: str | Path, state: dict[str, torch.Tensor], config: dict,
                      card: str | None = None) -> Path:
    """Write the adapter files into `path`, each to a temp file first and then renamed into place, so a
    reader never sees a half-written file. Weights go first, checked finite (`outputs.save_weights`: NaN or
    inf fails the save and keeps the previous adapter whole): a config always finds its weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_weights(state, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_text(path / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    if card:
        write_text(path / "README.md", card)
    return path
