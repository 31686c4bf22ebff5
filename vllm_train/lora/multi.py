"""Many LoRA adapters over one frozen model, trained in one forward/backward.

Each row of a batch names its adapter by slot id (-1: none); each adapter has its own parameters (A (r, in)
and B (out, r), fp32), rank, scaling alpha/r and target modules, so each can have its own optimizer over
`MultiLoRAModel.parameters_of(slot)` alone. Rows never mix in a transformer, so an adapter's gradient from a
mixed batch is the one it gets from its own rows alone.

`MultiLoRALinear` computes a layer's deltas for a batch of several adapters in one of two ways, same numbers:
- grouped: the rows sorted by adapter, two `torch._grouped_mm` calls over the adapters' A and B stacked and
  zero-padded to the largest rank (padding adds zero hidden columns and zero B columns: nothing). Used where
  the build has the kernel for the device and compute dtype -- probed once per pair (`grouped_mm_works`):
  torch 2.13's CPU build has it for fp32 and bf16 (not fp64), forward and backward -- and the layer's sizes
  meet the kernel's 16-byte stride rule (in and out features multiples of 4 in fp32, 8 in bf16).
- loop: per adapter, its rows gathered (`index_select`), its delta by the single-adapter kernel
  (`LoRADelta`), added back into those rows (`index_add_`).
`GROUPED_MM` picks: None probes (the default), False forces the loop, True the grouped kernel wherever the
layer's sizes allow it (tests). A batch whose rows all use one adapter takes the single-adapter kernel.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import TrainableLoRALinear

GROUPED_MM: bool | None = None
STRIDE_BYTES = 16  # torch._grouped_mm wants every stride (but the innermost) a multiple of 16 bytes


class RowPlan:
    """Which rows of the current batch each adapter slot owns, and the index tensors every layer of one
    forward reuses (built once per device)."""

    def __init__(self, adapter_index_B: Sequence[int]):
        self.num_rows = len(adapter_index_B)
        rows_of: dict[int, list[int]] = {}
        for row, slot in enumerate(adapter_index_B):
            if slot >= 0:
                rows_of.setdefault(slot, []).append(row)
        self.rows_of = dict(sorted(rows_of.items()))  # slot -> its rows, slots ascending
        self._tensors: dict[tuple, torch.Tensor] = {}

    def rows(self, slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(R,) int64: the rows of `slots`, slot after slot."""
        key = ("rows", slots, device)
        if key not in self._tensors:
            rows = [row for slot in slots for row in self.rows_of[slot]]
            self._tensors[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._tensors[key]

    def token_offsets(self, slots: tuple[int, ...], tokens_per_row: int, device: torch.device) -> torch.Tensor:
        """(G,) int32: where each slot's tokens end in the sorted rows (`torch._grouped_mm`'s ``offs``)."""
        key = ("offsets", slots, tokens_per_row, device)
        if key not in self._tensors:
            ends = itertools.accumulate(len(self.rows_of[slot]) * tokens_per_row for slot in slots)
            self._tensors[key] = torch.tensor(list(ends), dtype=torch.int32, device=device)
        return self._tensors[key]

    def owns_every_row(self, slot: int) -> bool:
        return len(self.rows_of.get(slot, ())) == self.num_rows


class RowRouting:
    """The current batch's `RowPlan`, shared by every `MultiLoRALinear` of a model."""

    def __init__(self):
        self.plan: RowPlan | None = None

    @contextlib.contextmanager
    def rows(self, adapter_index_B: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Inside the block, row b of every input uses adapter slot ``adapter_index_B[b]`` (-1: none).
        Backward must run inside the block too where activations are recomputed (gradient checkpointing)."""
        if isinstance(adapter_index_B, torch.Tensor):
            adapter_index_B = adapter_index_B.tolist()
        previous, self.plan = self.plan, RowPlan([int(slot) for slot in adapter_index_B])
        try:
            yield
        finally:
            self.plan = previous


def _alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: sizes of a grouped matmul's inner dimensions are multiples of this."""
    return max(1, STRIDE_BYTES // dtype.itemsize)


def grouped_delta(x_NI: torch.Tensor, a_GRI: torch.Tensor, b_GOR: torch.Tensor,
                  offsets_G: torch.Tensor) -> torch.Tensor:
    """(N, out): token n's ``x @ A_g.T @ B_g.T`` for the group g whose span of `offsets_G` holds n (rows
    past the last offset are left undefined). B carries the scaling already."""
    hidden_NR = torch._grouped_mm(x_NI, a_GRI.transpose(1, 2), offs=offsets_G)
    return torch._grouped_mm(hidden_NR, b_GOR.transpose(1, 2), offs=offsets_G)


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `grouped_delta` runs forward and backward on this device type and dtype and agrees with
    plain matmuls: probed once, on tiny tensors (a build or a GPU without the kernel raises)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)  # the probe leaves the global random state alone
    align = _alignment(dtype)
    x_NI, a_GRI, b_GOR = (torch.randn(shape, generator=gen).to(device_type, dtype).requires_grad_(True)
                          for shape in ((6, 2 * align), (2, align, 2 * align), (2, 2 * align, align)))
    offsets_G = torch.tensor([2, 6], dtype=torch.int32, device=device_type)
    try:
        with torch.autocast(device_type, enabled=False):
            out_NO = grouped_delta(x_NI, a_GRI, b_GOR, offsets_G)
            out_NO.backward(torch.ones_like(out_NO))
    except (RuntimeError, NotImplementedError):
        return False
    expected_NO = torch.cat([x_NI[:2] @ a_GRI[0].T @ b_GOR[0].T, x_NI[2:] @ a_GRI[1].T @ b_GOR[1].T]).detach()
    agrees = torch.allclose(out_NO.detach().float(), expected_NO.float(), rtol=2e-2, atol=2e-2)
    return agrees and x_NI.grad is not None


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus one `TrainableLoRALinear` per adapter slot that adapts
    it (``adapters``, keyed by ``str(slot)``). Row b of a (B, ..., in) input gets the delta of the adapter
    that ``routing.plan`` names for row b; rows of no adapter (or of one that skips this layer) get the
    base output alone. Compute dtype as in `LoRADelta`: the input's when half precision, else fp32."""

    def __init__(self, base_layer: nn.Linear, routing: RowRouting):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.adapters = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `module.weight` (dtype, device) keeps working
        return self.base_layer.weight

    def add(self, slot: int, lora: TrainableLoRALinear) -> None:
        base = self.base_layer
        assert (lora.in_features, lora.out_features) == (base.in_features, base.out_features)
        self.adapters[str(slot)] = lora

    def remove(self, slot: int) -> None:
        if str(slot) in self.adapters:
            del self.adapters[str(slot)]

    def forward(self, x_BxI: torch.Tensor) -> torch.Tensor:
        plan = self.routing.plan
        if plan is None:
            raise VllmTrainError("a multi-LoRA model runs inside rows(adapter_index_B): the adapter slot of each "
                                 "row (-1: the base model)")
        if x_BxI.shape[0] != plan.num_rows:
            raise VllmTrainError(f"rows(): {plan.num_rows} adapter indices for a batch of {x_BxI.shape[0]} rows")
        out_BxO = self.base_layer(x_BxI)
        slots = tuple(slot for slot in plan.rows_of if str(slot) in self.adapters)
        if not slots:
            return out_BxO
        if len(slots) == 1 and plan.owns_every_row(slots[0]):
            return self.adapters[str(slots[0])](x_BxI, out_BxO)
        half = x_BxI.dtype in (torch.float16, torch.bfloat16)
        compute = x_BxI.dtype if half else self.adapters[str(slots[0])].lora_a.dtype
        # The frozen base's output is not saved for backward: the deltas are added into it in place
        if self._grouped(compute, x_BxI.device):
            delta_RxO = self._grouped_delta(x_BxI, slots, plan, compute)
            return out_BxO.index_add_(0, plan.rows(slots, x_BxI.device), delta_RxO.to(out_BxO.dtype))
        for slot in slots:
            rows_R = plan.rows((slot,), x_BxI.device)
            delta_RxO = self.adapters[str(slot)].delta(x_BxI.index_select(0, rows_R))
            out_BxO.index_add_(0, rows_R, delta_RxO.to(out_BxO.dtype))
        return out_BxO

    def _grouped(self, compute: torch.dtype, device: torch.device) -> bool:
        align = _alignment(compute)
        fits = self.base_layer.in_features % align == 0 and self.base_layer.out_features % align == 0
        if GROUPED_MM is not None:
            return GROUPED_MM and fits
        return fits and grouped_mm_works(device.type, compute)

    def _grouped_delta(self, x_BxI: torch.Tensor, slots: tuple[int, ...], plan: RowPlan,
                       compute: torch.dtype) -> torch.Tensor:
        """(R, ..., out): the deltas of the rows of `slots`, slot after slot."""
        loras = [self.adapters[str(slot)] for slot in slots]
        align = _alignment(compute)
        rank = -(-max(lora.rank for lora in loras) // align) * align  # the largest rank, rounded up to align
        with torch.autocast(x_BxI.device.type, enabled=False):
            a_GRI = torch.stack([F.pad(lora.lora_a, (0, 0, 0, rank - lora.rank)) for lora in loras]).to(compute)
            b_GOR = torch.stack([F.pad(lora.lora_b * lora.scaling, (0, rank - lora.rank)) for lora in loras])
            x_RxI = x_BxI.index_select(0, plan.rows(slots, x_BxI.device))
            tokens_per_row = x_RxI[0].numel() // x_RxI.shape[-1]
            offsets_G = plan.token_offsets(slots, tokens_per_row, x_BxI.device)
            x_NI = x_RxI.reshape(-1, x_RxI.shape[-1]).to(compute)
            delta_NO = grouped_delta(x_NI, a_GRI, b_GOR.to(compute), offsets_G)
        return delta_NO.view(*x_RxI.shape[:-1], delta_NO.shape[-1])

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{slot}: r={lora.rank}" for slot, lora in self.adapters.items())
        return f"in={self.base_layer.in_features}, out={self.base_layer.out_features}, adapters={{{ranks}}}"
