"""A TRL user's recipes run as written: TRL's YAML keys, ``--a_b`` spellings of every flag, TRL's
options without a field of ours (bf16, eval/save strategies, resume_from_checkpoint, use_peft, packing,
dataset_text_field, optim), and every learning-rate schedule `transformers.get_scheduler` builds. What has
no equivalent here is refused in one line, exit 2, before anything loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_train.assets import TINY_MODEL, data_file
from vllm_train.cli import build_parser, main
from vllm_train.commands._common import config_from_args
from vllm_train.commands._parse import parse_command_line
from vllm_train.commands._trl import apply_trl_options
from vllm_train.config import LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.schedules import make_schedule, own_multiplier, schedule_names

SFT_BASE = ["sft", "--model", "m", "--data", "d.jsonl", "--output-dir", "out"]


def _args(argv: list[str]):
    """The parsed command line as `cli.main` has it before the command runs (TRL's options applied)."""
    args = parse_command_line(build_parser(), argv)
    apply_trl_options(args)
    return args


def _config(argv: list[str]) -> LoRATrainConfig:
    args = _args(argv)
    return config_from_args(args, fixed={"output_dir": args.output_dir})


def test_a_trl_sft_yaml_runs_unchanged(tmp_path, capsys):
    """The shape of TRL's SFT recipes (`trl sft --config sft.yaml`), keys as TRL names them."""
    out = tmp_path / "sft-trl"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""\
# Model arguments
model_name_or_path: {TINY_MODEL}
# Data
dataset_text_field: text
# Training
learning_rate: 2.0e-3
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
num_train_epochs: 1
max_steps: 3
bf16: false
lr_scheduler_type: constant_with_warmup
warmup_steps: 2
logging_steps: 1
eval_strategy: "no"
save_strategy: epoch
optim: adamw_torch
output_dir: {out}
report_to: none
# LoRA
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - q_proj
  - v_proj
""")
    code = main(["sft", "--config", str(recipe), "--data", str(data_file("text_train.jsonl")), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert (resolved["rank"], resolved["alpha"], resolved["batch_size"], resolved["precision"]) == (8, 16, 4, "fp32")
    assert (resolved["lr_scheduler"], resolved["warmup_steps"]) == ("constant_with_warmup", 2)
    assert resolved["optim"] == "adamw_torch"
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3])  # two warmup steps, then constant


def test_every_flag_has_its_underscore_spelling_hidden_from_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and "-" in option[2:]:
                    under = "--" + option[2:].replace("-", "_")
                    assert command._option_string_actions[under] is action, (name, option)
        assert "--learning_rate" not in command.format_help()
    by_underscores = _config(["sft", "--model_name_or_path", "m", "--data", "d.jsonl", "--output_dir", "out",
                              "--learning_rate", "0.001", "--per_device_train_batch_size", "3", "--lora_r", "4",
                              "--gradient_accumulation_steps=2", "--lr_scheduler_type", "polynomial"])
    by_dashes = _config(["sft", "--model", "m", "--data", "d.jsonl", "--output-dir", "out", "--learning-rate",
                         "0.001", "--batch-size", "3", "--rank", "4", "--gradient-accumulation-steps", "2",
                         "--lr-scheduler", "polynomial"])
    assert by_underscores == by_dashes and by_underscores.batch_size == 3


@pytest.mark.parametrize("extra, field, value", [
    (["--bf16"], "precision", "bf16"),
    (["--bf16", "false"], "precision", "fp32"),
    (["--fp16", "false", "--bf16", "true"], "precision", "bf16"),
    (["--resume_from_checkpoint", "true"], "resume_from", "latest"),
    (["--resume-from-checkpoint", "runs/x/checkpoints/step-4"], "resume_from", "runs/x/checkpoints/step-4"),
    (["--eval_strategy", "epoch"], "eval_steps", 0),
    (["--eval_strategy", "steps", "--logging_steps", "7"], "eval_steps", 7),
    (["--eval_strategy", "steps", "--eval_steps", "3"], "eval_steps", 3),
    (["--save_strategy", "steps"], "save_steps", 500),
    (["--save_strategy", "epoch"], "save_steps", 0),
    (["--use_peft", "--packing", "false", "--dataset_text_field", "text"], "rank", 8),
    (["--optim", "adamw_torch_fused"], "optim", "adamw_torch_fused"),
])
def test_trl_options_become_ours(extra, field, value):
    assert getattr(_config(SFT_BASE + extra), field) == value


def test_eval_strategy_no_drops_the_held_out_data(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_strategy: no\nbf16: true\n")  # YAML reads a bare no as false
    args = _args(SFT_BASE + ["--eval-data", "e.jsonl", "--config", str(recipe)])
    assert args.eval_data is None and config_from_args(args, fixed={"output_dir": "out"}).precision == "bf16"


@pytest.mark.parametrize("extra, line", [
    (["--fp16"], "fp16: fp16 training is not supported"),
    (["--use_peft", "false"], "use_peft: false is not supported"),
    (["--packing"], "packing: true is not supported"),
    (["--dataset_text_field", "content"], "dataset_text_field: 'content' is not supported"),
    (["--bf16", "--precision", "fp32"], "bf16 and precision (fp32) disagree"),
    (["--bf16", "maybe"], "bf16: 'maybe' is invalid (true or false)"),
    (["--eval_strategy", "sometimes"], "eval_strategy: 'sometimes' is invalid"),
    (["--optim", "adamw_8bit"], "config field 'optim': 'adamw_8bit' is not supported"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "reduce_lr_on_plateau is not supported"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "does not suit cosine_with_min_lr: One of min_lr or min_lr_rate"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "num_decay_steps"),
    (["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", "{bad"], "a JSON object"),
    (["--lr_scheduler_type", "bogus"], "'bogus' is invalid (one of cosine, linear, constant, cosine_with_restarts"),
    (["--warmup_steps", "2.5"], "config field 'warmup_steps': 2.5 is invalid"),
])
def test_what_has_no_equivalent_is_one_line(tmp_path, capsys, extra, line):
    out = tmp_path / "out"
    argv = ["sft", "--model", str(TINY_MODEL), "--data", str(data_file("sft_train.jsonl")), "--output-dir", str(out)]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and line in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", schedule_names())
def test_every_schedule_builds_and_resumes_from_its_step(name):
    """Each schedule is a LambdaLR (a checkpoint restores it from the step: `common.load_checkpoint`)."""
    kwargs = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
              "warmup_stable_decay": {"num_decay_steps": 4}}.get(name, {})
    LoRATrainConfig(lr_scheduler=name, lr_scheduler_kwargs=kwargs or None)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = make_schedule(optimizer, name, 2, 10, kwargs)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert all(math.isfinite(r) and 0 <= r <= 1.0 for r in rates) and max(rates) > 0
    assert [fn(7) for fn in schedule.lr_lambdas] == [rates[7]]


def test_our_schedules_are_unchanged():
    # linear warmup over 2 of 10 steps, then cosine / linear decay to 0, or constant
    assert [own_multiplier("constant", s, 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert own_multiplier("linear", 6, 2, 10) == 0.5 and own_multiplier("cosine", 6, 2, 10) == pytest.approx(0.5)
    with pytest.raises(VllmTrainError, match="warmup_steps"):
        LoRATrainConfig(warmup_steps=-1)


@pytest.mark.parametrize("command", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_output_dir_defaults_to_trainer_output_as_trls(command):
    argv = [command, "--model", "m", "--data" if command in ("sft", "dpo", "rm") else "--prompts", "d.jsonl"]
    assert _args(argv).output_dir == "trainer_output"
