"""Preference data for DPO and reward models: {"prompt", "chosen", "rejected"}, strings or chat messages, or
"chosen"/"rejected" with the prompt inside them (whole conversations, or texts that start alike: `data.formats`).

Each pair is tokenized the way vLLM sees it (prompt alone, then the completion; `data.tokenize`), so the
trainer's sequence log-probs and vLLM's agree token for token. Labels are -100 on prompt tokens and on
padding: only completion tokens ever count.

Truncation (when prompt + the longer completion exceeds `max_length`) is decided once per pair and
applied to both sides: the completions keep their *start* (up to a shared budget), the prompt keeps
its *end* (the part next to the answer), and chosen/rejected share the exact same prompt tokens.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from vllm_train.data.causal_lm import IGNORE_INDEX, pad_right
from vllm_train.data.formats import preference_record, problem_of
from vllm_train.data.io import load_records, source_label
from vllm_train.data.tokenize import completion_ids, prompt_ids
from vllm_train.errors import VllmTrainError


def check_preference_record(record: dict) -> str | None:
    """None if the record is a usable preference pair (`data.formats.preference_record`), else what is wrong."""
    return problem_of(preference_record, record)


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_length: int) -> tuple[list[int], list[int], list[int]]:
    """Cut a tokenized pair to `max_length` tokens per sequence, identically for both sides.

    The completions keep their first `budget` tokens, the prompt its last `max_length - budget`;
    `budget` is whatever the prompt leaves, but at least half of `max_length` (or the longer
    completion, if shorter), so a long prompt cannot squeeze the answer out.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    budget = max(max_length - len(prompt), min(longest, max_length // 2))
    keep_prompt = max_length - budget
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt > 0 else []
    return prompt, chosen[:budget], rejected[:budget]


def _sequence(prompt: list[int], completion: list[int]) -> dict[str, torch.Tensor]:
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class PreferenceDataset(torch.utils.data.Dataset):
    """Dataset for preference learning (DPO, reward models).

    `data` is a list of dicts, a .jsonl/.json/.parquet path, a `datasets.Dataset` or a `HubDataset`, with
    records ``{"prompt", "chosen", "rejected"}``: three strings, or a list of chat messages for the prompt
    and one (assistant) message list for each completion; or with the prompt implicit in "chosen" and
    "rejected" (`data.formats.preference_record`). Every record is checked first; a bad one fails
    with ``FILE:LINE: ...``. Item `i` is ``{"index", "chosen_input_ids", "chosen_labels",
    "rejected_input_ids", "rejected_labels"}`` (1-D tensors; labels -100 on prompt tokens). Pairs whose
    completions become identical after truncation are dropped, with a warning that counts them.
    """

    def __init__(self, data: Any, tokenizer, max_length: int = 2048):
        if max_length < 2:
            raise VllmTrainError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.records = load_records(data, what="preference dataset", read=preference_record)
        self.examples: list[dict[str, Any]] = []
        dropped = truncated = 0
        for record in self.records:
            p = prompt_ids(tokenizer, record["prompt"])
            c = completion_ids(tokenizer, record["prompt"], record["chosen"])
            r = completion_ids(tokenizer, record["prompt"], record["rejected"])
            truncated += len(p) + max(len(c), len(r)) > max_length
            p, c, r = truncate_pair(p, c, r, max_length)
            if c == r:
                dropped += 1
                continue
            chosen, rejected = _sequence(p, c), _sequence(p, r)
            self.examples.append({
                "index": len(self.examples),
                "prompt_length": len(p),
                "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
            })
        if truncated:
            warnings.warn(f"{source_label(data, 'preference dataset')}: {truncated} of {len(self.records)} pairs are "
                          f"longer than max_length={max_length} tokens and were truncated", stacklevel=2)
        if dropped:
            warnings.warn(f"{dropped} of {len(self.records)} pairs had identical chosen and rejected tokens "
                          f"within max_length={max_length} and were dropped", stacklevel=2)
        if not self.examples:
            raise VllmTrainError(f"no usable preference pairs at max_length={max_length}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.examples[idx]


def collate_preference(batch: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack B pairs into one (2B, T) batch for a single forward pass: rows 0..B-1 are the chosen
    sequences, rows B..2B-1 the rejected ones, right-padded (pad id in input_ids, 0 in attention_mask,
    -100 in labels). ``index`` (B,) holds the pairs' dataset indices (for precomputed reference log-probs).
    """
    ids = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    labels = [b["chosen_labels"] for b in batch] + [b["rejected_labels"] for b in batch]
    return {
        "input_ids": pad_right(ids, pad_token_id),
        "attention_mask": pad_right([torch.ones(len(s), dtype=torch.long) for s in ids], 0),
        "labels": pad_right(labels, IGNORE_INDEX),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }
