"""The RL policy as a trainable model: completion log-probs (and PPO values) of sampled sequences.

The policy is a Hugging Face model with our LoRA layers. The **reference** for the KL is the policy a
run starts from, with no second model: the base with the adapter disabled, or -- when the run starts
from an adapter such as an SFT run -- a copy of that adapter's LoRA weights swapped in for one no-grad
forward. PPO's **value model** is a scalar head (``Linear(hidden, 1)``) on the policy's final hidden
states: one forward gives log-probs and values, and the value loss shares the LoRA trunk, which is what
lets a rank-r adapter learn a useful critic at all. vLLM serves only the LoRA weights; the head is
saved beside them as ``value_head.safetensors``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from vllm_train import distributed
from vllm_train.losses.causal_lm import token_logprobs
from vllm_train.models import autocast_for, chunkable_head
from vllm_train.outputs import save_weights
from vllm_train.trainers.rl_rollouts import Rollout

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class CompletionBatch:
    """Completion-aligned (S, T) tensors of the samples that train; T = the longest completion."""
    sequences: list[list[int]]  # prompt + completion ids per row
    prompt_lens: list[int]
    tokens_BT: torch.Tensor  # long
    mask_BT: torch.Tensor  # bool, True on the model's completion tokens (padding and environment tokens: False)
    vllm_logps_BT: torch.Tensor  # float64: the sampler's log-probs (0 where it reported none)

    @staticmethod
    def of(rollout: Rollout, keep: list[int]) -> CompletionBatch:
        T = max(1, max(len(rollout.completion_ids[i]) for i in keep))
        tokens_BT = torch.zeros(len(keep), T, dtype=torch.long)
        mask_BT = torch.zeros(len(keep), T, dtype=torch.bool)
        vllm_BT = torch.zeros(len(keep), T, dtype=torch.float64)  # vLLM reports float64 log-probs
        for row, i in enumerate(keep):
            comp, lps = rollout.completion_ids[i], rollout.vllm_logps[i]
            tokens_BT[row, :len(comp)] = torch.tensor(comp, dtype=torch.long)
            mask_BT[row, :len(comp)] = torch.tensor(rollout.completion_mask(i), dtype=torch.bool)
            if len(lps) == len(comp):
                vllm_BT[row, :len(comp)] = torch.tensor(lps)
        return CompletionBatch([rollout.prompt_ids[i] + rollout.completion_ids[i] for i in keep],
                               [len(rollout.prompt_ids[i]) for i in keep], tokens_BT, mask_BT, vllm_BT)

    def __len__(self) -> int:
        return len(self.sequences)


class Policy:
    """`forward(batch, rows)`: log-probs of the completion tokens of `rows` (and values with a head)."""

    def __init__(self, model, injector, pad_token_id: int, temperature: float, micro_batch: int,
                 value_head: nn.Module | None = None, reference_weights: list[torch.Tensor] | None = None):
        self.model, self.injector, self.value_head = model, injector, value_head
        self.pad, self.temperature, self.micro_batch = pad_token_id, temperature, micro_batch
        self.reference_weights = reference_weights  # None: the reference is the base (adapter disabled)
        # chunked over a frozen plain head (the (B, T, V) logits never exist); else the model's own logits
        self._chunked = chunkable_head(model) is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batch: CompletionBatch, rows: torch.Tensor):
        """(logps_BT, values_BT or None) of the completion tokens of `rows`, on the CPU, with gradients."""
        rows = rows.tolist()
        seqs = [batch.sequences[r] for r in rows]
        L, dev = max(len(s) for s in seqs), self.device
        input_ids_BL = torch.tensor([s + [self.pad] * (L - len(s)) for s in seqs], device=dev)
        attention_BL = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs], device=dev)
        tokens_BT, mask_BT = batch.tokens_BT[rows].to(dev), batch.mask_BT[rows].to(dev)
        # The hidden state at position p_i - 1 + t predicts completion token t of sequence i.
        starts_B = torch.tensor([batch.prompt_lens[r] - 1 for r in rows], device=dev)
        positions_BT = (starts_B[:, None] + torch.arange(tokens_BT.size(1), device=dev)[None]).clamp(max=L - 1)
        head = self.model.get_output_embeddings()
        with autocast_for(self.model):
            hidden_BLH = self.model.base_model(input_ids=input_ids_BL, attention_mask=attention_BL).last_hidden_state
            hidden_BTH = hidden_BLH.gather(1, positions_BT[..., None].expand(-1, -1, hidden_BLH.size(-1)))
            if not self._chunked:
                logits_BTV = head(hidden_BTH).float() / self.temperature
                logps_BT = logits_BTV.gather(-1, tokens_BT[..., None])[..., 0] - torch.logsumexp(logits_BTV, dim=-1)
        if self._chunked:
            # Only the real completion tokens, a chunk of rows at a time (H200: 29 GiB less at equal micro-batch).
            logps_BT = torch.zeros(mask_BT.shape, dtype=torch.float32, device=dev)
            logps_BT[mask_BT] = token_logprobs(hidden_BTH[mask_BT], head.weight, tokens_BT[mask_BT], self.temperature)
        values_BT = None
        if self.value_head is not None:
            values_BT = (self.value_head(hidden_BTH.float())[..., 0] * mask_BT).cpu()
        return (logps_BT * mask_BT).cpu(), values_BT

    @torch.no_grad()
    def forward_all(self, batch: CompletionBatch):
        """`forward` over every row, in micro-batches."""
        logps, values = [], []
        for micro in torch.arange(len(batch)).split(self.micro_batch):
            lp, v = self.forward(batch, micro)
            logps.append(lp)
            values.append(v)
        return torch.cat(logps), (torch.cat(values) if values[0] is not None else None)

    @contextlib.contextmanager
    def reference(self):
        """The KL reference inside the block: the starting adapter's weights swapped in, or no adapter."""
        if self.reference_weights is None:
            with self.injector.disable_adapter():
                yield
            return
        params = self.injector.get_trainable_params()
        current = [p.data for p in params]
        try:
            for p, ref in zip(params, self.reference_weights):
                p.data = ref
            yield
        finally:
            for p, data in zip(params, current):
                p.data = data


def zero_value_head(model: nn.Module) -> nn.Linear:
    """PPO's value head on `model`'s last hidden state, zero-initialised (every value 0 at the start)."""
    head = nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    return head


class PolicyAndValueHead:
    """What a PPO checkpoint holds: the LoRA adapter plus the value head (a `Checkpointable`, like the
    injector, so checkpoints stay atomic and optimizer-aware)."""

    def __init__(self, injector, value_head: nn.Module):
        self.injector, self.value_head = injector, value_head

    def get_trainable_params(self) -> list[nn.Parameter]:
        return self.injector.get_trainable_params() + list(self.value_head.parameters())

    def save(self, path, base_model_name_or_path=None, **kwargs) -> Path:
        out = self.injector.save(path, base_model_name_or_path, **kwargs)
        if not distributed.is_main():  # the injector wrote nothing either
            return out
        save_weights({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                     Path(out) / VALUE_HEAD_FILE)
        return out

    @torch.no_grad()
    def load(self, path) -> None:
        self.injector.load(path)
        if (Path(path) / VALUE_HEAD_FILE).is_file():
            self.value_head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))
