"""Datasets: which tokens are trained on (checked by hand), padding, file formats, bad-input errors."""

import json

import pytest
import torch

from vllm_train.data.causal_lm import IGNORE_INDEX, CausalLMDataset, collate_causal_lm
from vllm_train.errors import VllmTrainError


def trained_text(tokenizer, example):
    labels = example["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_messages_train_only_on_the_assistant_answer(tokenizer):
    ds = CausalLMDataset([{"messages": [{"role": "user", "content": "What is 13 + 54?"},
                                        {"role": "assistant", "content": "67"}]}], tokenizer)
    ex = ds[0]
    ids = ex["input_ids"].tolist()
    assert tokenizer.decode(ids) == "<|user|>What is 13 + 54?<|end|><|assistant|>67<|end|>"
    # hand count: the answer is the last three tokens '6', '7', '<|end|>'; nothing else is a label
    assert ex["labels"][:-3].eq(IGNORE_INDEX).all()
    assert ex["labels"][-3:].tolist() == ids[-3:] == tokenizer("67<|end|>", add_special_tokens=False)["input_ids"]
    assert trained_text(tokenizer, ex) == "67<|end|>"


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    ex = CausalLMDataset([{"messages": msgs}], tokenizer)[0]
    assert trained_text(tokenizer, ex) == "2<|end|>4<|end|>"
    assert tokenizer.decode(ex["input_ids"]) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_prompt_completion_strings_get_eos_and_masked_prompt(tokenizer):
    ex = CausalLMDataset([{"prompt": "12 + 30 = ", "completion": "42"}], tokenizer)[0]
    n_prompt = len(tokenizer("12 + 30 = ")["input_ids"])
    assert ex["labels"][:n_prompt].eq(IGNORE_INDEX).all()
    assert trained_text(tokenizer, ex) == "42<|end|>"


def test_text_records_train_on_everything(tokenizer):
    ex = CausalLMDataset([{"text": "1 + 2 = 3"}], tokenizer)[0]
    assert torch.equal(ex["labels"], ex["input_ids"])
    assert tokenizer.decode(ex["input_ids"]) == "1 + 2 = 3<|end|>"


def test_collator_pads_with_ignore_index_and_zero_mask(tokenizer):
    ds = CausalLMDataset([{"text": "1 + 2 = 3"}, {"text": "10 + 20 = 30 and more"}], tokenizer)
    batch = collate_causal_lm([ds[0], ds[1]], tokenizer.pad_token_id)
    n0 = len(ds[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["labels"][0, n0:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0, n0:].eq(0).all() and batch["attention_mask"][0, :n0].eq(1).all()
    assert batch["input_ids"][0, n0:].eq(tokenizer.pad_token_id).all()


def test_truncation_and_records_without_targets(tokenizer):
    long = {"prompt": "1 + 1 = " * 40, "completion": "2"}
    with pytest.warns(UserWarning, match="dropped"):
        ds = CausalLMDataset([long, {"text": "1 + 2 = 3"}], tokenizer, max_length=16)
    assert len(ds) == 1
    with pytest.raises(VllmTrainError, match="no usable records"), pytest.warns(UserWarning):
        CausalLMDataset([long], tokenizer, max_length=16)


def test_jsonl_json_parquet_and_hf_datasets(tokenizer, tmp_path):
    records = [{"text": "1 + 2 = 3"}, {"prompt": "4 + 4 = ", "completion": "8"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    expected = [e["input_ids"].tolist() for e in CausalLMDataset(records, tokenizer)]
    for source in (tmp_path / "d.jsonl", tmp_path / "d.json"):
        assert [e["input_ids"].tolist() for e in CausalLMDataset(source, tokenizer)] == expected
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_list([{"text": "1 + 2 = 3"}, {"text": "5 + 5 = 10"}])
    hf.to_parquet(str(tmp_path / "d.parquet"))
    assert len(CausalLMDataset(hf, tokenizer)) == 2
    assert len(CausalLMDataset(tmp_path / "d.parquet", tokenizer)) == 2


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"prompt": "p"}\n', r"bad\.jsonl:2: missing field 'completion'"),
    ('{"text": ""}\n', r"bad\.jsonl:1: field 'text' is empty"),
    ('{"foo": 1}\n', r"bad\.jsonl:1: expected a 'text'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: .*no assistant message"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('\n\n', r"bad\.jsonl: SFT dataset is empty"),
])
def test_bad_records_name_file_line_and_field(tokenizer, tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(VllmTrainError, match=match):
        CausalLMDataset(tmp_path / "bad.jsonl", tokenizer)


def test_missing_file_and_wrong_type(tokenizer, tmp_path):
    with pytest.raises(VllmTrainError, match="not found"):
        CausalLMDataset(tmp_path / "nope.jsonl", tokenizer)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(VllmTrainError, match="unsupported file type"):
        CausalLMDataset(tmp_path / "d.csv", tokenizer)
