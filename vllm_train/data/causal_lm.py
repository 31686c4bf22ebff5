"""Supervised fine-tuning data: text, prompt/completion, chat messages (ShareGPT and Alpaca records read as
these: `data.formats`); loss on completions and assistant turns only."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from vllm_train.data.formats import problem_of, sft_record
from vllm_train.data.io import load_records, source_label
from vllm_train.data.tokenize import encode_example, has_chat_template

IGNORE_INDEX = -100


def check_sft_record(record: dict) -> str | None:
    """None if the record is one of the accepted SFT shapes (`data.formats.sft_record`), else what is wrong."""
    return problem_of(sft_record, record)


class CausalLMDataset(torch.utils.data.Dataset):
    """Dataset for causal language modeling.

    `data` is a list of dicts, a .jsonl/.json/.parquet path, a `datasets.Dataset` or a `HubDataset`, with
    records ``{"text"}``, ``{"prompt", "completion"}`` (strings or chat messages), ``{"messages"}``, ShareGPT
    ``{"conversations"}`` or Alpaca ``{"instruction", "input", "output"}`` (`data.formats`). ``labels`` are
    the input ids on completion/assistant tokens and -100 on prompt tokens (padding is added by
    `collate_causal_lm`, also as -100). A record is one example, or one per assistant turn when the chat
    template is not prefix-consistent (`data.tokenize.encode_messages`). Examples longer than `max_length`
    are cut at the end; one left with no trainable token is dropped (with a warning that counts them).
    """

    def __init__(self, data: Any, tokenizer, max_length: int = 2048):
        self.tokenizer = tokenizer
        self.max_length = max_length
        chat = has_chat_template(tokenizer)
        self.records = load_records(data, what="SFT dataset", read=lambda r: sft_record(r, chat))
        self.examples: list[dict[str, torch.Tensor]] = []
        dropped = truncated = sequences = 0
        for record in self.records:
            encoded = encode_example(tokenizer, record)
            sequences += len(encoded)
            truncated += any(len(ids) > max_length for ids, _ in encoded)
            for ids, trainable in encoded:
                ids, trainable = ids[:max_length], trainable[:max_length]
                if not any(trainable[1:]):  # position 0 is never a target
                    dropped += 1
                    continue
                labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trainable)]
                self.examples.append({
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(len(ids), dtype=torch.long),
                    "labels": torch.tensor(labels, dtype=torch.long),
                })
        if truncated:
            warnings.warn(f"{source_label(data, 'SFT dataset')}: {truncated} of {len(self.records)} records are longer "
                          f"than max_length={max_length} tokens and were truncated", stacklevel=2)
        if dropped:
            unit = "records" if sequences == len(self.records) else "examples (one per assistant turn of some records)"
            warnings.warn(f"{dropped} of {sequences} {unit} had no completion token within "
                          f"max_length={max_length} and were dropped", stacklevel=2)
        if not self.examples:
            from vllm_train.errors import VllmTrainError

            raise VllmTrainError(f"no usable records: all {len(self.records)} lose their completion "
                                 f"at max_length={max_length}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.examples[idx]


def pad_right(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack 1-D tensors into (B, T_max), padding on the right with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate_causal_lm(batch: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of examples to (B, T): pad id in input_ids, 0 in attention_mask, -100 in labels."""
    return {
        "input_ids": pad_right([b["input_ids"] for b in batch], pad_token_id),
        "attention_mask": pad_right([b["attention_mask"] for b in batch], 0),
        "labels": pad_right([b["labels"] for b in batch], IGNORE_INDEX),
    }
