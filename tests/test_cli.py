"""The CLI on bad input: one line on stderr naming the problem, exit status 2, no output dir left."""

import subprocess
import sys

import pytest

from vllm_train.cli import main


@pytest.fixture
def sft_args(tiny_model, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1 + 1 = ", "completion": "2"}\n')

    def make(**over):
        args = {"--model": tiny_model, "--data": str(good), "--output-dir": str(tmp_path / "out"),
                "--max-steps": "1", "--no-progress": None}
        args.update(over)
        flat = ["sft"]
        for k, v in args.items():
            if v is False:
                continue
            flat += [k] if v is None else [k, v]
        return flat

    return make


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', "bad.jsonl:2: malformed JSON"),
    ('{"prompt": "a"}\n', "bad.jsonl:1: missing field 'completion'"),
    ("", "bad.jsonl: SFT dataset is empty"),
])
def test_bad_data(sft_args, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    code, err = run_cli(sft_args(**{"--data": str(bad)}), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--rank", "0", "'rank'"), ("--learning-rate", "-1", "'learning_rate'"), ("--dropout", "1.5", "'dropout'"),
    ("--batch-size", "many", "'batch_size'"), ("--rank", "1024", "rank"),
    ("--model", "/no/such/model", "model path not found: /no/such/model"),
    ("--data", "/no/such.jsonl", "not found: /no/such.jsonl"),
    ("--config", "/no/such.yaml", "config file not found"),
])
def test_bad_values_and_paths(sft_args, tmp_path, capsys, flag, value, needle):
    code, err = run_cli(sft_args(**{flag: value}), capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused(sft_args, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = run_cli(sft_args(), capsys)
    assert code == 2 and "not empty" in err[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_real_process_exit_code_and_help():
    done = subprocess.run([sys.executable, "-m", "vllm_train.cli", "sft", "--model", "/nope", "--data", "x.jsonl",
                           "--output-dir", "/tmp/never-made-by-vllm-train"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "error: model path not found: /nope " \
        "(expected a local Hugging Face model directory)"
    helped = subprocess.run([sys.executable, "-m", "vllm_train.cli", "sft", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "Loss is taken on assistant/completion tokens only" in helped.stdout
    assert "--learning-rate" in helped.stdout and "example:" in helped.stdout


@pytest.mark.vllm
def test_sft_then_eval_then_generate_end_to_end(tiny_model, tmp_path):
    """The commands as a user runs them (own processes: each builds its own vLLM engine)."""
    from vllm_train.assets import data_file

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "vllm_train.cli", *args], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    out = tmp_path / "sft"
    cli("sft", "--model", tiny_model, "--data", str(data_file("sft_train.jsonl")), "--output-dir", str(out),
        "--max-steps", "120", "--batch-size", "32", "--gradient-accumulation-steps", "1", "--learning-rate", "3e-3",
        "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--max-length", "64",
        "--no-progress")
    report = tmp_path / "eval.json"
    cli("eval", "--model", tiny_model, "--adapter", str(out), "--data", str(data_file("sft_eval.jsonl")),
        "--json-out", str(report))
    import json

    results = json.loads(report.read_text())
    assert results["toy/adapter"]["accuracy"] >= results["toy/base"]["accuracy"] + 0.15, results
    assert results["perplexity/adapter"]["perplexity"] < results["perplexity/base"]["perplexity"]
    text = cli("generate", "--model", tiny_model, "--adapter", str(out), "--chat", "What is 47 + 38?", "--json")
    assert json.loads(text.strip().splitlines()[-1])["completion"].strip() != ""
