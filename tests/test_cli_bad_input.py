"""Bad input, table-driven: every (command, kind of bad input) exits 2 with exactly one `error: ...` line on
stderr naming the file or field, and leaves no output directory behind. Run in-process through
`vllm_train.cli.main`; the inputs are checked before any model or engine loads, so most cases are fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.cli import main

SFT, PREFS, RL = data_file("sft_train.jsonl"), data_file("prefs_train.jsonl"), data_file("rl_train.jsonl")
TINY = ["--rank", "2", "--target-modules", "q_proj", "--batch-size", "4", "--no-progress"]


def _lines(path: Path, n: int = 8) -> list[str]:
    return path.read_text().splitlines()[:n]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """Paths of the bad inputs, by name."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "utf8.jsonl": b'{"text": "fine"}\n{"text": "caf\xe9 \xff"}\n',
        "utf8_prefs.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "\xff"}\n',
        "utf8_rl.jsonl": b'{"prompt": "\xfe\xff"}\n',
        "utf8.yaml": b"learning_rate: 0.001\n# caf\xe9\n",
        "malformed.jsonl": b'{"text": "fine"}\n{"text": "unterminated}\n',
        "role.jsonl": b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
                      b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
        "role_rl.jsonl": b'{"prompt": [{"role": "usr", "content": "What is 1 + 1?"}]}\n',
        "long_rl.jsonl": json.dumps({"prompt": "one two three " * 1000, "answer": 3}).encode() + b"\n",
        "long_sft.jsonl": json.dumps({"prompt": "one two three " * 15, "completion": "4"}).encode() + b"\n",
        "long.txt": ("one two three " * 1000).encode(),
        "long_toy.jsonl": json.dumps({"prompt": "one two three " * 1000, "answer": 3}).encode() + b"\n",
        "rewards.py": b"def boom(*args, **kwargs):\n    raise RuntimeError('reward exploded')\n",
        "sharegpt.jsonl": b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}\n'
                          b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n',
        "alpaca.jsonl": b'{"instruction": "Add.", "input": "1 + 1", "output": "2"}\n{"instruction": "Add."}\n',
        "implicit.jsonl": json.dumps({side: [{"role": "user", "content": "a"}, {"role": "assistant", "content": side},
                                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
                                      for side in ("chosen", "rejected")}).encode() + b"\n",
        "implicit_text.jsonl": b'{"chosen": "Q: 1 + 1? A: 2", "rejected": "Q: 1 + 1? A: 3"}\n'
                               b'{"chosen": "Two", "rejected": "Three"}\n',
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    # a corrupt config.json, truncated weights: copies of the tiny model
    for name in ("model_config", "model_weights"):
        shutil.copytree(TINY_MODEL, root / name)
    (root / "model_config" / "config.json").write_text('{"model_type": "llama", ')
    weights = root / "model_weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _models_that_cannot_be_right(root)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    out = {name: str(root / name) for name in files}
    out.update(model_config=str(root / "model_config"), model_weights=str(root / "model_weights"),
               adapter=str(adapter), rewards=str(root), root=str(root))
    out.update({name: str(root / name) for name in BROKEN_MODELS})
    return out


# Model directories whose config.json and weights disagree: refused before anything loads them.
BROKEN_MODELS = {
    "model_int": "model.safetensors: tensor lm_head.weight is I32 (integers), but",
    "model_layers": "config.json: num_hidden_layers is 8, but the weights hold layers 0..3",
    "model_heads": "tensor model.layers.0.self_attn.q_proj.weight has shape (128, 128), but",
    "model_no_head": "config.json: tie_word_embeddings is false, but the weights hold no output head",
}


def _models_that_cannot_be_right(root: Path) -> None:
    """Copies of the tiny model, each with one thing wrong (`BROKEN_MODELS`)."""
    from safetensors.torch import load_file, save_file

    for name in BROKEN_MODELS:
        shutil.copytree(TINY_MODEL, root / name)
    weights = load_file(str(TINY_MODEL / "model.safetensors"))
    save_file({k: (v * 100).to(torch.int32) for k, v in weights.items()}, str(root / "model_int" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"},
              str(root / "model_no_head" / "model.safetensors"))
    for name, field, value in (("model_layers", "num_hidden_layers", 8), ("model_heads", "num_attention_heads", 4)):
        config = json.loads((TINY_MODEL / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, field: value}))


def train(command: str, data: str, *extra: str, model: str = str(TINY_MODEL)) -> list[str]:
    flag = {"grpo": "--prompts", "ppo": "--prompts"}.get(command, "--data")
    rl = ["--num-steps", "1", "--rollout-batch-size", "2", "--group-size", "2", "--max-new-tokens", "4"]
    reward = ["--reward", "vllm_train.toy:correctness_reward"] if command in ("grpo", "ppo") else []
    steps = rl if command in ("grpo", "ppo") else ["--max-steps", "1"]
    return [command, "--model", model, flag, data, *TINY, *steps, *reward, *extra]


def data_for(command: str) -> str:
    return {"sft": str(SFT), "dpo": str(PREFS), "rm": str(PREFS)}.get(command, str(RL))


TRAINERS = ("sft", "dpo", "rm", "grpo", "ppo")

# (case id, argv from the bad paths, what the error line must name)
CASES = [
    ("sft-utf8-data", lambda b: train("sft", b["utf8.jsonl"]), "utf8.jsonl:2: not valid UTF-8"),
    ("dpo-utf8-data", lambda b: train("dpo", b["utf8_prefs.jsonl"]), "utf8_prefs.jsonl:1: not valid UTF-8"),
    ("rm-utf8-data", lambda b: train("rm", b["utf8_prefs.jsonl"]), "utf8_prefs.jsonl:1: not valid UTF-8"),
    ("grpo-utf8-data", lambda b: train("grpo", b["utf8_rl.jsonl"]), "utf8_rl.jsonl:1: not valid UTF-8"),
    ("eval-utf8-data", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", b["utf8.jsonl"]],
     "utf8.jsonl:2: not valid UTF-8"),
    *[(f"{c}-utf8-config", lambda b, c=c: train(c, data_for(c), "--config", b["utf8.yaml"]),
       "utf8.yaml: not valid UTF-8") for c in TRAINERS],
    *[(f"{c}-model-config-json", lambda b, c=c: train(c, data_for(c), model=b["model_config"]),
       "model_config/config.json:1: malformed JSON") for c in TRAINERS],
    *[(f"{c}-model-weights", lambda b, c=c: train(c, data_for(c), model=b["model_weights"]),
       "model.safetensors: truncated or corrupt") for c in TRAINERS],
    *[(f"{c}-{m}", lambda b, c=c, m=m: train(c, data_for(c), model=b[m]), named) for m, named in BROKEN_MODELS.items()
      for c in ("sft", "grpo")],
    *[(f"{c}-model-layers", lambda b, c=c, more=more: [c, "--model", b["model_layers"], *more(b)],
       BROKEN_MODELS["model_layers"])
      for c, more in (("eval", lambda b: ["--data", str(SFT)]), ("generate", lambda b: ["--prompt", "hi"]),
                      ("serve", lambda b: []), ("merge", lambda b: ["--adapter", b["adapter"]]),
                      ("dpo", lambda b: ["--data", str(PREFS), *TINY]),
                      ("rm", lambda b: ["--data", str(PREFS), *TINY]))],
    ("eval-model-config-json", lambda b: ["eval", "--model", b["model_config"], "--data", str(SFT)],
     "config.json:1: malformed JSON"),
    ("generate-model-config-json", lambda b: ["generate", "--model", b["model_config"], "--prompt", "hi"],
     "config.json:1: malformed JSON"),
    ("generate-model-weights", lambda b: ["generate", "--model", b["model_weights"], "--prompt", "hi"],
     "model.safetensors: truncated or corrupt"),
    ("eval-model-weights", lambda b: ["eval", "--model", b["model_weights"], "--data", str(SFT)],
     "model.safetensors: truncated or corrupt"),
    ("serve-model-config-json", lambda b: ["serve", "--model", b["model_config"]], "config.json:1: malformed JSON"),
    *[(f"{c}-broken-adapter-config", lambda b, c=c: train(c, data_for(c), "--adapter", b["adapter"]),
       "adapter_config.json") for c in ("sft", "dpo", "rm", "grpo")],
    ("eval-broken-adapter-config", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", str(SFT),
                                              "--adapter", b["adapter"]], "adapter_config.json"),
    ("generate-broken-adapter-config", lambda b: ["generate", "--model", str(TINY_MODEL), "--prompt", "hi",
                                                  "--adapter", b["adapter"]], "adapter_config.json"),
    ("push-broken-adapter-config", lambda b: ["push", "--server", "http://127.0.0.1:9", "--name", "x",
                                              "--adapter", b["adapter"]], "adapter_config.json"),
    ("merge-model-config-json", lambda b: ["merge", "--model", b["model_config"], "--adapter", b["adapter"]],
     "config.json:1: malformed JSON"),
    ("merge-model-weights", lambda b: ["merge", "--model", b["model_weights"], "--adapter", b["adapter"]],
     "model.safetensors: truncated or corrupt"),
    ("merge-broken-adapter-config", lambda b: ["merge", "--model", str(TINY_MODEL), "--adapter", b["adapter"]],
     "adapter_config.json"),
    ("eval-batch-size-0", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", str(SFT), "--batch-size", "0"],
     "--batch-size"),
    ("eval-max-length-0", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", str(SFT), "--max-length", "0"],
     "--max-length"),
    ("generate-temperature-nan", lambda b: ["generate", "--model", str(TINY_MODEL), "--prompt", "hi",
                                            "--temperature", "nan"], "--temperature"),
    ("generate-top-p-2", lambda b: ["generate", "--model", str(TINY_MODEL), "--prompt", "hi", "--top-p", "2"],
     "--top-p"),
    ("generate-prompt-too-long", lambda b: ["generate", "--model", str(TINY_MODEL),
                                            "--prompt", Path(b["long.txt"]).read_text()], "context"),
    ("eval-prompt-too-long", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", b["long_toy.jsonl"]],
     "long_toy.jsonl: record 1 is"),
    ("sft-unknown-role", lambda b: train("sft", b["role.jsonl"]), "role.jsonl:2: field 'messages'[0]: role 'robot'"),
    ("eval-unknown-role", lambda b: ["eval", "--model", str(TINY_MODEL), "--data", b["role.jsonl"]],
     "role.jsonl:2: field 'messages'[0]: role 'robot'"),
    ("grpo-unknown-role", lambda b: train("grpo", b["role_rl.jsonl"]),
     "role_rl.jsonl:1: field 'prompt'[0]: role 'usr'"),
    ("grpo-prompt-too-long", lambda b: train("grpo", b["long_rl.jsonl"]), "long_rl.jsonl: record 1"),
    ("ppo-prompt-too-long", lambda b: train("ppo", b["long_rl.jsonl"]), "long_rl.jsonl: record 1"),
    ("sft-sample-longer-than-context", lambda b: train("sft", b["long_sft.jsonl"]),
     "long_sft.jsonl: 1 of 1 examples are longer than the model's context of 128 tokens"),
    ("sft-malformed-json", lambda b: train("sft", b["malformed.jsonl"]),
     "malformed.jsonl:2: malformed JSON (Unterminated string starting at column 10)"),
    ("sft-sharegpt-role", lambda b: train("sft", b["sharegpt.jsonl"]),
     "sharegpt.jsonl:2: field 'conversations'[1].from: 'robot' is not a ShareGPT role"),
    ("sft-alpaca-no-output", lambda b: train("sft", b["alpaca.jsonl"]), "alpaca.jsonl:2: missing field 'output'"),
    *[(f"{c}-implicit-prompt-differs-early", lambda b, c=c: train(c, b["implicit.jsonl"]),
       "implicit.jsonl:1: field 'chosen'[2] is a 'user' message after the shared prompt") for c in ("dpo", "rm")],
    *[(f"{c}-implicit-text-no-prompt", lambda b, c=c: train(c, b["implicit_text.jsonl"]),
       "implicit_text.jsonl:2: fields 'chosen' and 'rejected' share no prompt") for c in ("dpo", "rm")],
    *[(f"{c}-split-without-dataset-name", lambda b, c=c: train(c, data_for(c), "--split", "test"),
       "--split needs --dataset-name") for c in TRAINERS],
    *[(f"{c}-data-and-dataset-name", lambda b, c=c: train(c, data_for(c), "--dataset-name", "acme/x"),
       "and --dataset-name: give one of them") for c in TRAINERS],
    *[(f"{c}-no-data", lambda b, c=c: [a for a in train(c, "-") if a not in ("--data", "--prompts", "-")],
       "no data: give --") for c in TRAINERS],
    ("dpo-eval-split-and-eval-data", lambda b: ["dpo", "--model", str(TINY_MODEL), "--dataset-name", "acme/x",
                                                "--eval-data", str(PREFS), "--eval-split", "test", *TINY],
     "--eval-split and --eval-data: give one held-out set"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output_dir(case, bad, tmp_path, capsys):
    _, argv, named = case
    argv = argv(bad)
    out = tmp_path / "out"
    if argv[0] in (*TRAINERS, "merge"):
        argv = [*argv, "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert named in err[0], err[0]
    assert "at at" not in err[0]
    assert not out.exists()


def test_failing_reward_function_leaves_no_output_dir(bad, tmp_path):
    """The reward function fails at the first step (after the model and engine loaded: their progress bars
    are on stderr too): one error line, no traceback, exit 2, and the half-made run directory is removed
    (no checkpoint was written, nothing to resume)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = [a if a != "vllm_train.toy:correctness_reward" else "rewards:boom" for a in train("grpo", str(RL))]
    # its own process: one vLLM engine per process (a second in-process engine, closed, would tear down
    # the session engine's vLLM state)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bad["rewards"]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "vllm_train", *argv, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "reward exploded" in err[-1], err[-1]
    assert not [line for line in err[:-1] if "error" in line.lower() or "Traceback" in line]
    assert not out.exists()


def test_utf8_bom_is_accepted_in_data_and_config(tmp_path, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(_lines(SFT)).encode() + b"\n")
    config = tmp_path / "bom.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"learning_rate": 1e-3}).encode())
    out = tmp_path / "out"
    assert main(train("sft", str(data), "--config", str(config), "--output-dir", str(out))) == 0
    assert json.loads((out / "resolved_config.json").read_text())["learning_rate"] == 1e-3
    assert (out / "adapter_model.safetensors").is_file()


def test_samples_longer_than_max_length_are_truncated_with_one_warning(tmp_path):
    """Run as the user does (a fresh process: pytest would capture the warning in-process)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vllm_train",
                           *train("sft", str(SFT), "--max-length", "16", "--output-dir", str(out), "--no-progress")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert "sft_train.jsonl" in warnings[0]
    assert "of 2000 records are longer than max_length=16 tokens and were truncated" in warnings[0]
