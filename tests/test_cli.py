"""The CLI on bad input: one line on stderr naming the problem, exit status 2, no output dir left."""

import json
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


# ---- flags <-> config fields (commands/_common.py: one table-driven mapping) ------------------------
def _parser_flags(command: str) -> tuple[set[str], str]:
    """(option strings, --help text) of one command."""
    import argparse

    from vllm_train.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {o for a in parser._actions for o in a.option_strings}, parser.format_help()


@pytest.mark.parametrize("command,config_path,skipped", [
    ("sft", "vllm_train.config:LoRATrainConfig", set()),
    ("dpo", "vllm_train.trainers.dpo:DPOConfig", set()),
    ("rm", "vllm_train.trainers.rm:RewardModelConfig", set()),
    ("grpo", "vllm_train.config:RLHFConfig", {"lora_config." + n for n in (
        "num_epochs", "max_steps", "gradient_accumulation_steps", "seed", "logging_steps", "save_steps")}),
    ("ppo", "vllm_train.config:RLHFConfig", {"algorithm"} | {"lora_config." + n for n in (
        "num_epochs", "max_steps", "gradient_accumulation_steps", "seed", "logging_steps", "save_steps")}),
])
def test_every_config_field_has_a_documented_flag(command, config_path, skipped):
    """Each field of the command's config (nested lora_config included) is one flag, shown in --help with
    its default; the only renamed flag is --loss (loss_type); output_dir comes from --output-dir."""
    import dataclasses
    import importlib

    module, name = config_path.split(":")
    config_cls = getattr(importlib.import_module(module), name)
    paths = []
    for f in dataclasses.fields(config_cls):
        if f.name == "lora_config":
            paths += [f"lora_config.{g.name}" for g in dataclasses.fields(f.default_factory())]
        else:
            paths.append(f.name)
    wanted = {p for p in paths if p not in skipped and not p.endswith("output_dir")}
    flags, help_text = _parser_flags(command)
    for path in wanted:
        leaf = path.rsplit(".", 1)[-1]
        flag = "--loss" if leaf == "loss_type" else "--" + leaf.replace("_", "-")
        assert flag in flags, (command, path)
        assert flag in help_text, (command, flag)
    help_flat = " ".join(help_text.split())
    assert help_flat.count("(default:") >= len(wanted), help_flat
    assert "--output-dir" in flags and "--config" in flags


def test_flags_override_the_config_file_which_is_read_once(tmp_path, monkeypatch):
    """RL: the file's nested lora_config merges with the LoRA flags; flags win; the file is read once."""
    from vllm_train import files
    from vllm_train.cli import build_parser
    from vllm_train.commands import _common
    from vllm_train.commands._rl import rl_config_from_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("group_size: 4\nkl_coef: 0.1\nlora_config:\n  rank: 4\n  alpha: 8\n  learning_rate: 0.001\n")
    reads = []
    real = files.load_config_file
    monkeypatch.setattr(_common, "load_config_file", lambda path: reads.append(path) or real(path))
    args = build_parser().parse_args(["grpo", "--model", "m", "--prompts", "p.jsonl", "--reward", "m:f", "--config",
                                      str(cfg), "--output-dir", str(tmp_path / "out"), "--rank", "16",
                                      "--kl-coef", "0.5", "--temperature", "0.7"])
    config = rl_config_from_args(args, algorithm=None)
    assert len(reads) == 1
    assert (config.group_size, config.kl_coef, config.temperature) == (4, 0.5, 0.7)
    lora = config.lora_config
    assert (lora.rank, lora.alpha, lora.learning_rate, lora.output_dir) == (16, 8.0, 0.001, str(tmp_path / "out"))


