"""The data formats users already have (vllm_train/data/formats.py): ShareGPT, Alpaca, preferences with the
prompt inside "chosen"/"rejected" (Anthropic HH / TRL, UltraFeedback binarized), multi-turn SFT under a chat
template that rewrites earlier turns. Oracle: the prompt and completion text rendered by hand (the tiny model's
template is ``<|role|>content<|end|>``, generation prompt ``<|assistant|>``), tokenized piece by piece."""

from __future__ import annotations

import copy
import json

import pytest

from vllm_train.data.causal_lm import IGNORE_INDEX, CausalLMDataset
from vllm_train.data.formats import preference_record, sharegpt_messages
from vllm_train.data.io import RecordProblem
from vllm_train.data.preference import PreferenceDataset
from vllm_train.data.tokenize import completion_ids, prompt_ids, use_chat_template
from vllm_train.errors import VllmTrainError


def pieces(tokenizer, *texts: str) -> list[list[int]]:
    """Token ids of each hand-rendered piece (chat-rendered text carries no added special tokens)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def expected(prompts_and_answers: list[list[int]]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of alternating context / answer pieces: contexts -100, answers trained."""
    ids, labels = [], []
    for k, piece in enumerate(prompts_and_answers):
        ids += piece
        labels += piece if k % 2 else [IGNORE_INDEX] * len(piece)
    return ids, labels


def as_lists(example: dict) -> tuple[list[int], list[int]]:
    return example["input_ids"].tolist(), example["labels"].tolist()


