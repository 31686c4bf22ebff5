"""Reward-model scoring for RL, in-process with the model's Hugging Face forward.

Why not vLLM pooling here: a process holds one vLLM engine (the policy's rollout engine), and a second
engine in a subprocess would cost its own start-up, memory reservation and IPC -- and on CPU it fights
the rollout engine for the same cores. Scoring is a single prefill per sequence (no decoding), which
is exactly what a plain batched forward does well, so vLLM would buy little.

A reward model directory is a Hugging Face ``*ForSequenceClassification`` checkpoint with one label
(what `vllm-train rm` writes, or any such model). Its score is the logit at the last token of
prompt + completion (completion tokens as the policy's training sees them, ending with EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_train.errors import VllmTrainError


class RewardModelScorer:
    """Callable ``(prompts, completions, examples) -> list[float]`` backed by a sequence-classification model."""

    def __init__(self, path: str | Path, batch_size: int = 32, device: str | None = None):
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        self.name = str(path)
        if not (path / "config.json").is_file():
            raise VllmTrainError(f"reward model {path}: not a model directory (no config.json)")
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise VllmTrainError(f"reward model {path}: expected a *ForSequenceClassification checkpoint, "
                                 f"found architectures {archs}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise VllmTrainError(f"reward model {path}: num_labels is {self.model.config.num_labels}, expected 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], examples: Sequence[dict]) -> list[float]:
        from vllm_train.data.tokenize import completion_ids, prompt_ids
        from vllm_train.models import pooled_hidden

        seqs = [prompt_ids(self.tokenizer, p) + completion_ids(self.tokenizer, p, c)
                for p, c in zip(prompts, completions)]
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad] * (L - len(s)) for s in chunk], device=self.device)
            attn = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in chunk], device=self.device)
            # Right padding: the causal model's last real token never sees the pads; pool it directly.
            hidden = pooled_hidden(self.model, {"input_ids": ids, "attention_mask": attn}, self.device)
            logits = self.model.score(hidden)
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores
