"""Score (prompt, completion) pairs with a reward model served by vLLM as a pooling model.

The reward model is a ``*ForSequenceClassification`` checkpoint with one label (what
`vllm_train.trainers.rm` writes). vLLM runs it with ``runner="pooling"`` and ``LLM.classify``; the raw
score (no sigmoid) comes from ``PoolingParams(use_activation=False)``. Both vLLM 0.26 and 0.32 offer
exactly this (``LLM.reward`` is gone in 0.32, so it is not used). Pairs are sent as token ids built
like the trainer's (prompt tokens, then completion tokens ending in EOS), so vLLM scores the very same
sequence the Hugging Face model was trained on.

vLLM allows one in-process engine per process: a scorer cannot live beside a `VLLMEngine` in the same
process (run it in its own process, e.g. a subprocess or a separate worker).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_train.engine.llm import on_cuda
from vllm_train.errors import VllmTrainError


class RewardModelScorer:
    """A vLLM pooling engine over a 1-label sequence-classification checkpoint."""

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", max_model_len: int | None = None,
                 kv_cache_gib: float = 0.25, gpu_memory_utilization: float = 0.2, seed: int = 0,
                 in_process: bool = True, extra: dict[str, Any] | None = None):
        self.model_path = str(model_path)
        if not (Path(self.model_path) / "config.json").is_file():
            raise VllmTrainError(f"reward model not found: {self.model_path} (expected a model directory)")
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        cuda = on_cuda()
        kwargs: dict[str, Any] = dict(model=self.model_path, runner="pooling", seed=seed,
                                      dtype=dtype if dtype != "auto" else ("bfloat16" if cuda else "float32"),
                                      enforce_eager=not cuda)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        kwargs.update(extra or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def score_token_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Raw reward-head outputs for already-tokenized sequences."""
        from vllm import PoolingParams

        try:
            params = PoolingParams(use_activation=False)
        except TypeError:  # older vLLM named it `activation`
            params = PoolingParams(activation=False)
        outputs = self.llm.classify([{"prompt_token_ids": list(s)} for s in sequences],
                                    pooling_params=params, use_tqdm=False)
        return [float(o.outputs.probs[0]) for o in outputs]

    def score(self, prompts: Sequence[str | list[dict]], completions: Sequence[str | list[dict]]) -> list[float]:
        """Reward of each (prompt, completion) pair; strings or chat messages, as in preference data."""
        from vllm_train.data.tokenize import completion_ids, prompt_ids

        if len(prompts) != len(completions):
            raise VllmTrainError(f"{len(prompts)} prompts but {len(completions)} completions")
        sequences = [prompt_ids(self.tokenizer, p) + completion_ids(self.tokenizer, p, c)
                     for p, c in zip(prompts, completions)]
        return self.score_token_ids(sequences)

    def close(self) -> None:
        self.llm = None
