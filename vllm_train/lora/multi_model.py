"""`MultiLoRAModel`: many LoRA adapters (tenants) over one frozen model, added and removed by slot id, each
trained by its own optimizer in a shared forward/backward, each saved and loaded in PEFT's format.

The wrapped layers are the ones `LoRAInjector` would wrap for the same target names (`is_linear_target`:
HF ``nn.Linear`` layers, an HF model's own fused linear through its parts' names); by default every linear
layer ("all-linear") plus the output head, so that any adapter's targets are among them. vLLM's fused
layers (a model loaded inside vLLM) are not supported. Each adapter adapts a subset of them: its targets.

Tinker's `create_model` switches map to target names (`MultiLoRAModel.tinker_targets`):
  train_attn    -> q_proj, k_proj, v_proj, o_proj
  train_mlp     -> gate_proj, up_proj, down_proj
  train_unembed -> the output head's name (lm_head)
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_train.config import ALL_LINEAR, engine_max_lora_rank
from vllm_train.errors import VllmTrainError
from vllm_train.lora.injector import all_linear_names, check_targets, is_linear_target, set_submodule
from vllm_train.lora.layers import FusedLoRALinear, LoRAWrappedLinear, TrainableLoRALinear
from vllm_train.lora.multi import MultiLoRALinear, RowRouting
from vllm_train.lora.peft_io import FUSED_PROJECTIONS, lora_adapter_config, peft_key

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


class AdapterInputError(VllmTrainError):
    """Bad input for an adapter operation; `field` names the argument (a server answers 400 naming it)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class Adapter:
    """One slot's adapter: its LoRA per adapted layer (module path -> layer), in the model's order."""

    rank: int
    alpha: float
    seed: int
    layers: dict[str, TrainableLoRALinear] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        """The adapted layers' leaf names (PEFT's ``target_modules``)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.layers})


class MultiLoRAModel:
    """Wraps the target linears of `model` (frozen) with `MultiLoRALinear` layers; adapters live in slots
    ``0 .. max_adapters - 1`` (any slot >= 0 when None). `target_modules`: the layers that adapters may
    adapt (leaf names, or ["all-linear"]); default all-linear plus the output head."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | None = None,
                 max_adapters: int | None = None):
        self.model, self.max_adapters = model, max_adapters
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
        self.all_linear = all_linear_names(model)  # "all-linear", read before any layer is wrapped
        if not target_modules:
            target_modules = [ALL_LINEAR, self.head_name] if self.head_name else [ALL_LINEAR]
        targets = set(self._expand(target_modules))
        check_targets(model, targets)
        for p in model.parameters():
            p.requires_grad_(False)
        self.routing = RowRouting()
        self.layers: dict[str, MultiLoRALinear] = {}  # module path -> layer, in the model's order
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (LoRAWrappedLinear, FusedLoRALinear, MultiLoRALinear)):
                raise VllmTrainError(f"{name}: the model already has LoRA layers")
            if isinstance(module, nn.Linear) and is_linear_target(model, leaf, targets):
                self.layers[name] = MultiLoRALinear(module, self.routing)
                set_submodule(model, name, self.layers[name])
            elif leaf in FUSED_PROJECTIONS and not isinstance(module, nn.Linear):
                raise VllmTrainError(f"{name}: vLLM's fused layers are not supported (load the model with HF)")
        if not self.layers:
            raise VllmTrainError(f"target_modules {sorted(targets)} match no linear layer of {type(model).__name__}")
        self.adapters: dict[int, Adapter] = {}

    def _expand(self, targets: Sequence[str]) -> list[str]:
        return [name for t in targets for name in (self.all_linear if t == ALL_LINEAR else [t])]

    def tinker_targets(self, train_attn: bool = True, train_mlp: bool = True,
                       train_unembed: bool = True) -> list[str]:
        """Tinker's `create_model` switches as target names (see the module docstring)."""
        names = (list(ATTENTION_MODULES) if train_attn else []) + (list(MLP_MODULES) if train_mlp else [])
        if train_unembed and self.head_name:
            names.append(self.head_name)
        if not names:
            raise AdapterInputError("targets", "train_attn, train_mlp and train_unembed are all off: "
                                               "nothing to train")
        return names

    def add_adapter(self, slot: int, rank: int, alpha: float, seed: int, targets: Sequence[str]) -> None:
        """A fresh adapter in `slot` on the wrapped layers that `targets` name (leaf names, or
        ["all-linear"]): A Kaiming-uniform, B zero (the model unchanged), as `LoRAInjector` does; A's values
        drawn in the model's layer order from a generator seeded with `seed` -- those of
        ``torch.manual_seed(seed)`` then `LoRAInjector.inject` on the same layers of an HF model."""
        self._check_new(slot, rank, alpha, seed)
        slot, rank, seed = int(slot), int(rank), int(seed)
        chosen = self._adapted_layers(targets)
        gen = torch.Generator().manual_seed(seed)
        adapter = Adapter(rank, float(alpha), seed)
        for name, layer in chosen.items():
            base = layer.base_layer
            lora = TrainableLoRALinear(base.in_features, base.out_features, rank, alpha, generator=gen)
            adapter.layers[name] = lora.to(base.weight.device)  # drawn on the CPU: the same values anywhere
        for name, lora in adapter.layers.items():
            self.layers[name].add(slot, lora)
        self.adapters[slot] = adapter

    def _check_new(self, slot: int, rank: int, alpha: float, seed: int) -> None:
        if not _is_int(slot) or slot < 0 or (self.max_adapters is not None and slot >= self.max_adapters):
            limit = f" below {self.max_adapters}" if self.max_adapters is not None else ""
            raise AdapterInputError("slot", f"{slot!r} is not an integer >= 0{limit}")
        if slot in self.adapters:
            raise AdapterInputError("slot", f"slot {slot} holds an adapter already (remove it first)")
        if not _is_int(rank) or rank < 1:
            raise AdapterInputError("rank", f"{rank!r} is not an integer >= 1")
        try:
            engine_max_lora_rank(rank)
        except VllmTrainError as exc:
            raise AdapterInputError("rank", str(exc).removeprefix("rank: ")) from None
        number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
        if not (number and math.isfinite(alpha) and alpha > 0):
            raise AdapterInputError("alpha", f"{alpha!r} is not a finite number > 0")
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise AdapterInputError("seed", f"{seed!r} is not an integer from 0 to 2**63 - 1")

    def _adapted_layers(self, targets: Sequence[str]) -> dict[str, MultiLoRALinear]:
        """The wrapped layers that `targets` name; every name must name one."""
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise AdapterInputError("targets", f"{targets!r} is not a non-empty list of module names")
        wanted = set(self._expand(targets))
        try:
            chosen = {name: layer for name, layer in self.layers.items()
                      if is_linear_target(self.model, name.rsplit(".", 1)[-1], wanted)}
        except VllmTrainError as exc:  # part of an HF fused linear
            raise AdapterInputError("targets", str(exc)) from None
        covered = set()  # the names the chosen layers answer to: their own, and an HF fused linear's parts'
        for name in chosen:
            leaf = name.rsplit(".", 1)[-1]
            covered |= {leaf, *FUSED_PROJECTIONS.get(leaf, ())}
        missed = sorted(wanted - covered)
        if missed:
            wrapped = sorted({name.rsplit(".", 1)[-1] for name in self.layers})
            raise AdapterInputError("targets", f"{', '.join(missed)} name no adaptable layer (those: "
                                               f"{', '.join(wrapped)})")
        return chosen

    def remove_adapter(self, slot: int) -> None:
        """Drop the adapter in `slot` from every layer: its parameters are freed once nothing else (an
        optimizer) holds them, and the slot takes a new adapter."""
        adapter = self._adapter(slot)
        for name in adapter.layers:
            self.layers[name].remove(slot)
        del self.adapters[slot]

    def _adapter(self, slot: int) -> Adapter:
        if slot not in self.adapters:
            raise AdapterInputError("slot", f"no adapter in slot {slot!r} (slots in use: {sorted(self.adapters)})")
        return self.adapters[slot]

    def parameters_of(self, slot: int) -> list[nn.Parameter]:
        """The adapter's A and B matrices, layer after layer in the model's order (fp32): its optimizer's."""
        return [p for lora in self._adapter(slot).layers.values() for p in (lora.lora_a, lora.lora_b)]

    @contextlib.contextmanager
    def rows(self, adapter_index_B: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Inside the block, row b of the model's input uses the adapter in slot ``adapter_index_B[b]`` (-1:
        none, the base model). A forward outside such a block is refused."""
        index = adapter_index_B.tolist() if isinstance(adapter_index_B, torch.Tensor) else list(adapter_index_B)
        unknown = [s for s in index if not _is_int(s) or (s != -1 and s not in self.adapters)]
        if unknown:
            raise AdapterInputError("adapter_index", f"{unknown[:3]} are not -1 or a slot in use "
                                                     f"({sorted(self.adapters)})")
        with self.routing.rows(index):
            yield

    def peft_state_dict(self, slot: int, live: bool = False) -> dict[str, torch.Tensor]:
        """The adapter as `LoRAInjector.peft_state_dict` gives its own: PEFT's key names, fp32 contiguous
        CPU copies (copies on the CPU too, where ``.cpu()`` would alias the parameters: a snapshot stays as
        it was while training goes on); ``live=True``: detached views of the parameters, no copy (for
        `VLLMEngine.sync_adapter`)."""
        state = {}
        for name, lora in self._adapter(slot).layers.items():
            for matrix, param in (("A", lora.lora_a), ("B", lora.lora_b)):
                tensor = param.detach()
                if not live:
                    tensor = tensor.to("cpu", torch.float32, copy=True).contiguous()
                state[peft_key(name, matrix)] = tensor
        return state

    def peft_config(self, slot: int, base_model_name_or_path: str | None) -> dict:
        """``adapter_config.json`` for the adapter, as `LoRAInjector.peft_config` writes it."""
        adapter = self._adapter(slot)
        return lora_adapter_config(adapter.rank, adapter.alpha, adapter.modules, base_model_name_or_path)

    @torch.no_grad()
    def load_peft_state_dict(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors (`peft_state_dict`'s keys and shapes, finite) into the adapter in `slot`;
        checked whole first, so a bad state changes nothing."""
        adapter = self._adapter(slot)
        expected = {peft_key(name, m): p for name, lora in adapter.layers.items()
                    for m, p in (("A", lora.lora_a), ("B", lora.lora_b))}
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or extra:
            raise AdapterInputError("state", f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), "
                                             f"{len(extra)} not of this adapter (e.g. {extra[:1]})")
        for key, param in expected.items():
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise AdapterInputError("state", f"{key} is {shape}, the adapter's is {tuple(param.shape)}")
            if not torch.isfinite(tensor).all():
                raise AdapterInputError("state", f"{key} holds NaN or infinite values")
        for key, param in expected.items():
            param.copy_(state[key])
