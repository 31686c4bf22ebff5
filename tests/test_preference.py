"""PreferenceDataset: masks cover completion tokens only, truncation is consistent for both sides,
padding never counts, and bad records fail with file and line named."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_train.data.preference import PreferenceDataset, collate_preference, truncate_pair
from vllm_train.data.tokenize import completion_ids, prompt_ids
from vllm_train.errors import VllmTrainError

PROMPT = [{"role": "user", "content": "What is 47 + 38?"}]
PAIR = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "85"}],
        "rejected": [{"role": "assistant", "content": "75"}]}


def test_masks_cover_completion_tokens_only(tokenizer):
    ds = PreferenceDataset([PAIR, {"prompt": "12 + 3 =", "chosen": " 15", "rejected": " 16 or so"}], tokenizer, 64)
    p = prompt_ids(tokenizer, PROMPT)
    c = completion_ids(tokenizer, PROMPT, PAIR["chosen"])
    r = completion_ids(tokenizer, PROMPT, PAIR["rejected"])
    ex = ds[0]
    assert ex["chosen_input_ids"].tolist() == p + c
    assert ex["rejected_input_ids"].tolist() == p + r
    assert ex["chosen_labels"].tolist() == [-100] * len(p) + c  # hand-checked: prompt masked, answer kept
    assert ex["rejected_labels"].tolist() == [-100] * len(p) + r
    assert c[-1] == tokenizer.eos_token_id  # the end-of-turn token is part of what is learned

    # string records: the completion gets EOS appended, the prompt gets no label
    s = ds[1]
    sp = prompt_ids(tokenizer, "12 + 3 =")
    assert s["chosen_labels"][: len(sp)].tolist() == [-100] * len(sp)
    assert s["chosen_labels"][-1].item() == tokenizer.eos_token_id


def test_collator_pads_both_sides_and_padding_never_counts(tokenizer):
    ds = PreferenceDataset([PAIR, {"prompt": "12 + 3 =", "chosen": " 15", "rejected": " 16 or so"}], tokenizer, 64)
    batch = collate_preference([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows first, then rejected rows
    lengths = [len(ds[0]["chosen_input_ids"]), len(ds[1]["chosen_input_ids"]),
               len(ds[0]["rejected_input_ids"]), len(ds[1]["rejected_input_ids"])]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    assert batch["index"].tolist() == [0, 1]


def test_padding_and_prompt_tokens_never_count_in_logps(tiny_model, tokenizer):
    """The sequence log-prob of a padded batch equals the hand-computed sum over answer tokens only."""
    from transformers import AutoModelForCausalLM

    from vllm_train.models import batch_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ds = PreferenceDataset([PAIR, {"prompt": "12 + 3 =", "chosen": " 15", "rejected": " 16 or so"}], tokenizer, 64)
    batch = collate_preference([ds[0], ds[1]], tokenizer.pad_token_id)
    with torch.no_grad():
        got = batch_logps(model, batch, torch.device("cpu"))
        for row, (ex, side) in enumerate([(ds[0], "chosen"), (ds[1], "chosen"), (ds[0], "rejected"),
                                          (ds[1], "rejected")]):
            ids = ex[f"{side}_input_ids"]
            n_prompt = int((ex[f"{side}_labels"] == -100).sum())
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            expected = sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))
            assert got[row].item() == pytest.approx(expected, abs=1e-4)
        # changing prompt labels' tokens or padding ids must not change anything
        noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        assert torch.allclose(batch_logps(model, noisy, torch.device("cpu")), got, atol=1e-5)


def test_truncation_keeps_prompt_end_and_completion_start_for_both_sides():
    prompt, chosen, rejected = list(range(100, 130)), list(range(10)), list(range(20, 26))
    p, c, r = truncate_pair(prompt, chosen, rejected, max_length=16)
    assert p == prompt[-8:]  # the end of the prompt, shared by both sides
    assert c == chosen[:8] and r == rejected  # the start of each completion, one shared budget
    assert len(p) + max(len(c), len(r)) == 16
    # short prompt: the completions get everything the prompt leaves
    p, c, r = truncate_pair([1, 2], list(range(30)), [5], max_length=10)
    assert p == [1, 2] and c == list(range(8)) and r == [5]
    # fits: untouched
    assert truncate_pair([1], [2], [3], 5) == ([1], [2], [3])


def test_dataset_truncation_is_consistent(tokenizer):
    long_prompt = "Please add. " * 40 + "What is 47 + 38?"
    ds = PreferenceDataset([{"prompt": long_prompt, "chosen": "85", "rejected": "75"}], tokenizer, max_length=16)
    ex = ds[0]
    assert len(ex["chosen_input_ids"]) <= 16 and len(ex["rejected_input_ids"]) <= 16
    n = ex["prompt_length"]
    assert ex["chosen_input_ids"][:n].tolist() == ex["rejected_input_ids"][:n].tolist()
    assert ex["chosen_input_ids"][:n].tolist() == prompt_ids(tokenizer, long_prompt)[-n:]


def _write(tmp_path, records):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "1 + 1 =", "chosen": "2"}, "missing field 'rejected'"),
    ({"prompt": "1 + 1 =", "chosen": "", "rejected": "3"}, "field 'chosen' is empty"),
    ({"prompt": "  ", "chosen": "2", "rejected": "3"}, "field 'prompt' is empty"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": ""}], "rejected": "3"}, "empty message"),
    ({"prompt": "1 + 1 =", "chosen": "2", "rejected": "2"}, "identical"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer, bad, message):
    path = _write(tmp_path, [PAIR, PAIR, bad])
    with pytest.raises(VllmTrainError) as info:
        PreferenceDataset(path, tokenizer, 64)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["dpo", "rm"])
def test_cli_bad_data_exits_2_and_leaves_no_output_dir(tmp_path, tiny_model, capsys, command):
    from vllm_train.cli import main

    path = _write(tmp_path, [PAIR, {"prompt": "1 + 1 =", "chosen": "2"}])
    out = tmp_path / "run"
    assert main([command, "--model", tiny_model, "--data", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: missing field 'rejected'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
