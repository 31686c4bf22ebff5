"""One frozen base model holding many tenants' LoRA adapters, each in a numbered slot with its own rank,
alpha and parameters: what the service trains.

The adapters are `MultiLoRAModel`'s (vllm_train/lora/multi_model.py): every row of a batch names its slot,
and one forward pass (grouped GEMM where the build has `torch._grouped_mm`, a per-adapter loop where it
does not) computes all tenants' rows together; one backward accumulates each adapter's own gradients.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from torch import nn

from vllm_train.lora.multi_model import MultiLoRAModel


class TenantModel:
    """A causal LM loaded once (frozen) plus adapters in slots 0..max_adapters-1."""

    def __init__(self, model_path: str, max_adapters: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        model.config.use_cache = False
        self.model = model
        self.multi = MultiLoRAModel(model, max_adapters=max_adapters)
        self.max_adapters = max_adapters
        self.device = torch.device(device)

    @property
    def adapters(self):
        return self.multi.adapters

    def targets(self, train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
        """Tinker's create_model switches as module names."""
        return self.multi.tinker_targets(train_attn, train_mlp, train_unembed)

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(self, slot: int, rank: int, alpha: float, seed: int | None, targets: Sequence[str]) -> int:
        """A fresh adapter in `slot` (A Kaiming-uniform from `seed`, B zero: it starts as the base model);
        returns the seed used (a random one when None)."""
        seed = secrets.randbits(62) if seed is None else seed
        self.multi.add_adapter(slot, rank, alpha, seed, targets)
        return seed

    def remove_adapter(self, slot: int) -> None:
        if slot in self.multi.adapters:
            self.multi.remove_adapter(slot)

    def parameters_of(self, slot: int) -> list[nn.Parameter]:
        return self.multi.parameters_of(slot)

    def peft_state_dict(self, slot: int, live: bool = False) -> dict[str, torch.Tensor]:
        return self.multi.peft_state_dict(slot, live=live)

    def peft_config(self, slot: int, base_model: str) -> dict:
        return self.multi.peft_config(slot, base_model)

    def load_peft_state_dict(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        self.multi.load_peft_state_dict(slot, state)

    # ---- forward ------------------------------------------------------------------------------------
    def token_logprobs(self, rows: Sequence[tuple[int, Sequence[int], torch.Tensor]]) -> list[torch.Tensor]:
        """Per row (slot, input tokens (N,), target tokens (N,)): the log-probs, fp32 (N,), that the slot's
        adapter gives each target after the inputs up to its position -- every row in one forward pass;
        differentiable in each slot's parameters when grad is enabled."""
        lengths = [len(tokens) for _, tokens, _ in rows]
        ids_BT = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask_BT = torch.zeros_like(ids_BT)
        targets_BT = torch.zeros_like(ids_BT)
        for i, (_, tokens, targets_N) in enumerate(rows):
            ids_BT[i, :lengths[i]] = torch.as_tensor(list(tokens))
            mask_BT[i, :lengths[i]] = 1  # right padding: causal attention keeps real positions exact
            targets_BT[i, :lengths[i]] = targets_N
        with self.multi.rows([slot for slot, _, _ in rows]):
            logits_BTV = self.model(input_ids=ids_BT.to(self.device), attention_mask=mask_BT.to(self.device)).logits
        logps_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
        logps_BT = logps_BTV.gather(-1, targets_BT.to(self.device)[..., None])[..., 0]
        return [logps_BT[i, :n] for i, n in enumerate(lengths)]