@pytest.mark.parametrize("how", ["flag", "file"])
def test_rl_refuses_max_length_instead_of_ignoring_it(tiny_model, tmp_path, capsys, how):
    from vllm_train.assets import data_file

    argv = ["grpo", "--model", tiny_model, "--prompts", str(data_file("rl_train.jsonl")), "--reward",
            "vllm_train.toy:correctness_reward", "--output-dir", str(tmp_path / "out")]
    if how == "flag":
        argv += ["--max-length", "64"]
    else:
        (tmp_path / "rl.yaml").write_text("lora_config:\n  max_length: 64\n")
        argv += ["--config", str(tmp_path / "rl.yaml")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "--max-length" in err[0] and "not supported by RL" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_vllm_logs_only_with_verbose(tiny_model):
    """`vllm-train generate` prints its answer and no vLLM info/warning lines (nor Python or torch
    warnings); with --verbose vLLM's log is back. Own processes: vLLM reads its log level at import."""
    import os
    import re

    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "PYTHONWARNINGS")}
    argv = [sys.executable, "-m", "vllm_train.cli", "generate", "--model", tiny_model, "--prompt", "1 + 1 =",
            "--max-tokens", "2", "--json"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    loud = subprocess.run([*argv, "--verbose"], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    vllm_log = re.compile(r"\b(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d")  # vLLM's format: "INFO 11-29 19:23:52 [...]"
    quiet_lines = (quiet.stdout + quiet.stderr).splitlines()
    assert not [line for line in quiet_lines if vllm_log.search(line) or re.search(r"(?i)warning", line)], quiet_lines
    assert [line for line in (loud.stdout + loud.stderr).splitlines() if vllm_log.search(line) and "INFO" in line]
    answer = json.loads(quiet.stdout.strip().splitlines()[-1])
    assert answer == json.loads(loud.stdout.strip().splitlines()[-1]) and answer["prompt"] == "1 + 1 ="


# ---- conventions users bring from TRL / PEFT -------------------------------------------------------------
def _config_of(argv, config_cls=None, fixed_output=True):
    """The config `argv` resolves to, through the real parser and the one flag mechanism (config file too)."""
    from vllm_train.cli import build_parser
    from vllm_train.commands._common import CONFIG_FILE_VALUES, config_from_args, run_options_from_config
    from vllm_train.commands._rl import rl_config_from_args
    from vllm_train.config import DPOConfig, LoRATrainConfig

    parser = build_parser()
    argv, file_values = run_options_from_config(parser, argv)
    args = parser.parse_args(argv)
    if file_values is not None:
        setattr(args, CONFIG_FILE_VALUES, file_values)
    if argv[0] in ("grpo", "ppo"):
        return args, rl_config_from_args(args, "ppo" if argv[0] == "ppo" else None)
    cls = {"sft": LoRATrainConfig, "dpo": DPOConfig}[argv[0]]
    return args, config_from_args(args, cls, {"output_dir": args.output_dir})


SFT_BASE = ["sft", "--model", "m", "--data", "d.jsonl", "--output-dir", "out"]
RL_BASE = ["grpo", "--model", "m", "--prompts", "p.jsonl", "--reward", "m:f", "--output-dir", "out"]


def test_trl_flag_names_are_our_flags():
    _, ours = _config_of(SFT_BASE + ["--batch-size", "3", "--rank", "4", "--alpha", "9", "--num-epochs", "2",
                                     "--dropout", "0.1", "--lr-scheduler", "linear", "--max-length", "64",
                                     "--use-rslora", "true"])
    _, trl = _config_of(SFT_BASE + ["--per-device-train-batch-size", "3", "--lora-r", "4", "--lora-alpha", "9",
                                    "--num-train-epochs", "2", "--lora-dropout", "0.1", "--lr-scheduler-type",
                                    "linear", "--max-seq-length", "64", "--use-rslora"])
    assert trl == ours and (trl.batch_size, trl.rank, trl.alpha, trl.use_rslora) == (3, 4, 9.0, True)
    assert _config_of(SFT_BASE + ["--use-rslora", "false"])[1].use_rslora is False
    assert _config_of(SFT_BASE + ["--use-rslora", "--rank", "2"])[1].use_rslora is True


def test_trl_rl_names():
    args, c = _config_of(RL_BASE + ["--max-steps", "7", "--num-generations", "4", "--max-completion-length", "12",
                                    "--beta", "0.05", "--lora-r", "16", "--dynamic-sampling"])
    assert (args.num_steps, c.group_size, c.max_new_tokens, c.kl_coef) == (7, 4, 12, 0.05)
    assert c.lora_config.rank == 16 and c.dynamic_sampling is True
    assert _config_of(RL_BASE + ["--micro-batch-size", "8"])[1].lora_config.batch_size == 8  # the update's
    _, dpo = _config_of(["dpo", "--model", "m", "--data", "d.jsonl", "--output-dir", "out", "--beta", "0.3"])
    assert dpo.beta == 0.3  # DPO's own beta is not the RL alias


def test_config_keys_dashes_aliases_and_flat_rl(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("group_size: 4\nlora_config:\n  rank: 16\n  learning_rate: 0.001\n  use_rslora: true\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("num-generations: 4\nlora_r: 16\nlearning-rate: 0.001\nuse_rslora: true\n")
    _, a = _config_of(RL_BASE + ["--config", str(nested)])
    _, b = _config_of(RL_BASE + ["--config", str(flat)])
    assert a == b and (b.group_size, b.lora_config.rank, b.lora_config.learning_rate) == (4, 16, 0.001)
    assert b.lora_config.use_rslora is True
    sft_file = tmp_path / "sft.json"
    sft_file.write_text(json.dumps({"per-device-train-batch-size": 2, "gradient_accumulation_steps": 1,
                                    "target-modules": "all-linear"}))
    _, c = _config_of(SFT_BASE + ["--config", str(sft_file)])
    assert (c.batch_size, c.gradient_accumulation_steps, c.target_modules) == (2, 1, ["all-linear"])


def test_one_yaml_holds_a_whole_run_and_flags_win(tiny_model, tmp_path, shipped, capsys):
    """`vllm-train sft --config run.yaml` with the model, data, output dir and TRL's names in the file;
    a flag still overrides the file; all-linear adapts the linears PEFT's "all-linear" picks."""
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tiny_model}\ndata: {shipped('sft_train.jsonl')}\noutput_dir: {tmp_path / 'out'}\n"
                   f"no_progress: true\nmax_steps: 1\nper_device_train_batch_size: 2\n"
                   f"gradient-accumulation-steps: 1\nlora_r: 4\nlora_alpha: 8\ntarget_modules: all-linear\n")
    code, err = run_cli(["sft", "--config", str(run), "--lora-alpha", "12"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    resolved = json.loads((tmp_path / "out" / "resolved_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], resolved["batch_size"], resolved["max_steps"]) == (4, 12.0, 2, 1)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                LoraConfig(r=4, target_modules="all-linear"))
    assert sorted(saved["target_modules"]) == sorted(peft_model.peft_config["default"].target_modules)
    assert "lm_head" not in saved["target_modules"] and resolved["target_modules"] == saved["target_modules"]


@pytest.fixture
def untemplated_model(tiny_model, tmp_path):
    """The tiny model without its chat template (as many base models ship)."""
    from pathlib import Path

    out = tmp_path / "no-template"
    out.mkdir()
    for f in Path(tiny_model).iterdir():
        if f.name != "chat_template.jinja":
            (out / f.name).symlink_to(f)
    return str(out)


def test_chat_data_without_a_chat_template_is_one_line_then_chat_template_file(
        untemplated_model, tiny_model, tmp_path, shipped, capsys):
    from pathlib import Path

    from vllm_train.data.causal_lm import CausalLMDataset
    from vllm_train.data.tokenize import use_chat_template
    from vllm_train.models import load_tokenizer

    argv = ["sft", "--model", untemplated_model, "--data", str(shipped("sft_train.jsonl")), "--output-dir",
            str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--gradient-accumulation-steps", "1",
            "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "no chat template" in err[0] and "--chat-template FILE" in err[0], err
    assert not (tmp_path / "out").exists()
    template = Path(tiny_model) / "chat_template.jinja"
    code, err = run_cli(argv + ["--chat-template", str(template)], capsys)
    assert code == 0 and (tmp_path / "out" / "adapter_model.safetensors").is_file(), err
    # the file renders exactly as the model's own template would have
    records = [json.loads(line) for line in shipped("sft_train.jsonl").read_text().splitlines()[:8]]
    own = CausalLMDataset(records, load_tokenizer(tiny_model))
    use_chat_template(template.read_text())
    try:
        given = CausalLMDataset(records, load_tokenizer(untemplated_model))
    finally:
        use_chat_template(None)
    assert [e["input_ids"].tolist() for e in given.examples] == [e["input_ids"].tolist() for e in own.examples]
    assert [e["labels"].tolist() for e in given.examples] == [e["labels"].tolist() for e in own.examples]
    code, err = run_cli(argv[:-1] + ["--overwrite", "--chat-template", str(tmp_path / "none.jinja")], capsys)
    assert code == 2 and err == [f"error: --chat-template: file not found: {tmp_path / 'none.jinja'}"]
