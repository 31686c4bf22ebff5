"""Bad input of every kind, table-driven, over broken fixtures built here: model directories that do not
match or are incomplete, tokenizers and chat templates that do not load, data at the edges of JSON and
Unicode, arguments and paths that cannot work, adapters for another base. Each case exits 2 with exactly
one ``error: ...`` line on stderr naming the file (or the option), and leaves no output directory behind.

Run in-process through `vllm_train.cli.main`: every refusal comes before any vLLM engine starts (the
model directory is checked up front, `vllm_train.model_dir`), so the table is fast."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.cli import main

SFT, PREFS, RL = (str(data_file(f"{name}_train.jsonl")) for name in ("sft", "prefs", "rl"))
SMALL = ["--rank", "2", "--target-modules", "q_proj", "--batch-size", "2", "--no-progress"]


def _model_copy(root: Path, name: str, config: dict | None = None, drop: tuple[str, ...] = (),
                files: dict[str, str] | None = None) -> str:
    """The tiny model under root/name (its files linked), with config.json fields replaced, files dropped
    or written."""
    out = root / name
    out.mkdir()
    for f in Path(TINY_MODEL).iterdir():
        if f.name not in drop and f.name not in (files or {}) and not (config and f.name == "config.json"):
            (out / f.name).symlink_to(f)
    if config:
        base = json.loads((Path(TINY_MODEL) / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**base, **config}))
    for file, text in (files or {}).items():
        (out / file).write_text(text)
    return str(out)


def _adapter(root: Path, name: str, base: str, module: str = "q_proj") -> str:
    """A valid rank-2 LoRA on layer 0's `module` (zero B: no update) naming `base` as its base model."""
    out = root / name
    out.mkdir()
    prefix = f"base_model.model.model.layers.0.self_attn.{module}"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 128), f"{prefix}.lora_B.weight": torch.zeros(128, 2)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": [module], "base_model_name_or_path": base}))
    return str(out)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-table")
    out = {
        "hidden256": _model_copy(root, "hidden256", {"hidden_size": 256}),
        "inter512": _model_copy(root, "inter512", {"intermediate_size": 512}),  # only the meta-model check sees it
        "no_weights": _model_copy(root, "no_weights", drop=("model.safetensors",)),
        "layers_four": _model_copy(root, "layers_four", {"num_hidden_layers": "four"}),
        "vocab0": _model_copy(root, "vocab0", {"vocab_size": 0}),
        "unknown_type": _model_copy(root, "unknown_type", {"model_type": "llamaish"}),
        "tokenizer_json": _model_copy(root, "tokenizer_json", files={"tokenizer.json": '{"version": "1.0",'}),
        "tokenizer_config": _model_copy(root, "tokenizer_config", files={"tokenizer_config.json": "{'eos': 1}"}),
        "no_vocab": _model_copy(root, "no_vocab", drop=("tokenizer.json",), files={
            "tokenizer_config.json": '{"tokenizer_class": "LlamaTokenizer"}'}),
        "sentencepiece": _model_copy(root, "sentencepiece", drop=("tokenizer.json",), files={
            "tokenizer_config.json": '{"tokenizer_class": "LlamaTokenizer"}', "tokenizer.model": "not a model"}),
        "template_syntax": _model_copy(root, "template_syntax", files={
            "chat_template.jinja": "{% for m in messages %}{{ m['content'] }"}),
        "template_raises": _model_copy(root, "template_raises", files={
            "chat_template.jinja": "{{ raise_exception('this template takes no chats') }}"}),
        "reward_2_labels": _model_copy(root, "reward_2_labels", {"architectures": ["LlamaForSequenceClassification"],
                                                                 "id2label": {"0": "bad", "1": "good"}}),
        "truncated": _model_copy(root, "truncated", drop=("model.safetensors",)),
    }
    weights = (Path(TINY_MODEL) / "model.safetensors").read_bytes()
    (Path(out["truncated"]) / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    lines = {
        "bigint.jsonl": '{"text": "a", "n": ' + "7" * 5000 + "}",
        "deep.jsonl": '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "surrogate.jsonl": '{"text": "fine \\ud800 text"}',
        "surrogate_prefs.jsonl": '{"prompt": "p", "chosen": "\\udfff", "rejected": "b"}',
        "surrogate_rl.jsonl": '{"prompt": "\\ud800", "answer": 2}',
        "nul.jsonl": '{"text": "bin\\u0000ary"}',
        "answer_text.jsonl": '{"prompt": "What is 1 + 2?", "answer": "three"}',
        "answer_nan.jsonl": '{"prompt": "What is 1 + 2?", "answer": NaN}',
        "answer_inf.jsonl": '{"prompt": "What is 1 + 2?", "answer": Infinity}',
        "answer_huge.jsonl": '{"prompt": "What is 1 + 2?", "answer": ' + "9" * 5000 + "}",
        "answer_missing.jsonl": '{"prompt": "What is 1 + 2?"}',
        "bad_template.jinja": "{% if messages %}{{ messages[0]['content'] }",
        "lora_not_mapping.yaml": "lora_config: 5\n",
        "a_file": "not a directory",
    }
    for name, text in lines.items():
        (root / name).write_text(text + "\n")
        out[name] = str(root / name)
    os.mkfifo(root / "fifo.jsonl")
    out["fifo.jsonl"] = str(root / "fifo.jsonl")
    out["other_base_adapter"] = _adapter(root, "other_base_adapter", "someone/another-model")
    out["unknown_module_adapter"] = _adapter(root, "unknown_module_adapter", str(TINY_MODEL), "bogus_proj")
    out["root"] = str(root)
    return out


def sft(data: str = SFT, *extra: str, model: str = str(TINY_MODEL)) -> list[str]:
    return ["sft", "--model", model, "--data", data, "--max-steps", "1", *SMALL, *extra]


def grpo(prompts: str = RL, *extra: str, model: str = str(TINY_MODEL)) -> list[str]:
    return ["grpo", "--model", model, "--prompts", prompts, "--reward", "vllm_train.toy:correctness_reward",
            "--num-steps", "1", "--rollout-batch-size", "2", "--group-size", "2", *SMALL, *extra]


def generate(*extra: str, model: str = str(TINY_MODEL)) -> list[str]:
    return ["generate", "--model", model, "--chat", "What is 1 + 1?", *extra]


def evaluate(data: str = SFT, *extra: str, model: str = str(TINY_MODEL)) -> list[str]:
    return ["eval", "--model", model, "--data", data, *extra]


MODEL_CASES = [  # (fixture, what the line says): on sft, grpo, generate and eval
    ("hidden256", "hidden256/config.json says (vocabulary, 256)"),  # the header check (model_dir) speaks first
    ("inter512", "inter512/config.json describes"),
    ("no_weights", "no_weights: no weight files"),
    ("layers_four", "config.json: field 'num_hidden_layers' is 'four', expected an integer >= 1"),
    ("vocab0", "config.json: field 'vocab_size' is 0"),
    ("unknown_type", "config.json: model_type 'llamaish' is not a model transformers knows"),
    ("truncated", "truncated/model.safetensors: truncated or corrupt"),
    ("tokenizer_json", "tokenizer_json/tokenizer.json:1: malformed JSON"),
    ("tokenizer_config", "tokenizer_config/tokenizer_config.json:1: malformed JSON"),
    ("no_vocab", "no_vocab: the tokenizer has no vocabulary"),
    ("sentencepiece", "sentencepiece: tokenizer: ValueError: Error parsing line"),
    ("template_syntax", "template_syntax/chat_template.jinja: chat template syntax error at line 1"),
    ("template_raises", "template_raises/chat_template.jinja: chat template error: this template takes no chats"),
]

CASES = [
    *[(f"model-{name}-{cmd.__name__}", lambda b, n=name, c=cmd: c(model=b[n]), needle)
      for name, needle in MODEL_CASES for cmd in (sft, grpo, generate, evaluate)],
    ("chat-template-file-syntax", lambda b: sft(SFT, "--chat-template", b["bad_template.jinja"]),
     "bad_template.jinja: chat template syntax error"),
    ("generate-chat-template-file-syntax", lambda b: generate("--chat-template", b["bad_template.jinja"]),
     "bad_template.jinja: chat template syntax error"),
    ("ppo-reward-model-2-labels", lambda b: ["ppo", "--model", str(TINY_MODEL), "--prompts", RL, "--reward-model",
                                             b["reward_2_labels"], *SMALL], "config.json: 2 labels, expected 1"),
    # data at the edges of JSON and Unicode
    ("sft-5000-digit-integer", lambda b: sft(b["bigint.jsonl"]), "bigint.jsonl:1: an integer too long to read"),
    ("sft-nested-100000-deep", lambda b: sft(b["deep.jsonl"]), "deep.jsonl:1: JSON nested too deeply"),
    ("sft-lone-surrogate", lambda b: sft(b["surrogate.jsonl"]),
     "surrogate.jsonl:1: field 'text' holds a lone surrogate"),
    ("dpo-lone-surrogate", lambda b: ["dpo", "--model", str(TINY_MODEL), "--data", b["surrogate_prefs.jsonl"], *SMALL],
     "surrogate_prefs.jsonl:1: field 'chosen' holds a lone surrogate"),
    ("grpo-lone-surrogate", lambda b: grpo(b["surrogate_rl.jsonl"]),
     "surrogate_rl.jsonl:1: field 'prompt' holds a lone surrogate"),
    ("sft-nul-character", lambda b: sft(b["nul.jsonl"]), "nul.jsonl:1: field 'text' holds a NUL character"),
    ("sft-fifo-as-data", lambda b: sft(b["fifo.jsonl"]), "fifo.jsonl: not a regular file"),
    ("sft-fifo-as-config", lambda b: sft(SFT, "--config", b["fifo.jsonl"]), "fifo.jsonl: not a regular file"),
    *[(f"eval-{name}", lambda b, n=name: evaluate(b[f"{n}.jsonl"]), needle) for name, needle in (
        ("answer_text", "answer_text.jsonl:1: field 'answer': 'three' is not an integer"),
        ("answer_nan", "answer_nan.jsonl:1: field 'answer': nan is not an integer"),
        ("answer_inf", "answer_inf.jsonl:1: field 'answer': inf is not an integer"),
        ("answer_huge", "answer_huge.jsonl:1: an integer too long to read"))],
    ("grpo-answer-missing", lambda b: grpo(b["answer_missing.jsonl"]),
     "answer_missing.jsonl:1: missing field 'answer'"),
    # arguments and paths
    ("sft-seed-2**64", lambda b: sft(SFT, "--seed", str(2**64)),
     "config field 'seed': 18446744073709551616 is invalid"),
    ("sft-seed-negative", lambda b: sft(SFT, "--seed", "-1"), "config field 'seed': -1 is invalid"),
    ("grpo-seed-negative", lambda b: grpo(RL, "--seed", "-1"), "config field 'seed': -1 is invalid"),
    ("generate-seed-negative", lambda b: generate("--seed", "-1"), "--seed: -1 is invalid"),
    ("sft-output-dir-under-a-file", lambda b: sft(SFT, "--output-dir", b["a_file"] + "/out"),
     "a_file is a file, not a directory"),
    ("sft-output-dir-in-proc", lambda b: sft(SFT, "--output-dir", "/proc/vllm-train-test"),
     "--output-dir /proc/vllm-train-test: cannot create files in /proc"),
    ("eval-json-out-missing-dir", lambda b: evaluate(SFT, "--json-out", b["root"] + "/missing/r.json"),
     "missing/r.json: directory"),
    ("eval-json-out-onto-a-dir", lambda b: evaluate(SFT, "--json-out", b["root"]), "is a directory (give a file path)"),
    ("push-timeout-nan", lambda b: ["push", "--server", "http://127.0.0.1:9", "--name", "x", "--adapter",
                                    b["other_base_adapter"], "--timeout", "nan"], "--timeout: nan is invalid"),
    ("grpo-lora-config-not-a-mapping", lambda b: grpo(RL, "--config", b["lora_not_mapping.yaml"]),
     "config field 'lora_config': 5 is invalid"),
    ("grpo-clip-range-high-inf", lambda b: grpo(RL, "--clip-range-high", "inf"),
     "config field 'clip_range_high': inf is invalid (a finite number)"),
    ("grpo-tis-cap-inf", lambda b: grpo(RL, "--tis-cap", "inf"), "config field 'tis_cap': inf is invalid"),
    ("rm-head-learning-rate-inf", lambda b: ["rm", "--model", str(TINY_MODEL), "--data", PREFS, *SMALL,
                                             "--head-learning-rate", "inf"], "config field 'head_learning_rate': inf"),
    ("sft-misspelt-target", lambda b: [*sft(SFT), "--target-modules", "q_proj,bogus_proj"],
     "target_modules: bogus_proj match no linear layer of LlamaForCausalLM"),
    # adapters
    ("generate-adapter-of-another-base", lambda b: generate("--adapter", b["other_base_adapter"]),
     "adapter was trained on base model 'someone/another-model'"),
    ("eval-adapter-of-another-base", lambda b: evaluate(SFT, "--adapter", b["other_base_adapter"]),
     "(pass --allow-other-base to apply it anyway)"),
    ("generate-adapter-unknown-module", lambda b: generate("--adapter", b["unknown_module_adapter"]),
     "is for module 'model.layers.0.self_attn.bogus_proj', which"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_naming_the_file(case, bad, tmp_path, capsys):
    _, argv, named = case
    argv = argv(bad)
    out = tmp_path / "out"
    if argv[0] in ("sft", "dpo", "rm", "grpo", "ppo") and "--output-dir" not in argv:
        argv = [*argv, "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert named in err[0], err[0]
    assert not out.exists()
    assert not list(Path(bad["root"]).glob("**/.vllm-train-write-test-*"))


def test_report_to_wandb_without_a_login_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert main([*sft(SFT), "--report-to", "wandb", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_to': wandb is not logged in" in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_base_is_applied_when_allowed(bad):
    from vllm_train.lora.validate import OTHER_BASE_HINT, validate_adapter

    assert validate_adapter(bad["other_base_adapter"], str(TINY_MODEL))["r"] == 2  # shapes fit: only the name differs
    with pytest.raises(Exception, match="another-model"):
        validate_adapter(bad["other_base_adapter"], str(TINY_MODEL), check_base_name=True, allow_hint=OTHER_BASE_HINT)


def test_lm_head_is_adapted_only_by_name_with_a_warning(tiny_model):
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with pytest.warns(UserWarning, match="lm_head \\(the output layer\\) is adapted"):
        LoRAInjector(LoRATrainConfig(rank=2, target_modules=["q_proj", "lm_head"])).inject(model)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    all_linear = LoRAInjector(LoRATrainConfig(rank=2, target_modules=["all-linear"]))
    all_linear.inject(fresh)
    assert not any(name.endswith("lm_head") for name in all_linear.lora_layers)


def test_the_shipped_model_passes_the_checks_unchanged(tmp_path):
    from vllm_train.model_dir import check_model_dir

    check_model_dir(TINY_MODEL)
    copy = tmp_path / "copy"
    shutil.copytree(TINY_MODEL, copy)
    check_model_dir(copy, Path(TINY_MODEL) / "chat_template.jinja")


@pytest.mark.parametrize("argv, line", [
    (["eval", "--model", str(TINY_MODEL), "--data", SFT], "eval runs in one process"),
    (sft(SFT, "--tensor-parallel-size", "3"), "tensor_parallel_size: 3 does not divide the 2 rank(s)"),
    (sft(RL), "rl_train.jsonl:1: missing field 'completion'"),
])
def test_under_torchrun_a_refusal_is_one_line_per_rank_and_names_the_cause_in_torchruns_report(tmp_path, argv, line):
    """Each rank prints its one line and exits 2, without a traceback of its own; torchrun's failure report
    (its own, printed by the launcher) shows that line, written to the error file torchrun reads."""
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = [*argv, "--output-dir", str(out)] if argv[0] == "sft" else argv
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "vllm_train", *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("[rank ")]
    ours.sort()
    # rank 1 may be stopped by torchrun (SIGTERM) before it prints: one or two lines, each the cause
    assert 1 <= len(ours) <= 2 and all(o.split("] ", 1)[1].startswith("error: ") and line in o for o in ours), \
        proc.stderr[-3000:]
    frames = [f for f in proc.stderr.splitlines() if f.strip().startswith('File "')]
    assert frames and not [f for f in frames if "vllm_train" in f]  # only torchrun's own launcher traceback
    assert "traceback : [rank 0] error: " in proc.stderr
    assert not out.exists()
