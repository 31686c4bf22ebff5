"""Megatron-style tensor parallelism for a LoRA-injected Hugging Face Llama/Qwen2-style causal LM.

`shard_tensor_parallel(model, mesh)` shards, in place, across the K ranks of a 1-D device mesh (the
tensor-parallel group):

- column-parallel ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``: base weight and bias
  split by output rows (``Shard(0)``), LoRA B by output rows, LoRA A replicated;
- row-parallel ``o_proj``, ``down_proj``: base weight split by input columns (``Shard(1)``), its bias
  replicated and added once after the all-reduce, LoRA A by input columns, LoRA B replicated;
- everything else (embeddings, norms, ``lm_head``, rotary buffers) stays a plain tensor that every rank
  holds and computes in full. The simplest layout; the vocab-sized ``lm_head`` is the next to shard.

So each rank's attention runs num_heads/K query heads and num_kv_heads/K key/value heads, and its MLP
intermediate_size/K columns. Recent transformers (checked with 5.x) reshape q/k/v with ``-1`` heads and
``num_key_value_groups`` (a ratio) is unchanged by the split; older ``num_heads`` attributes are divided.

Every parameter of a sharded linear becomes a `DTensor` on the mesh (``.full_tensor()`` gathers it; the
injector's save/load do). A LoRA-wrapped linear computes on the local shards with Megatron's two
conjugate collectives written out: a column layer all-reduces its input gradient once for the base and
the LoRA path together (torch's `ColwiseParallel` on the base layer would reduce the base path only);
a row layer applies the LoRA to its shard of the input and all-reduces base + LoRA output once (the
update is linear in the partial hidden ``x_k @ A_k.T`` because B is replicated). The replicated factor's
gradient (A in a column layer, B in a row layer) is a per-rank partial sum, all-reduced in backward, so
``.grad`` is the full gradient on every rank. Untargeted plain linears use torch's `ColwiseParallel` /
`RowwiseParallel` unchanged. `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` work on the DTensor
parameters (the norm is the global one).

Call it on every rank after `LoRAInjector.inject` and before building the optimizer. Rank 0's weights
win (sharding scatters/broadcasts them), so ranks whose LoRA A was initialised with different seeds end
up consistent. Dropout on a column layer's replicated input needs the same torch seed on every rank.
Not supported: vLLM-style fused layers, and merging a LoRA into a sharded weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import FusedLoRALinear, LoRADelta, LoRAWrappedLinear

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class _AllReduceInBackward(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # the engine may hand the same buffer to another consumer
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceInForward(torch.autograd.Function):
    """Forward sums over `group`; backward is the identity (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


class _ParallelLoRALinear(LoRAWrappedLinear):
    """A `LoRAWrappedLinear` whose parameters are DTensor shards on a 1-D `mesh`."""

    def __init__(self, wrapped: LoRAWrappedLinear, mesh: DeviceMesh):
        if wrapped.merged:
            raise VllmTrainError("unmerge the LoRA before sharding the model for tensor parallelism")
        super().__init__(wrapped.base_layer, wrapped.lora)
        self.mesh = mesh

    def merge(self) -> None:  # (unmerge stays: a no-op, since nothing was merged)
        raise VllmTrainError("merging a LoRA into a tensor-parallel (sharded) linear is not supported")


class ColumnParallelLoRALinear(_ParallelLoRALinear):
    """x (..., in) replicated -> this rank's output columns (..., out/K)."""

    @staticmethod
    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name == "base_layer":
            _shard_params(module, mesh, ("weight", "bias"), dim=0)
        elif name == "lora":
            _shard_params(module, mesh, ("lora_b",), dim=0)  # lora_a: replicated by distribute_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.mesh.get_group()
        x = _AllReduceInBackward.apply(x, group)  # base and LoRA input gradients, reduced together
        base_output = F.linear(x, _local(self.base_layer.weight), _local(self.base_layer.bias))
        lora = self.lora
        if lora.disabled:
            return base_output
        lora_a = _AllReduceInBackward.apply(lora.lora_a.to_local(), group)  # partial grads -> full
        return LoRADelta.apply(lora.dropout(x), lora_a, lora.lora_b.to_local(), lora.scaling, base_output)


class RowParallelLoRALinear(_ParallelLoRALinear):
    """x (..., in/K) this rank's input columns -> (..., out) replicated."""

    @staticmethod
    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name == "base_layer":
            _shard_params(module, mesh, ("weight",), dim=1)  # bias: replicated by distribute_module
        elif name == "lora":
            _shard_params(module, mesh, ("lora_a",), dim=1)  # lora_b: replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.mesh.get_group()
        partial = F.linear(x, _local(self.base_layer.weight))  # (..., out), this rank's share of the sum
        lora = self.lora
        if not lora.disabled:
            lora_b = _AllReduceInBackward.apply(lora.lora_b.to_local(), group)  # partial grads -> full
            partial = LoRADelta.apply(lora.dropout(x), lora.lora_a.to_local(), lora_b, lora.scaling, partial)
        output = _AllReduceInForward.apply(partial, group)
        bias = _local(self.base_layer.bias)
        return output if bias is None else output + bias


def _shard_params(module: nn.Module, mesh: DeviceMesh, names: tuple[str, ...], dim: int) -> None:
    for name in names:
        param = getattr(module, name, None)
        if param is not None:
            sharded = distribute_tensor(param.data, mesh, [Shard(dim)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def check_divisible(model: nn.Module, tp_size: int) -> None:
    """One-line errors when the attention heads or the MLP width do not split evenly over `tp_size`."""
    config = model.config
    heads = config.num_attention_heads
    sizes = {"num_attention_heads": heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
             "intermediate_size": config.intermediate_size}
    for field, size in sizes.items():
        if size % tp_size:
            raise VllmTrainError(f"tensor parallel size {tp_size} does not divide the model's {field} ({size})")


def shard_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the attention and MLP linears of a LoRA-injected HF causal LM over the 1-D `mesh`, in place."""
    if mesh.ndim != 1:
        raise VllmTrainError(f"tensor parallelism needs a 1-D device mesh, got {mesh.ndim} dimensions")
    tp_size = mesh.size()
    check_divisible(model, tp_size)
    sharded = 0
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(module, FusedLoRALinear):
            raise VllmTrainError(f"{name}: fused (vLLM-style) layers cannot be tensor-parallel trained")
        if leaf not in COLUMN_PARALLEL + ROW_PARALLEL or isinstance(module, _ParallelLoRALinear):
            continue
        column = leaf in COLUMN_PARALLEL
        if isinstance(module, LoRAWrappedLinear):
            kind = ColumnParallelLoRALinear if column else RowParallelLoRALinear
            parallel = kind(module, mesh)
            distribute_module(parallel, mesh, kind.partition)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, parallel)
        elif isinstance(module, nn.Linear):
            parallelize_module(module, mesh, ColwiseParallel() if column else RowwiseParallel())
        else:
            raise VllmTrainError(f"{name}: cannot shard a {type(module).__name__} (expected nn.Linear)")
        sharded += 1
    if not sharded:
        raise VllmTrainError(f"{type(model).__name__} has none of the linears "
                             f"{', '.join(COLUMN_PARALLEL + ROW_PARALLEL)} to shard")
    _split_attention_heads(model, tp_size)


def _split_attention_heads(model: nn.Module, tp_size: int) -> None:
    """Older transformers keep per-module head counts and reshape with them: give each rank its share."""
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            for attr in ("num_heads", "num_key_value_heads"):
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, getattr(module, attr) // tp_size)

