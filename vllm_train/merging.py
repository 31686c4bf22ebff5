"""Merge a LoRA adapter into its base model: a plain Hugging Face model directory that HF and vLLM load.

The merge runs in fp32 (``W + scaling * B @ A`` added before any rounding), then the weights are cast to
the base checkpoint's own dtype (or the one asked for) and written to a temporary directory beside the
output, which is renamed into place: an interrupted merge leaves no half-written model. Weights that are not
finite after the cast (an adapter that overflows the dtype) are refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vllm_train import models, run_manifest
from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import LoRAWrappedLinear
from vllm_train.outputs import check_finite, write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_name: str) -> torch.dtype:
    """The dtype the base checkpoint declares in config.json (fp32 when it names none)."""
    config = json.loads((Path(model_name) / "config.json").read_text())
    return DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)


def merge_adapter(model_name: str, adapter: str, output_dir: str | Path, dtype: str = "auto",
                  overwrite: bool = False) -> Path:
    """Write base + adapter, merged, as a full model directory `output_dir`; returns it. A non-empty
    `output_dir` is refused unless `overwrite` and it holds an earlier vllm-train output (then that
    output's files are replaced once the new model is complete; other files stay, and neither input
    may be inside it: `run_manifest.plan_overwrite`). Weights that are not finite after the merge and
    the cast (an adapter that overflows the dtype) are refused before anything is written.
    `dtype`: auto (the base checkpoint's), float32, bfloat16 or float16."""
    if dtype != "auto" and dtype not in DTYPES:
        raise VllmTrainError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise VllmTrainError(f"--output-dir {out} exists and is not a directory")
    inputs = {"--model": model_name, "--adapter": adapter}
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not overwrite:
        raise VllmTrainError(f"--output-dir {out} exists and is not empty (pass --overwrite to replace it)")
    if replacing:
        run_manifest.plan_overwrite(out, inputs, ())  # refused here, before the merge, if it may not be
    model, tokenizer = _merged_model(model_name, adapter, DTYPES[dtype] if dtype != "auto" else
                                     checkpoint_dtype(model_name))
    check_finite(model.state_dict(), out / "model.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"kind": "merge", "model": str(model_name), "adapter": str(adapter), "dtype": dtype}
        _record_output(tmp, record)
        if replacing:
            names = [p.name for p in tmp.iterdir()]
            run_manifest.plan_overwrite(out, inputs, names).carry_out()
            for name in sorted(names, key=_move_order):  # weights first, config, then marker and manifest
                os.replace(tmp / name, out / name)
        else:
            if out.exists():
                out.rmdir()  # empty
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merged_model(model_name: str, adapter: str, dtype: torch.dtype):
    """(model, tokenizer): the base with each LoRA layer folded into its linear (fp32), cast to `dtype`."""
    config = models.config_for_adapter(adapter, precision="fp32")
    model, tokenizer, _ = models.load_policy(model_name, config, adapter)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRAWrappedLinear):
                linear = module.base_layer
                linear.weight.copy_(module.lora.merged_weight(linear.weight))
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, linear)
    model.to(dtype)
    model.config.use_cache = True
    return model, tokenizer


def _record_output(directory: Path, record: dict) -> None:
    """Make `directory` a vllm-train output: the run marker (what was merged) and a manifest of its files,
    so that a later merge --overwrite knows which files are the merge's."""
    run_manifest.start(directory)
    write_text(directory / run_manifest.RUN_MARKER, json.dumps(record, indent=2) + "\n")
    for path in directory.iterdir():
        if path.name != run_manifest.MANIFEST:
            run_manifest.note(path)


def _move_order(name: str) -> tuple[int, str]:
    last = {"config.json": 1, run_manifest.RUN_MARKER: 2, run_manifest.MANIFEST: 3}
    return last.get(name, 0), name
