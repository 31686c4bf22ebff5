"""Trainable LoRA layers: the low-rank update, the wrapper that adds it to a frozen linear, and merging."""

from __future__ import annotations

import math

import torch
from torch import nn

from vllm_train.errors import VllmTrainError

# Set (True) on a frozen base weight that is a view of an inference engine's tensor (models.load_policy's
# `base_views`): writing it would change what the engine serves, so merging into it is refused
SHARED_WEIGHT = "shared_with_engine"


class LoRADelta(torch.autograd.Function):
    """``base_output + scaling * (x @ A.T) @ B.T``, or the delta alone when `base_output` is None, with a
    hand-written backward.

    Compute dtype: the activations' when they are half precision (a bf16 base on CUDA: as autocast and
    vLLM's own LoRA kernels do), else the weights' (fp32 on CPU). A and B stay fp32 either way (the
    optimizer's master copy) and get fp32 gradients. Autocast is switched off inside, so the dtype is
    this rule's and not autocast's. Backward keeps `x` in its own dtype (autograd would save a cast
    copy per LoRA: q, k and v each make one), while `x` itself is saved by the frozen base layer anyway.
    Fewer passes over output-sized tensors: the second matmul adds into `base_output` and scales in the
    same kernel (``addmm``), and backward applies the scaling to rank-r tensors, not to the output-sized
    gradient.
    Saved: x (..., in), A and B in the compute dtype and the small hidden (N, r).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                base_output: torch.Tensor | None = None) -> torch.Tensor:
        compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else lora_a.dtype
        out_shape = (*x.shape[:-1], lora_b.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            a, b = lora_a.to(compute), lora_b.to(compute)  # (r, in), (out, r)
            hidden = x.to(compute).reshape(-1, a.shape[1]) @ a.T  # (N, r), N = tokens
            ctx.save_for_backward(x, a, b, hidden)
            ctx.scaling, ctx.param_dtype = scaling, lora_a.dtype
            if base_output is not None and base_output.dtype == compute:
                return torch.addmm(base_output.reshape(-1, b.shape[0]), hidden, b.T, alpha=scaling).view(out_shape)
            delta = (hidden @ b.T).mul_(scaling).view(out_shape)  # (..., out)
            return delta if base_output is None else base_output + delta.to(base_output.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, a, b, hidden = ctx.saved_tensors
        rank, in_features = a.shape
        grad_NO = grad_output.reshape(-1, b.shape[0]).to(a.dtype)  # (N, out)
        grad_hidden = (grad_NO @ b).mul_(ctx.scaling)  # (N, r)
        grad_x = grad_a = grad_b = grad_base = None
        if ctx.needs_input_grad[2]:
            grad_b = (grad_NO.T @ hidden).mul_(ctx.scaling).to(ctx.param_dtype)  # (out, r)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_hidden.T @ x.reshape(-1, in_features).to(a.dtype)).to(ctx.param_dtype)  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ a).to(x.dtype).view(x.shape)  # (..., in)
        if ctx.needs_input_grad[4]:
            grad_base = grad_output
        return grad_x, grad_a, grad_b, None, grad_base


class TrainableLoRALinear(nn.Module):
    """The trainable part of a LoRA layer: ``base_output + scaling * dropout(x) @ A.T @ B.T``.

    A is (rank, in_features), Kaiming-uniform initialised; B is (out_features, rank), zero-initialised,
    so a fresh adapter leaves the model unchanged. ``scaling`` is alpha/rank, or alpha/sqrt(rank) with
    rsLoRA. Set ``disabled = True`` to make forward return ``base_output`` untouched. `generator`: A's
    initial values come from it instead of torch's global generator (a seeded adapter that leaves the
    global random state alone).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    def delta(self, x: torch.Tensor, base_output: torch.Tensor | None = None) -> torch.Tensor:
        """The LoRA update, (..., in) -> (..., out): alone (in the compute dtype), or added to `base_output`."""
        return LoRADelta.apply(self.dropout(x), self.lora_a, self.lora_b, self.scaling, base_output)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """Add the LoRA contribution to `base_output` (the frozen layer's output for `x`)."""
        if self.disabled:
            return base_output
        return self.delta(x, base_output)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in): what merging adds to the base weight."""
        return (self.lora_b @ self.lora_a) * self.scaling

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (out, in) + scaling * B @ A, added in fp32 and returned in `weight`'s dtype."""
        return (weight.float() + self.delta_weight().float()).to(weight.dtype)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> None:
        weight.copy_(self.merged_weight(weight))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        weight.copy_((weight.float() - self.delta_weight().float()).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


class LoRAWrappedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a `TrainableLoRALinear` (``lora``)."""

    def __init__(self, base_layer: nn.Linear, lora: TrainableLoRALinear):
        super().__init__()
        self.base_layer = base_layer
        self.lora = lora
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `module.weight` (dtype, device) keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_output = self.base_layer(x)
        if self.merged:
            return base_output
        return self.lora(x, base_output)

    def merge(self) -> None:
        if getattr(self.base_layer.weight, SHARED_WEIGHT, False):
            raise VllmTrainError("cannot merge a LoRA into a base weight shared with the inference engine")
        if not self.merged:
            self.lora.merge_into(self.base_layer.weight.data)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.lora.unmerge_from(self.base_layer.weight.data)
            self.merged = False


class FusedLoRALinear(nn.Module):
    """LoRA for a fused projection (vLLM's ``qkv_proj`` / ``gate_up_proj``): one LoRA per logical
    projection, each added to its own slice of the fused output. ``base_layer`` may return a tensor
    or vLLM's ``(output, bias)`` tuple; the same shape is returned."""

    def __init__(self, base_layer: nn.Module, loras: dict[str, TrainableLoRALinear], slice_sizes: list[int]):
        super().__init__()
        assert len(loras) == len(slice_sizes)
        self.base_layer = base_layer
        self.loras = nn.ModuleDict(loras)
        self.slice_sizes = list(slice_sizes)

    def forward(self, x: torch.Tensor):
        out = self.base_layer(x)
        output, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        pieces = list(torch.split(output, self.slice_sizes, dim=-1))
        for i, lora in enumerate(self.loras.values()):
            pieces[i] = lora(x, pieces[i])
        output = torch.cat(pieces, dim=-1)
        return (output, *rest) if rest is not None else output


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every LoRA merged into its base linear, under the original names
    (CPU, contiguous): a plain checkpoint of the adapted model."""
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoRAWrappedLinear)}
    state = {}
    for key, tensor in model.state_dict().items():
        owner = next((n for n in wrapped if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = tensor.detach().contiguous().cpu()
        elif key == f"{owner}.base_layer.weight":
            state[f"{owner}.weight"] = wrapped[owner].lora.merged_weight(tensor).contiguous().cpu()
        elif key.startswith(f"{owner}.base_layer."):  # e.g. a bias
            state[f"{owner}.{key[len(owner) + len('.base_layer.'):]}"] = tensor.detach().contiguous().cpu()
    return state
