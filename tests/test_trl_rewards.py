"""Reward functions in TRL's shape ``(completions, **kwargs) -> list[float]`` work unchanged, next to ours
``(prompt, completion, example) -> float``: told apart by signature, sync or async; a function of neither
shape and records lacking a field the reward reads are refused before any model loads.

The TRL functions below are written as TRL's GRPOTrainer documentation writes them (a length reward on
standard-format completions, a format reward and a dataset-column reward on conversational ones: a chat
prompt's completion is ``[{"role": "assistant", "content": text}]``). They run on the real engine through
`RLHFTrainer` (the session engine) and through ``vllm-train grpo`` (its own process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from vllm_train.cli import main as cli_main
from vllm_train.config import LoRATrainConfig, RLHFConfig
from vllm_train.errors import VllmTrainError
from vllm_train.rewards import TOY_REWARD, load_reward_function, reward_style, score_with_function
from vllm_train.trainers.rl import RLHFTrainer, load_prompt_records


# ---- TRL's shape, as in TRL's docs ---------------------------------------------------------------
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^\d+$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def answer_reward(completions, answer, **kwargs):
    """Uses a dataset column (TRL passes every column as a keyword argument, one value per sample)."""
    return [1.0 if completion[0]["content"].strip().startswith(str(a)) else 0.0
            for completion, a in zip(completions, answer)]


async def async_answer_reward(prompts, completions, completion_ids, answer, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    return [float(len(ids) > 0) + (1.0 if c[0]["content"].strip().startswith(str(a)) else 0.0)
            for c, ids, a in zip(completions, completion_ids, answer)]


# ---- ours ----------------------------------------------------------------------------------------
def ours(prompt, completion, example):
    return float(len(completion))


async def ours_async(prompt, completion, example):
    return float(len(completion))


def neither(text):
    return 0.0


@pytest.mark.parametrize("fn, style", [(reward_len, "batch"), (answer_reward, "batch"), (async_answer_reward, "batch"),
                                       (lambda **kw: [0.0], "batch"), (ours, "sample"), (ours_async, "sample"),
                                       (lambda p, c, e: 0.0, "sample")])
def test_shape_is_read_from_the_signature(fn, style):
    assert reward_style(fn) == style


def test_a_function_of_neither_shape_is_refused_naming_both(tmp_path, tiny_model, shipped, capsys):
    with pytest.raises(VllmTrainError, match=r"neither \(prompt, completion, example\) -> float .* TRL's "
                                             r"\(completions, \*\*kwargs\) -> list\[float\]"):
        RLHFTrainer(tiny_model, config=RLHFConfig(), reward_fn=neither)
    module = tmp_path / "rewards.py"
    module.write_text("def two(a, b):\n    return 0.0\n")
    out = tmp_path / "out"
    assert cli_main(["grpo", "--model", tiny_model, "--prompts", str(shipped("rl_train.jsonl")), "--reward",
                     f"{module}:two", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two(a, b): takes neither" in err[0], err
    assert not out.exists()


def test_batch_rewards_get_trl_arguments():
    prompts = [[{"role": "user", "content": "What is 1 + 1?"}], "2 + 2 ="]
    examples = [{"prompt": prompts[0], "answer": 2}, {"prompt": prompts[1], "answer": 4, "level": "easy"}]
    seen = {}

    def spy(completions, **kwargs):
        seen.update(kwargs, completions=completions)
        return [1, 0.5]

    assert score_with_function(spy, prompts, ["2", "5"], examples, [[17], [18, 2]]) == [1.0, 0.5]
    # chat prompt: the completion as one assistant message; text prompt: the text; absent columns: None
    assert seen["completions"] == [[{"role": "assistant", "content": "2"}], "5"]
    assert seen["prompts"] == prompts and seen["completion_ids"] == [[17], [18, 2]]
    assert seen["answer"] == [2, 4] and seen["level"] == [None, "easy"] and "prompt" not in seen
    assert score_with_function(async_answer_reward, prompts[:1] * 2, ["2", "3"], examples[:1] * 2, [[1], [2]]) == \
        [2.0, 1.0]
    assert score_with_function(ours_async, ["p", "p"], ["ab", "abc"], [{}, {}]) == [2.0, 3.0]
    # without **kwargs, only the arguments the function names
    assert score_with_function(lambda completions, answer: [float(a) for a in answer], prompts, ["", ""],
                               examples) == [2.0, 4.0]


@pytest.mark.parametrize("fn, message", [
    (lambda completions, **kw: [1.0], "returned 1 values for 2 completions"),
    (lambda completions, **kw: [None, 1.0], "returned None \\(NoneType\\), expected a float"),
    (lambda completions, **kw: [float("nan"), 1.0], "returned nan for completion 0"),
    (lambda completions, **kw: 1 / 0, "raised ZeroDivisionError: division by zero \\(a batch of 2 completions\\)"),
])
def test_bad_batch_results_are_one_line(fn, message):
    with pytest.raises(VllmTrainError, match=message):
        score_with_function(fn, ["p", "p"], ["a", "b"], [{}, {}])


TRL_COLUMN_REWARD = "def answer_reward(completions, answer, **kwargs):\n    return [0.0 for _ in completions]\n"


@pytest.mark.parametrize("reward, record, line", [
    (TOY_REWARD, {"prompt": "What is 1 + 2?"}, "missing field 'answer'"),
    (TOY_REWARD, {"prompt": "What is 1 + 2?", "answer": "three"}, "field 'answer': 'three' is not an integer"),
    (TOY_REWARD, {"prompt": "What is 1 + 2?", "answer": float("nan")}, "field 'answer': nan is not an integer"),
    (TOY_REWARD, {"prompt": "What is 1 + 2?", "answer": float("inf")}, "field 'answer': inf is not an integer"),
    ("trl_rewards.py:answer_reward", {"prompt": "What is 1 + 2?"},
     "missing field 'answer' (reward trl_rewards:answer_reward takes it as a parameter)"),
])
def test_records_lacking_what_the_reward_reads_are_refused_by_line(tmp_path, tiny_model, capsys, reward, record,
                                                                     line):
    """A missing, NaN, inf or non-numeric `answer` would score every sample 0 (or fail mid-run): the
    first pass names the file and line, before any model loads. A TRL function's named parameters are
    the fields it needs (checked for presence: what they hold is the function's business)."""
    if reward.startswith("trl_rewards.py"):
        (tmp_path / "trl_rewards.py").write_text(TRL_COLUMN_REWARD)
        reward = str(tmp_path / reward)
    prompts = tmp_path / "prompts.jsonl"
    good = {"prompt": "What is 1 + 1?", "answer": 2}
    prompts.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out"
    assert cli_main(["grpo", "--model", tiny_model, "--prompts", str(prompts), "--reward", reward,
                     "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"prompts.jsonl:2: {line}" in err[0], err
    assert not out.exists()
    with pytest.raises(VllmTrainError, match="record 2: " + re.escape(line)):
        load_prompt_records([good, record], "prompts", load_reward_function(reward))


# ---- on the real engine ------------------------------------------------------------------------------
def _config(tmp_path) -> RLHFConfig:
    lora = LoRATrainConfig(rank=4, alpha=8, learning_rate=1e-3, batch_size=64, warmup_ratio=0.0,
                           lr_scheduler="constant", output_dir=str(tmp_path))
    return RLHFConfig(lora_config=lora, rollout_batch_size=2, group_size=2, max_new_tokens=6, seed=0)


@pytest.mark.parametrize("fn", [reward_len, format_reward_func, answer_reward, async_answer_reward])
def test_trl_rewards_train_on_the_real_engine(tmp_path, tiny_model, engine, shipped, fn):
    trainer = RLHFTrainer(tiny_model, config=_config(tmp_path), reward_fn=fn, engine=engine, progress=False)
    try:
        last = trainer.train(str(shipped("rl_train.jsonl")), num_steps=1)
        rollout = trainer.generate_rollouts(load_prompt_records(shipped("rl_train.jsonl"))[:2], seed=1)
        expected = fn(completions=[[{"role": "assistant", "content": c}] for c in rollout.completions]
                      if fn is not reward_len else rollout.completions, answer=[e["answer"] for e in rollout.examples],
                      prompts=rollout.prompts, completion_ids=rollout.completion_ids)
        if fn is async_answer_reward:
            import asyncio

            expected = asyncio.run(expected)
    finally:
        trainer.close()
    assert trainer.global_step == 1 and "reward_mean" in last
    if fn is reward_len:  # conversational prompts: TRL gives the length of a one-message list, as here
        expected = [-19] * len(rollout.completions)
    assert trainer.compute_rewards(rollout.prompts, rollout.completions, rollout.examples,
                                   rollout.completion_ids).tolist() == expected


def test_cli_grpo_runs_a_trl_reward_file_unchanged(tmp_path, tiny_model, shipped):
    """`vllm-train grpo --reward file.py:fn` with a TRL reward that reads a dataset column: 2 steps, the
    run's files written (its own process: one vLLM engine per process)."""
    module = tmp_path / "my_rewards.py"
    module.write_text(textwrap.dedent('''
        import re

        def accuracy_reward(completions, answer, **kwargs):
            contents = [completion[0]["content"] for completion in completions]
            return [1.0 if re.match(rf"\\s*{a}\\b", c) else 0.0 for c, a in zip(contents, answer)]
    '''))
    out = tmp_path / "out"
    argv = ["grpo", "--model", tiny_model, "--prompts", str(shipped("rl_train.jsonl")), "--reward",
            f"{module}:accuracy_reward", "--num-steps", "2", "--rollout-batch-size", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--rank", "2", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "vllm_train", *argv], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grpo: adapter written to" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("reward_mean" in m for m in metrics)
    assert json.loads((out / "resolved_config.json").read_text())["reward"] == "my_rewards:accuracy_reward"
