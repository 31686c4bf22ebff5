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

from vllm_train import quiet
from vllm_train.errors import VllmTrainError
from vllm_train.files import parse_json, read_text
from vllm_train.loading import library_errors


class RewardModelScorer:
    """Callable ``(prompts, completions, examples) -> list[float]`` backed by a sequence-classification model."""

    def __init__(self, path: str | Path, batch_size: int = 32, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        self.name = str(path)
        if not (path / "config.json").is_file():
            raise VllmTrainError(f"reward model {path}: not a model directory (no config.json)")
        config = parse_json(read_text(path / "config.json"), str(path / "config.json"))
        archs = config.get("architectures") or [] if isinstance(config, dict) else []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise VllmTrainError(f"reward model {path}: expected a *ForSequenceClassification checkpoint, "
                                 f"found architectures {archs}")
        labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)  # transformers' default: 2
        if labels != 1:  # checked before loading: a 2-label config over a 1-row score head fails to load
            raise VllmTrainError(f"reward model {path / 'config.json'}: {labels} labels, expected 1 (a scalar score)")
        quiet.settle()  # transformers is imported now: its weight-loading bars follow the quiet setting
        with library_errors(f"reward model {path}"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        self.model = self.model.to(self.device).eval()
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
