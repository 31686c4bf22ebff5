"""One frozen base model holding many tenants' LoRA adapters, each in a numbered slot with its own rank,
alpha and parameters: what the service trains.

The interface (`add_adapter`, `remove_adapter`, `parameters_of`, `peft_state_dict`, `peft_config`,
`load_peft_state_dict`, `token_logprobs`) is the one the multi-adapter LoRA layer (vllm_train/lora/multi.py,
per-row adapter index) offers. Until that layer lands, this model applies each adapter with forward hooks
on the base's linear layers and runs the rows of one batch **one adapter at a time** (a forward per slot in
the batch); the numbers are the same, the single grouped pass is what the layer adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_train.lora.peft_io import PEFT_PREFIX

ATTENTION_PARENTS = ("self_attn", "attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward")


@dataclass
class _Adapter:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # leaf names, e.g. ("q_proj", "v_proj")
    a: dict[str, nn.Parameter] = field(default_factory=dict)  # module path -> A (rank, in)
    b: dict[str, nn.Parameter] = field(default_factory=dict)  # module path -> B (out, rank)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def linear_targets(model: nn.Module, attn: bool, mlp: bool) -> dict[str, nn.Linear]:
    """{module path: linear} of the attention and/or MLP projections (never the LM head or embeddings)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "." not in name:
            continue
        parent = name.rsplit(".", 2)[-2]
        if (attn and parent in ATTENTION_PARENTS) or (mlp and parent in MLP_PARENTS):
            out[name] = module
    return out


class TenantModel:
    """A causal LM loaded once (frozen) plus adapters in slots 0..max_adapters-1."""

    def __init__(self, model_path: str, max_adapters: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.model.config.use_cache = False
        self.max_adapters = max_adapters
        self.device = torch.device(device)
        self.adapters: dict[int, _Adapter] = {}
        self._active: _Adapter | None = None
        self._linears = linear_targets(self.model, attn=True, mlp=True)
        for name, module in self._linears.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def add_lora(module, inputs, output):
            adapter = self._active
            if adapter is None or name not in adapter.a:
                return output
            x = inputs[0].to(adapter.a[name].dtype)
            return output + (x @ adapter.a[name].T @ adapter.b[name].T * adapter.scaling).to(output.dtype)
        return add_lora

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, slot: int, rank: int, alpha: float, seed: int | None, targets: Sequence[str]) -> None:
        """A fresh adapter in `slot`: A Kaiming-uniform (as PEFT initialises it, from `seed`), B zero, so it
        starts as the base model. `targets`: leaf names of the linears to adapt."""
        if slot in self.adapters or not 0 <= slot < self.max_adapters:
            raise ValueError(f"slot {slot} is taken or out of range")
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        adapter = _Adapter(rank, alpha, tuple(sorted(set(targets))))
        for name, linear in self._linears.items():
            if name.rsplit(".", 1)[-1] not in adapter.targets:
                continue
            bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
            a = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
            adapter.a[name] = nn.Parameter(a.to(self.device))
            adapter.b[name] = nn.Parameter(torch.zeros(linear.out_features, rank, device=self.device))
        self.adapters[slot] = adapter

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)

    def parameters_of(self, slot: int) -> list[nn.Parameter]:
        adapter = self.adapters[slot]
        return [p for name in sorted(adapter.a) for p in (adapter.a[name], adapter.b[name])]

    def peft_state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """PEFT names and layout (B unscaled), fp32 CPU copies."""
        adapter = self.adapters[slot]
        state = {}
        for name in adapter.a:
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapter.a[name].detach().float().cpu().clone()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.b[name].detach().float().cpu().clone()
        return state

    def peft_config(self, slot: int, base_model: str) -> dict:
        adapter = self.adapters[slot]
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0,
                "target_modules": list(adapter.targets), "bias": "none", "fan_in_fan_out": False,
                "use_rslora": False, "use_dora": False, "inference_mode": True, "modules_to_save": None}

    @torch.no_grad()
    def load_peft_state_dict(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (as `peft_state_dict` names it) into the slot's parameters: every key and shape must
        match, checked before anything is written."""
        adapter = self.adapters[slot]
        mine = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": p for n in adapter.a
                for ab, p in (("A", adapter.a[n]), ("B", adapter.b[n]))}
        if set(state) != set(mine):
            raise ValueError(f"adapter tensors do not match slot {slot}'s modules")
        for key, param in mine.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
        for key, param in mine.items():
            param.copy_(state[key].to(param))

    # ---- forward ------------------------------------------------------------------------------------
    def token_logprobs(self, rows: Sequence[tuple[int, Sequence[int], torch.Tensor]]) -> list[torch.Tensor]:
        """Per row (slot, input tokens (N,), target tokens (N,)): the log-probs, fp32 (N,), that the slot's
        adapter gives each target after the inputs up to its position; differentiable in the slot's
        parameters when grad is enabled."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        for slot in dict.fromkeys(slot for slot, _, _ in rows):
            index = [i for i, row in enumerate(rows) if row[0] == slot]
            logps = self._logprobs_one_adapter([rows[i][1] for i in index], [rows[i][2] for i in index], slot)
            for i, lp in zip(index, logps):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _logprobs_one_adapter(self, tokens: list[Sequence[int]], targets: list[torch.Tensor], slot: int):
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        ids_BT = torch.zeros(len(tokens), width, dtype=torch.long)
        mask_BT = torch.zeros(len(tokens), width, dtype=torch.long)
        targets_BT = torch.zeros(len(tokens), width, dtype=torch.long)
        for i, (toks, tgt) in enumerate(zip(tokens, targets)):
            ids_BT[i, :len(toks)] = torch.as_tensor(list(toks))
            mask_BT[i, :len(toks)] = 1
            targets_BT[i, :len(toks)] = tgt
        self._active = self.adapters[slot]
        try:
            logits_BTV = self.model(input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device)).logits
        finally:
            self._active = None
        logps_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
        logps_BT = logps_BTV.gather(-1, targets_BT.to(self.device)[..., None])[..., 0]
        return [logps_BT[i, :n] for i, n in enumerate(lengths)]
