"""Put trainable LoRA layers into a frozen model, and save/load them in PEFT's file format.

PEFT format = ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank),
B unscaled. vLLM (``LoRARequest``), PEFT (``PeftModel.from_pretrained``) and ``vllm serve
--lora-modules`` read these files unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import FusedLoRALinear, LoRAWrappedLinear, TrainableLoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# vLLM fuses these projections; their LoRAs stay per logical projection (PEFT's names).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class LoRAInjector:
    """Inject trainable LoRA layers into the target linears of a model.

    ``lora_layers`` maps each logical module path (PEFT naming, e.g.
    ``model.layers.0.self_attn.q_proj``) to its `TrainableLoRALinear`. Works on Hugging Face models
    (``nn.Linear``) and on vLLM-style fused ``qkv_proj`` / ``gate_up_proj`` layers.
    """

    def __init__(self, config: LoRATrainConfig):
        self.config = config
        self.lora_layers: dict[str, TrainableLoRALinear] = {}

    def _new_lora(self, in_features: int, out_features: int, like: torch.Tensor | None) -> TrainableLoRALinear:
        c = self.config
        lora = TrainableLoRALinear(in_features, out_features, c.rank, c.alpha, c.dropout, c.use_rslora)
        return lora.to(device=like.device) if like is not None and like.device.type != "meta" else lora

    def inject(self, model: nn.Module) -> nn.Module:
        """Freeze every parameter of `model`, then wrap each target linear with a trainable LoRA."""
        for p in model.parameters():
            p.requires_grad_(False)
        targets = set(self.config.target_modules)
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (LoRAWrappedLinear, FusedLoRALinear)):
                continue
            if leaf in targets and isinstance(module, nn.Linear):
                lora = self._new_lora(module.in_features, module.out_features, module.weight)
                _set_submodule(model, name, LoRAWrappedLinear(module, lora))
                self.lora_layers[name] = lora
            elif leaf in FUSED_PROJECTIONS and any(p in targets for p in FUSED_PROJECTIONS[leaf]):
                self._inject_fused(model, name, module, leaf)
        if not self.lora_layers:
            raise VllmTrainError(f"target_modules {sorted(targets)} match no linear layer of "
                                 f"{type(model).__name__}")
        return model

    def _inject_fused(self, model: nn.Module, name: str, module: nn.Module, leaf: str) -> None:
        sizes = fused_output_sizes(module, leaf)
        in_features = getattr(module, "input_size", None) or module.in_features
        prefix = name.rpartition(".")[0]  # "" for a top-level module
        loras = {}
        for proj, size in zip(FUSED_PROJECTIONS[leaf], sizes):
            lora = self._new_lora(in_features, size, next(module.parameters(), None))
            if proj not in self.config.target_modules:  # untargeted slice: a LoRA that stays disabled
                lora.disabled = True
                lora.requires_grad_(False)
            else:
                self.lora_layers[f"{prefix}.{proj}" if prefix else proj] = lora
            loras[proj] = lora
        _set_submodule(model, name, FusedLoRALinear(module, loras, sizes))

    def get_trainable_params(self) -> list[nn.Parameter]:
        """Only the LoRA A/B matrices, in a fixed order."""
        params = []
        for lora in self.lora_layers.values():
            params.extend([lora.lora_a, lora.lora_b])
        return params

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model's outputs (DPO/KL reference)."""
        before = {name: lora.disabled for name, lora in self.lora_layers.items()}
        for lora in self.lora_layers.values():
            lora.disabled = True
        try:
            yield
        finally:
            for name, lora in self.lora_layers.items():
                lora.disabled = before[name]

    def peft_state_dict(self, live: bool = False) -> dict[str, torch.Tensor]:
        """The adapter as PEFT names it: ``base_model.model.<path>.lora_A.weight`` (r, in) and
        ``...lora_B.weight`` (out, r). Default: fp32 contiguous CPU copies (for files). ``live=True``:
        detached views of the parameters themselves, on their device, no copy (for
        `VLLMEngine.sync_adapter`, which copies them into vLLM's slots)."""
        state = {}
        for name, lora in self.lora_layers.items():
            a, b = lora.lora_a.detach(), lora.lora_b.detach()
            if not live:
                a, b = a.float().contiguous().cpu(), b.float().contiguous().cpu()
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        return state

    def peft_config(self, base_model_name_or_path: str | None) -> dict:
        c = self.config
        modules = sorted({name.rsplit(".", 1)[-1] for name in self.lora_layers})
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": modules,
            "use_rslora": c.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }

    def save(self, path: str | Path, base_model_name_or_path: str | None = None,
             extra_tensors: dict[str, torch.Tensor] | None = None, card: str | None = None) -> Path:
        """Write a PEFT-format adapter directory atomically (written to a temp dir, then renamed)."""
        state = self.peft_state_dict()
        if extra_tensors:
            state.update({k: v.detach().float().contiguous().cpu() for k, v in extra_tensors.items()})
        config = self.peft_config(base_model_name_or_path)
        return write_adapter_dir(path, state, config, card)

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Load a PEFT-format adapter (ours or PEFT's) into the injected layers."""
        config, state = read_adapter_dir(path)
        if int(config.get("r", -1)) != self.config.rank:
            raise VllmTrainError(f"{path}: adapter rank r={config.get('r')} does not match config rank "
                                 f"{self.config.rank}")
        expected = self.peft_state_dict().keys()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise VllmTrainError(f"{path}: adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        for name, lora in self.lora_layers.items():
            lora.lora_a.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            lora.lora_b.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])


def fused_output_sizes(module: nn.Module, leaf: str) -> list[int]:
    """Per-projection output sizes of a fused vLLM linear (this rank's shard)."""
    if leaf == "qkv_proj":
        tp = getattr(module, "tp_size", 1)
        q = module.total_num_heads * module.head_size // tp
        kv = max(1, module.total_num_kv_heads // tp) * module.head_size
        v_head = getattr(module, "v_head_size", module.head_size)
        return [q, kv, max(1, module.total_num_kv_heads // tp) * v_head]
    tp = getattr(module, "tp_size", 1)
    return [size // tp for size in module.output_sizes]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise VllmTrainError(f"{config_file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
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
    reader never sees a half-written file. Weights go first: a config always finds its weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = [(ADAPTER_WEIGHTS, None), (ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")]
    if card:
        files.append(("README.md", card))
    for name, text in files:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        os.close(fd)
        try:
            if text is None:
                save_file(state, tmp, metadata={"format": "pt"})
            else:
                Path(tmp).write_text(text)
            os.replace(tmp, path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