@pytest.fixture
def untemplated(tokenizer):
    """The tiny tokenizer without a chat template (as many base models ship)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


# ---- ShareGPT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,role", [("human", "user"), ("user", "user"), ("gpt", "assistant"),
                                         ("assistant", "assistant"), ("chatgpt", "assistant"),
                                         ("bing", "assistant"), ("bard", "assistant"), ("system", "system")])
def test_sharegpt_role_names(source, role):
    assert sharegpt_messages([{"from": source, "value": "x"}]) == [{"role": role, "content": "x"}]


def test_sharegpt_trains_every_assistant_turn(tokenizer):
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 + 2?"},
                                {"from": "gpt", "value": "4"}, {"from": "user", "value": "And 3 + 3?"},
                                {"from": "chatgpt", "value": "6"}], "id": "x1"}
    ids, labels = expected(pieces(tokenizer, "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>",
                                  "4<|end|>", "<|user|>And 3 + 3?<|end|><|assistant|>", "6<|end|>"))
    assert as_lists(CausalLMDataset([record], tokenizer)[0]) == (ids, labels)


# ---- Alpaca -----------------------------------------------------------------------------------------
def test_alpaca_with_a_chat_template_is_one_user_turn(tokenizer):
    ds = CausalLMDataset([{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
                          {"instruction": "Say five.", "input": "", "output": "5"},
                          {"instruction": "Say six.", "output": "6", "text": "ignored: the whole prompt as text"}],
                         tokenizer)
    assert as_lists(ds[0]) == expected(pieces(tokenizer, "<|user|>Add the numbers.\n\n2 + 3<|end|><|assistant|>",
                                              "5<|end|>"))
    assert as_lists(ds[1]) == expected(pieces(tokenizer, "<|user|>Say five.<|end|><|assistant|>", "5<|end|>"))
    assert as_lists(ds[2]) == expected(pieces(tokenizer, "<|user|>Say six.<|end|><|assistant|>", "6<|end|>"))


def test_alpaca_without_a_chat_template_is_plain_text(untemplated):
    ex = CausalLMDataset([{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}], untemplated)[0]
    prompt = untemplated("Add the numbers.\n\n2 + 3", add_special_tokens=True)["input_ids"]
    answer = untemplated("5", add_special_tokens=False)["input_ids"] + [untemplated.eos_token_id]
    assert as_lists(ex) == expected([prompt, answer])


# ---- preferences with the prompt inside chosen/rejected ---------------------------------------------
HH_CHOSEN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "What is 47 + 38?"}, {"role": "assistant", "content": "85"}]
HH_REJECTED = HH_CHOSEN[:3] + [{"role": "assistant", "content": "75"}]
HH_PROMPT = "<|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>What is 47 + 38?<|end|><|assistant|>"


def pair_lists(example: dict) -> dict[str, list[int]]:
    return {k: example[k].tolist() for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                "rejected_labels")}


def expected_pair(tokenizer, prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected}


def test_conversations_without_prompt_split_at_the_shared_prefix(tokenizer):
    """Anthropic HH as TRL ships it: the prompt is the shared messages, the completions the final turns."""
    ex = PreferenceDataset([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], tokenizer, 128)[0]
    prompt, chosen, rejected = pieces(tokenizer, HH_PROMPT, "85<|end|>", "75<|end|>")
    assert pair_lists(ex) == expected_pair(tokenizer, prompt, chosen, rejected)
    assert ex["prompt_length"] == len(prompt)


def test_ultrafeedback_binarized_shape(tokenizer):
    """A string prompt that the conversations repeat as their first user turn, plus extra columns."""
    question = "What is 47 + 38?"
    record = {"prompt": question, "prompt_id": "abc", "score_chosen": 9.0, "score_rejected": 2.5,
              "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": "85"}],
              "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": "75"}],
              "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "85"}]}
    ex = PreferenceDataset([record], tokenizer, 128)[0]
    prompt, chosen, rejected = pieces(tokenizer, "<|user|>What is 47 + 38?<|end|><|assistant|>", "85<|end|>",
                                      "75<|end|>")
    assert pair_lists(ex) == expected_pair(tokenizer, prompt, chosen, rejected)
    assert preference_record(record) == {"prompt": record["chosen"][:1], "chosen": record["chosen"][1:],
                                         "rejected": record["rejected"][1:]}


@pytest.mark.parametrize("chosen,rejected,prompt,chosen_rest,rejected_rest", [
    ("The sky is blue.", "The sky is green.", "The sky is", " blue.", " green."),  # TRL's docs example: the same cut
    ("It is bright", "It is brown", "It is", " bright", " brown"),  # TRL would cut inside the word: "It is br"
    ("Q: 2 + 2? A: 4", "Q: 2 + 2? A: 4 or 5", "Q: 2 + 2? A:", " 4", " 4 or 5"),  # one extends the other
])
def test_texts_without_prompt_split_at_a_word_boundary(tokenizer, chosen, rejected, prompt, chosen_rest,
                                                        rejected_rest):
    assert preference_record({"chosen": chosen, "rejected": rejected}) == {
        "prompt": prompt, "chosen": chosen_rest, "rejected": rejected_rest}
    ex = PreferenceDataset([{"chosen": chosen, "rejected": rejected}], tokenizer, 128)[0]
    eos = [tokenizer.eos_token_id]
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c, r = pieces(tokenizer, chosen_rest, rejected_rest)
    assert pair_lists(ex) == expected_pair(tokenizer, p, c + eos, r + eos)


def _write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("bad,message", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "fields 'chosen' and 'rejected' share no prompt: their first messages differ"),
    ({"chosen": HH_CHOSEN, "rejected": [HH_CHOSEN[0], {"role": "assistant", "content": "Hey"}, *HH_CHOSEN[2:]]},
     "field 'chosen'[2] is a 'user' message after the shared prompt (only the final assistant turn may differ)"),
    ({"chosen": HH_CHOSEN[:3], "rejected": HH_REJECTED}, "field 'chosen' has no answer after the prompt"),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN[:2]}, "field 'rejected' has no answer after the prompt"),
    ({"chosen": HH_CHOSEN, "rejected": "75"}, "field 'rejected' must be chat messages too"),
    ({"chosen": "Yes", "rejected": "No"}, "share no prompt (no 'prompt' field"),
    ({"chosen": "Q: 2 + 2? ", "rejected": "Q: 2 + 2? 4"}, "field 'chosen' has no answer after the prompt"),
    ({"chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
     "missing field 'prompt'"),
])
def test_bad_implicit_prompts_name_file_line_and_field(tmp_path, tokenizer, bad, message):
    path = _write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, bad])
    with pytest.raises(VllmTrainError) as info:
        PreferenceDataset(path, tokenizer, 128)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad,message", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
     "field 'conversations'[1].from: 'robot' is not a ShareGPT role (human, user, gpt, assistant, chatgpt, bing, "
     "bard, system)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"role": "gpt", "value": "x"}]},
     "field 'conversations'[1] must be an object with 'from' and 'value'"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "field 'conversations' has no assistant message"),
    ({"conversations": []}, "field 'conversations' must be a non-empty list"),
    ({"instruction": "Add.", "input": "1 + 1"}, "missing field 'output'"),
    ({"instruction": "", "output": "2"}, "field 'instruction' is empty"),
    ({"instruction": "Add.", "input": 3, "output": "2"}, "field 'input' must be a string"),
])
def test_bad_sft_records_name_file_line_and_field(tmp_path, tokenizer, bad, message):
    path = _write(tmp_path, [{"text": "fine"}, bad])
    with pytest.raises(VllmTrainError) as info:
        CausalLMDataset(path, tokenizer)
    assert str(info.value) == f"{path}:2: {message}" or str(info.value).startswith(f"{path}:2: {message}"), \
        str(info.value)


def test_reader_problems_are_record_problems():
    with pytest.raises(RecordProblem, match="identical"):
        preference_record({"chosen": "a b", "rejected": "a b"})


# ---- multi-turn SFT under a template that is not prefix-consistent --------------------------------------
# Like Qwen3's reasoning templates: an assistant turn that is not the last message loses its <think> block.
THINK_DROPPING = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = m['content'].split('</think>')[-1] %}"
    "{% else %}{% set c = m['content'] %}{% endif %}"
    "<|{{ m['role'] }}|>{{ c }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
REASONING = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "<think>1+1</think>2"},
             {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "<think>2+2</think>4"}]


@pytest.fixture
def think_dropping():
    use_chat_template(THINK_DROPPING)
    yield
    use_chat_template(None)


def test_template_that_rewrites_earlier_turns_trains_each_turn_in_its_own_context(tokenizer, think_dropping):
    ds = CausalLMDataset([{"messages": REASONING}], tokenizer)
    assert len(ds) == 2  # one example per assistant turn
    first = expected(pieces(tokenizer, "<|user|>What is 1 + 1?<|end|><|assistant|>", "<think>1+1</think>2<|end|>"))
    second = expected(pieces(tokenizer, "<|user|>What is 1 + 1?<|end|><|assistant|>2<|end|><|user|>And 2 + 2?<|end|>"
                                        "<|assistant|>", "<think>2+2</think>4<|end|>"))
    assert [as_lists(ex) for ex in ds] == [first, second]
    # each example is exactly what vLLM is given (the context) and generates (the turn)
    for ex, i in zip(ds, (1, 3)):
        context = prompt_ids(tokenizer, REASONING[:i])
        assert ex["input_ids"].tolist() == context + completion_ids(tokenizer, REASONING[:i], REASONING[i:i + 1])


def test_same_template_stays_one_sequence_when_nothing_is_rewritten(tokenizer, think_dropping):
    plain = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "4"}]
    ds = CausalLMDataset([{"messages": plain}, {"messages": REASONING}], tokenizer)
    assert len(ds) == 3
    assert as_lists(ds[0]) == expected(pieces(tokenizer, "<|user|>What is 1 + 1?<|end|><|assistant|>", "2<|end|>",
                                              "<|user|>And 2 + 2?<|end|><|assistant|>", "4<|end|>"))


# ---- the command line, one run per format family (tiny model, a few steps) -------------------------------
RUN = ["--rank", "2", "--target-modules", "q_proj", "--batch-size", "2", "--gradient-accumulation-steps", "1",
       "--max-steps", "2", "--no-progress"]


def _trained(tiny_model, command: str, data, tmp_path, capsys) -> list[dict]:
    """Run `command` on `data` to its end; its logged metrics."""
    from vllm_train.cli import main

    out = tmp_path / f"{command}-run"
    code = main([command, "--model", tiny_model, "--data", str(data), "--eval-data", str(data), "--output-dir",
                 str(out), *RUN])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() or (out / "adapter" / "adapter_model.safetensors").is_file()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_command_on_sharegpt_and_alpaca(tiny_model, tmp_path, capsys):
    records = [{"conversations": [{"from": "human", "value": f"What is {a} + 4?"},
                                  {"from": "gpt", "value": str(a + 4)}]} for a in range(3)]
    records += [{"instruction": "Add the numbers.", "input": f"{a} + 5", "output": str(a + 5)} for a in range(3)]
    metrics = _trained(tiny_model, "sft", _write(tmp_path, records), tmp_path, capsys)
    assert any("eval_loss" in m for m in metrics)


def test_dpo_command_on_implicit_prompt_pairs(tiny_model, tmp_path, capsys):
    records = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
               {"chosen": "Q: What is 2 + 2? A: 4", "rejected": "Q: What is 2 + 2? A: 5"}]
    metrics = _trained(tiny_model, "dpo", _write(tmp_path, records), tmp_path, capsys)
    assert any("eval_reward_accuracy" in m for m in metrics)


@pytest.mark.parametrize("command", ["dpo", "rm"])
def test_ultrafeedback_binarized_trains_with_dpo_and_rm(tiny_model, tmp_path, capsys, command):
    def row(a: int) -> dict:
        q = f"What is {a} + 38?"
        return {"prompt": q, "prompt_id": f"id{a}", "score_chosen": 9.0, "score_rejected": 1.0,
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a + 38)}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a + 28)}],
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a + 38)}]}

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train_prefs.parquet"  # as the dataset ships
    pq.write_table(pa.Table.from_pylist([row(a) for a in range(4)]), path)
    metrics = _trained(tiny_model, command, path, tmp_path, capsys)
    assert any(k.startswith("eval_") for m in metrics for k in m)
