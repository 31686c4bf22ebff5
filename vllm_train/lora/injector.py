"""Put trainable LoRA layers into a frozen model, and save/load them in PEFT's file format
(`vllm_train.lora.peft_io`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from vllm_train import distributed
from vllm_train.config import ALL_LINEAR, LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import FusedLoRALinear, LoRAWrappedLinear, TrainableLoRALinear
from vllm_train.lora.peft_io import (
    FUSED_PROJECTIONS,
    lora_adapter_config,
    peft_key,
    read_adapter_dir,
    write_adapter_dir,
)


class LoRAInjector:
    """Inject trainable LoRA layers into the target linears of a model.

    ``lora_layers`` maps each logical module path (PEFT naming, e.g.
    ``model.layers.0.self_attn.q_proj``) to its `TrainableLoRALinear`. Works on Hugging Face models
    (``nn.Linear``) and on vLLM-style fused ``qkv_proj`` / ``gate_up_proj`` layers.
    """

    def __init__(self, config: LoRATrainConfig):
        self.config = config
        self.lora_layers: dict[str, TrainableLoRALinear] = {}
        self._live_state: dict[str, torch.Tensor] = {}  # `sync_states`' live views, for these storages:
        self._live_storage: list[int] = []

    def _new_lora(self, in_features: int, out_features: int, like: torch.Tensor | None) -> TrainableLoRALinear:
        c = self.config
        lora = TrainableLoRALinear(in_features, out_features, c.rank, c.alpha, c.dropout, c.use_rslora)
        return lora.to(device=like.device) if like is not None and like.device.type != "meta" else lora

    def inject(self, model: nn.Module) -> nn.Module:
        """Freeze every parameter of `model`, then wrap each target linear with a trainable LoRA.
        Target modules ["all-linear"] become the model's linear layer names here (the config records them)."""
        if self.config.target_modules == [ALL_LINEAR]:
            self.config.target_modules = all_linear_names(model)
        for p in model.parameters():
            p.requires_grad_(False)
        targets = set(self.config.target_modules)
        check_targets(model, targets)
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (LoRAWrappedLinear, FusedLoRALinear)):
                continue
            if isinstance(module, nn.Linear) and is_linear_target(model, leaf, targets):
                lora = self._new_lora(module.in_features, module.out_features, module.weight)
                set_submodule(model, name, LoRAWrappedLinear(module, lora))
                self.lora_layers[name] = lora
            elif leaf in FUSED_PROJECTIONS and any(p in targets for p in FUSED_PROJECTIONS[leaf]) \
                    and not isinstance(module, nn.Linear):
                self._inject_fused(model, name, module, leaf)
        if not self.lora_layers:
            raise VllmTrainError(f"target_modules {sorted(targets)} match no linear layer of "
                                 f"{type(model).__name__}")
        heads = sorted({name.rsplit(".", 1)[-1] for name in self.lora_layers} & set(OUTPUT_HEADS))
        if heads:
            warnings.warn(f"target_modules: {', '.join(heads)} (the output layer) is adapted, as asked by name: its "
                          f"LoRA spans the whole vocabulary or head", stacklevel=2)
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
        set_submodule(model, name, FusedLoRALinear(module, loras, sizes))

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

    def peft_state_dict(self, live: bool = False, local: bool = False) -> dict[str, torch.Tensor]:
        """The adapter as PEFT names it: ``base_model.model.<path>.lora_A.weight`` (r, in) and
        ``...lora_B.weight`` (out, r). Default: fp32 contiguous CPU copies (for files). ``live=True``:
        detached views of the parameters themselves, on their device, no copy (for
        `VLLMEngine.sync_adapter`, which copies them into vLLM's slots).

        Tensor parallel (`vllm_train.lora.tensor_parallel`, DTensor parameters): always the full,
        unsharded tensors -- gathered, so a collective that every rank of the group must call, and
        with ``live=True`` new tensors on the parameters' device rather than views. ``local=True`` (with
        ``live``): this rank's shards instead, views, no communication -- vLLM's tensor-parallel LoRA slots
        hold the same split, so `VLLMEngine.sync_adapter` writes them into this rank's slot as they are."""
        state = {}
        for name, lora in self.lora_layers.items():
            a, b = lora.lora_a.detach(), lora.lora_b.detach()
            a, b = (_local(a), _local(b)) if local and live else (_full(a), _full(b))
            if not live:
                a, b = a.float().contiguous().cpu(), b.float().contiguous().cpu()
            state[peft_key(name, "A")] = a
            state[peft_key(name, "B")] = b
        return state

    def sync_states(self):
        """(full, shards) for `VLLMEngine.sync_adapter`: the live tensors and None; under tensor
        parallelism a function that gathers the full tensors (called only for the public path) and this
        rank's shards (which the fast path writes into this rank's vLLM slot).

        The live tensors are views of the parameters' storage, which the optimizer updates in place, so
        they are built once and rebuilt only when a parameter's storage changed (moved, re-cast): building
        them took 0.85 ms a sync for 196 LoRA layers (2-core CPU), more than the slot write."""
        params = self.get_trainable_params()
        if any(isinstance(p, DTensor) for p in params):
            return (lambda: self.peft_state_dict(live=True)), self.peft_state_dict(live=True, local=True)
        storage = [p.data_ptr() for p in params]
        if storage != self._live_storage:
            self._live_state, self._live_storage = self.peft_state_dict(live=True), storage
        return self._live_state, None

    def peft_config(self, base_model_name_or_path: str | None) -> dict:
        c = self.config
        modules = sorted({name.rsplit(".", 1)[-1] for name in self.lora_layers})
        return lora_adapter_config(c.rank, c.alpha, modules, base_model_name_or_path, c.dropout, c.use_rslora)

    def save(self, path: str | Path, base_model_name_or_path: str | None = None, card: str | None = None) -> Path:
        """Write a PEFT-format adapter directory (each file to a temp name first, then renamed).
        Under torchrun every rank must call it (with tensor parallelism the gather is a collective);
        rank 0 writes the ordinary full adapter, the others write nothing."""
        state = self.peft_state_dict()
        if not distributed.is_main():  # under torchrun every rank holds the same adapter: rank 0 writes
            return Path(path)
        return write_adapter_dir(path, state, self.peft_config(base_model_name_or_path), card)

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Load a PEFT-format adapter (ours or PEFT's) into the injected layers; into a tensor-parallel
        model each rank keeps its own shard of the full tensors (no communication)."""
        config, state = read_adapter_dir(path)
        if int(config.get("r", -1)) != self.config.rank:
            raise VllmTrainError(f"{path}: adapter rank r={config.get('r')} does not match config rank "
                                 f"{self.config.rank}")
        expected = [peft_key(name, ab) for name in self.lora_layers for ab in "AB"]
        missing = sorted(set(expected) - set(state))
        if missing:
            raise VllmTrainError(f"{path}: adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        for name, lora in self.lora_layers.items():
            _copy_full_into(lora.lora_a, state[peft_key(name, "A")])
            _copy_full_into(lora.lora_b, state[peft_key(name, "B")])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full (unsharded) value, gathered over its mesh; a plain tensor unchanged."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view); a plain tensor unchanged."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `param`; a DTensor parameter takes its own shard of it, cut locally."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    param.copy_(full)


def is_linear_target(model: nn.Module, leaf: str, targets: set[str]) -> bool:
    """Whether the linear layer `leaf` (a leaf name) of `model` gets a LoRA for `targets`: by its own name,
    or, for an HF model's own fused linear, by its parts' names (`_hf_fused_targeted`)."""
    return leaf in targets or _hf_fused_targeted(model, leaf, targets)


def _hf_fused_targeted(model: nn.Module, leaf: str, targets: set[str]) -> bool:
    """Whether an HF model's own fused linear (Phi-3's ``qkv_proj`` / ``gate_up_proj``, an ``nn.Linear``)
    is targeted through its parts' names. It gets ONE LoRA under its own name, as PEFT gives it and as
    vLLM's LoRA for such models expects (packed_modules_mapping ``qkv_proj: [qkv_proj]``); so either all
    of its parts are targeted or none."""
    parts = FUSED_PROJECTIONS.get(leaf, ())
    chosen = [p for p in parts if p in targets]
    if chosen and len(chosen) < len(parts):
        raise VllmTrainError(f"{type(model).__name__} fuses {', '.join(parts)} into one linear '{leaf}': "
                             f"target all of them (or '{leaf}'), not only {', '.join(chosen)}")
    return bool(chosen)


def _check_no_expert_targets(model: nn.Module, targets: set[str], adapted: set[str]) -> None:
    """A mixture-of-experts model keeps its experts as 3-D tensors (transformers 5: ``experts.gate_up_proj``
    (E, 2I, H), ``experts.down_proj`` (E, H, I)), not linear layers: MLP targets that adapted nothing
    would leave the adapter silently attention-only, so say so."""
    mlp = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}
    missed = sorted((targets & mlp) - adapted)
    experts = any(p.dim() == 3 and n.rsplit(".", 1)[-1] in mlp for n, p in model.named_parameters())
    if missed and experts:
        raise VllmTrainError(f"{type(model).__name__}: LoRA on the MoE experts ({', '.join(missed)}) is not "
                             f"supported (its experts are fused 3-D tensors, not linear layers); target the "
                             f"attention projections q_proj, k_proj, v_proj, o_proj")


def check_targets(model: nn.Module, targets: set[str]) -> None:
    """Before any LoRA goes in (also on a meta-device copy, before the weights load): MoE expert targets are
    refused, and so is a target name that names no linear layer -- a misspelt one (q_proj,bogus_proj) would
    otherwise train a smaller adapter than asked, silently. A fused projection counts as its parts."""
    linear = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) or leaf in FUSED_PROJECTIONS:
            linear |= {leaf, *FUSED_PROJECTIONS.get(leaf, ())}
    _check_no_expert_targets(model, targets, targets & linear)
    missed = sorted(targets - linear - {ALL_LINEAR})
    if missed:
        raise VllmTrainError(f"target_modules: {', '.join(missed)} match no linear layer of {type(model).__name__} "
                             f"(its linear layers: {', '.join(sorted(linear))})")


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


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


OUTPUT_HEADS = ("lm_head", "score", "classifier", "v_head")  # never adapted by "all-linear", as in PEFT


def all_linear_names(model: nn.Module) -> list[str]:
    """PEFT's "all-linear": the leaf names of every linear layer but the output layer (the LM head or a
    classifier / value head); a fused vLLM projection counts as its parts."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is output or leaf in OUTPUT_HEADS:
            continue
        if isinstance(module, nn.Linear):
            names.add(leaf)
        elif leaf in FUSED_PROJECTIONS:
            names.update(FUSED_PROJECTIONS[leaf])
    return sorted(names)
