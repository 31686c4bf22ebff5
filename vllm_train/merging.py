"""Merge a LoRA adapter into its base model: a plain Hugging Face model directory that HF and vLLM load.

The merge runs in fp32 (``W + scaling * B @ A`` added before any rounding), then the weights are cast to
the base checkpoint's own dtype (or the one asked for) and written to a temporary directory beside the
output, which is renamed into place: an interrupted merge leaves no half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_train import models
from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import LoRAWrappedLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_name: str) -> torch.dtype:
    """The dtype the base checkpoint declares in config.json (fp32 when it names none)."""
    config = json.loads((Path(model_name) / "config.json").read_text())
    return DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)


def merge_adapter(model_name: str, adapter: str, output_dir: str | Path, dtype: str = "auto",
                  overwrite: bool = False) -> Path:
    """Write base + adapter, merged, as a full model directory `output_dir`; returns it. A non-empty
    `output_dir` is refused unless `overwrite` (then it is replaced once the new model is complete).
    `dtype`: auto (the base checkpoint's), float32, bfloat16 or float16."""
    if dtype != "auto" and dtype not in DTYPES:
        raise VllmTrainError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise VllmTrainError(f"--output-dir {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VllmTrainError(f"--output-dir {out} exists and is not empty (pass --overwrite to replace it)")
    config = models.config_for_adapter(adapter, precision="fp32")
    model, tokenizer, _ = models.load_policy(model_name, config, adapter)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRAWrappedLinear):
                linear = module.base_layer
                linear.weight.copy_(module.lora.merged_weight(linear.weight))
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, linear)
    model.to(DTYPES[dtype] if dtype != "auto" else checkpoint_dtype(model_name))
    model.config.use_cache = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)  # empty, or replaced with --overwrite
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
