"""`--dataset-name ORG/NAME [--dataset-config C] [--split S] [--eval-split S]`: a hub dataset read offline.

An online `datasets.load_dataset("ORG/NAME")` leaves the repo's README and the data files it read in the hub
cache (datasets--ORG--NAME/snapshots/<commit>/ + refs/main). Here that cache is laid out by hand with parquet
files and a README whose configs pick them, and the command runs in its own process with HF_HUB_OFFLINE=1
(`datasets` reads the offline switches when it is imported), exactly as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "acme/chat"

README = """---
configs:
- config_name: sharegpt
  data_files:
  - split: train
    path: sharegpt/train-*
  - split: test
    path: sharegpt/test-*
- config_name: prompts
  data_files:
  - split: train
    path: prompts/train-*
  - split: test
    path: prompts/test-*
- config_name: broken
  data_files:
  - split: train
    path: broken/train-*
---
# acme/chat
"""


def sharegpt(a: int, b: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"What is {a} + {b}?"}, {"from": "gpt", "value": str(a + b)}]}


def rl_prompt(a: int, b: int) -> dict:  # chat messages + the field the reward reads
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}


FILES = {
    "prompts/train-00000-of-00001.parquet": [rl_prompt(a, 5) for a in range(6)],
    "prompts/test-00000-of-00001.parquet": [rl_prompt(a, 3) for a in range(2)],
    "sharegpt/train-00000-of-00001.parquet": [sharegpt(a, 7) for a in range(8)],
    "sharegpt/test-00000-of-00001.parquet": [sharegpt(a, 9) for a in range(3)],
    "broken/train-00000-of-00001.parquet": [sharegpt(1, 2), {"conversations": [{"from": "human", "value": "hi"},
                                                                                {"from": "robot", "value": "x"}]}],
}
TINY = ["--rank", "2", "--target-modules", "q_proj", "--batch-size", "2", "--gradient-accumulation-steps", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds REPO at COMMIT (its main revision), as an online load leaves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("datasets--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for rel, rows in FILES.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), snapshot / rel)
    (snapshot / "README.md").write_text(README)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def run_cli(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vllm_train", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_sft_on_a_hub_dataset_offline_with_trl_names_in_the_config_file(hf_home, tiny_model, tmp_path):
    from vllm_train.data.formats import sft_record
    from vllm_train.trainers.run_files import data_hash

    run = tmp_path / "run.yaml"  # TRL's ScriptArguments names; --split given as a flag
    run.write_text(f"dataset_name: {REPO}\ndataset_config: sharegpt\ndataset_test_split: test\n")
    out = tmp_path / "out"
    proc = run_cli(["sft", "--config", str(run), "--model", tiny_model, "--split", "train", "--output-dir", str(out),
                    "--max-steps", "3", "--save-steps", "2", *TINY], hf_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics), metrics  # the test split was held out
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    trained = [sft_record(r, chat=True) for r in FILES["sharegpt/train-00000-of-00001.parquet"]]
    assert state["fingerprint"]["data"] == data_hash(trained)  # exactly the records of config sharegpt, split train


def test_hub_dataset_errors_are_one_line_exit_2(hf_home, tiny_model, tmp_path):
    cases = [
        (["--dataset-name", "acme/missing"], "error: dataset acme/missing[train]: offline (HF_HUB_OFFLINE / "
                                             "HF_DATASETS_OFFLINE) and not in the datasets cache"),
        (["--dataset-name", REPO, "--dataset-config", "broken"],
         f"error: {REPO}[broken:train]: record 2: field 'conversations'[1].from: 'robot' is not a ShareGPT role"),
        (["--dataset-name", REPO, "--dataset-config", "sharegpt", "--split", "validation"],
         f"error: dataset {REPO}[sharegpt:validation]: Unknown split"),
    ]
    for extra, line in cases:
        out = tmp_path / "out"
        proc = run_cli(["sft", "--model", tiny_model, *extra, "--output-dir", str(out), "--max-steps", "1", *TINY],
                       hf_home)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(line), (extra, proc.stderr[-3000:])
        assert not out.exists()


def test_eval_on_a_hub_dataset_matches_eval_on_the_same_records_in_a_file(hf_home, tiny_model, tmp_path):
    """Oracle: the same records written to a --data file. ShareGPT rows go through the same format detection."""
    records = FILES["sharegpt/test-00000-of-00001.parquet"]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {}
    for name, source in (("file", ["--data", str(data)]),
                         ("hub", ["--dataset-name", REPO, "--dataset-config", "sharegpt", "--split", "test"])):
        out = tmp_path / f"{name}.json"
        proc = run_cli(["eval", "--model", tiny_model, *source, "--json-out", str(out)], hf_home)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    assert results["file"]["perplexity/base"]["num_tokens"] > 0
    assert results["hub"] == results["file"]


def test_eval_data_source_errors_are_one_line_exit_2(hf_home, tiny_model, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(sharegpt(1, 2)) + "\n")
    cases = [
        (["--dataset-name", "acme/missing"], "error: dataset acme/missing[train]: offline (HF_HUB_OFFLINE / "
                                             "HF_DATASETS_OFFLINE) and not in the datasets cache"),
        (["--data", str(data), "--dataset-name", REPO], "error: --data and --dataset-name: give one of them"),
        ([], "error: no data: give --data FILE or --dataset-name ORG/NAME"),
        (["--data", str(data), "--split", "test"], "error: --split needs --dataset-name"),
    ]
    for extra, line in cases:
        out = tmp_path / "out.json"
        proc = run_cli(["eval", "--model", tiny_model, *extra, "--json-out", str(out)], hf_home)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(line), (extra, proc.stderr[-3000:])
        assert not out.exists()


def test_rl_prompts_from_a_hub_dataset_equal_the_same_records_in_a_file(hf_home, tmp_path):
    """grpo/ppo's data path (`data_sources` -> `load_prompt_records`) on --dataset-name, offline, against the
    same rows written to --prompts files (oracle: the file reader); the reward's extra field comes along."""
    from vllm_train.trainers.rl_rollouts import load_prompt_records

    script = f"""
import argparse, json
from vllm_train.commands._data import data_sources
from vllm_train.trainers.rl_rollouts import load_prompt_records
args = argparse.Namespace(prompts=None, eval_prompts=None, dataset_name={REPO!r}, dataset_config="prompts",
                          split="train", eval_split="test")
train, held_out = data_sources(args, "prompts", "eval_prompts")
print(json.dumps([load_prompt_records(train, "prompts"), load_prompt_records(held_out, "eval prompts")]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_DATASETS_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub_train, hub_test = json.loads(proc.stdout.strip().splitlines()[-1])
    for split, hub in (("train", hub_train), ("test", hub_test)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in FILES[f"prompts/{split}-00000-of-00001.parquet"]))
        assert hub == load_prompt_records(path, "prompts")
    assert len(hub_train) == 6 and hub_train[0]["answer"] == "5" and hub_train[0]["prompt"][0]["role"] == "user"
