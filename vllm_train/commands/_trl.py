"""TRL's command line and config keys on ours, beyond the second spellings of `_common.TRL_ALIASES`.

* Every option is also spelt with underscores (``--learning_rate``: TRL's docs write them so, and TRL's
  HfArgumentParser takes both). The underscore spelling is one more name of the same argparse action, so
  it sets the same destination as the dashed one; it is left out of --help.
* ``--model-name-or-path`` (a ``model_name_or_path:`` key) is ``--model``.
* TRL's keys without a field of ours become ours where they mean the same thing, and are refused in one
  line where vllm-train has no equivalent (`TRL_OPTIONS`, `apply_trl_options`): ``bf16``/``fp16`` ->
  precision, ``eval_strategy``/``save_strategy`` -> eval/save steps, ``resume_from_checkpoint`` ->
  resume_from, ``use_peft`` (always true here), ``packing`` (not implemented), ``dataset_text_field``
  (``text``, the field a text record is read from).
"""

from __future__ import annotations

import argparse
import sys

from vllm_train.commands._common import CONFIG_FILE_VALUES, DEST_PREFIX
from vllm_train.errors import VllmTrainError

TRL_OPTIONS = {  # TRL's key -> what it does here; BOOL ones are true/false
    "bf16": ("BOOL", "true: --precision bf16; false: fp32 (as in TRL, where false means no bf16 mixed precision)"),
    "fp16": ("BOOL", "false only: fp16 training is not supported (bf16 or fp32)"),
    "use_peft": ("BOOL", "true only: vllm-train always trains a LoRA adapter"),
    "packing": ("BOOL", "false only: each example is its own row; packing is not implemented"),
    "eval_strategy": ("V", "steps (every --eval-steps; default --logging-steps, as in TRL) | epoch | no "
                           "(no evaluation, even with held-out data)"),
    "save_strategy": ("V", "steps (every --save-steps; default 500, as in TRL) | epoch | no (a warning: the run "
                           "still writes a checkpoint at the end of each epoch)"),
    "dataset_text_field": ("V", "text only: the field a text record is read from"),
    "resume_from_checkpoint": ("V", "a checkpoint directory, or true (= --resume-from latest)"),
}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def add_trl_spellings(parser: argparse.ArgumentParser) -> None:
    """On every command: ``--model-name-or-path`` for ``--model``, TRL's options on the training commands
    (those with --config), and the underscore spelling of every option."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in subparsers.choices.items():
        model = command._option_string_actions.get("--model")
        if model is not None:
            model.option_strings.append("--model-name-or-path")
            command._option_string_actions["--model-name-or-path"] = model
        if "--config" in command._option_string_actions and name != "service":  # a server, not a TRL recipe
            group = command.add_argument_group("TRL's options (accepted so that TRL recipes run; see each)")
            for name, (metavar, text) in TRL_OPTIONS.items():
                bare = {"nargs": "?", "const": "true"} if metavar == "BOOL" else {}
                group.add_argument("--" + name.replace("_", "-"), dest="trl_" + name, metavar=metavar, help=text,
                                   **bare)
        for option, action in list(command._option_string_actions.items()):
            if option.startswith("--") and "-" in option[2:]:
                command._option_string_actions.setdefault("--" + option[2:].replace("-", "_"), action)


def apply_trl_options(args: argparse.Namespace) -> None:
    """TRL's options the user gave (flags, or keys of the --config file), as our settings."""
    given = {name: value for name in TRL_OPTIONS if (value := getattr(args, "trl_" + name, None)) is not None}
    if "fp16" in given and _bool(given["fp16"], "fp16"):
        raise VllmTrainError("fp16: fp16 training is not supported; use bf16: true (or --precision bf16) or fp32")
    if "use_peft" in given and not _bool(given["use_peft"], "use_peft"):
        raise VllmTrainError("use_peft: false is not supported: vllm-train trains LoRA adapters only")
    if "packing" in given and _bool(given["packing"], "packing"):
        raise VllmTrainError("packing: true is not supported (each example is its own row, padded); drop it")
    if given.get("dataset_text_field", "text") != "text":
        raise VllmTrainError(f"dataset_text_field: {given['dataset_text_field']!r} is not supported: a text record is "
                             f"read from its 'text' field (rename the field in the data)")
    if "bf16" in given:
        _set(args, "precision", "bf16" if _bool(given["bf16"], "bf16") else "fp32", "bf16")
    if "resume_from_checkpoint" in given:
        value = given["resume_from_checkpoint"]
        if value.lower() not in FALSE:
            _set(args, "resume_from", "latest" if value.lower() in TRUE else value, "resume_from_checkpoint")
    for kind, default in (("eval", None), ("save", 500)):
        if f"{kind}_strategy" in given:
            _apply_strategy(args, kind, given[f"{kind}_strategy"], default)


def _apply_strategy(args: argparse.Namespace, kind: str, strategy: str, default: int | None) -> None:
    """TRL's eval_strategy / save_strategy: steps, epoch or no."""
    key, steps = f"{kind}_strategy", f"{kind}_steps"
    strategy = "no" if strategy.lower() in FALSE else strategy  # YAML reads a bare `no` as false
    if strategy == "epoch":
        _set(args, steps, 0, key)  # our 0: at the end of each epoch
    elif strategy == "steps":
        if not _given(args, steps):  # TRL's default: eval every logging_steps, save every 500 steps
            _set(args, steps, default or _given(args, "logging_steps") or 10, key)
    elif strategy == "no" and kind == "eval":
        for held_out in ("eval_data", "eval_prompts", "eval_split"):
            if hasattr(args, held_out):
                setattr(args, held_out, None)
    elif strategy == "no":
        print("warning: save_strategy no: vllm-train still writes a checkpoint at the end of each epoch "
              "(--save-total-limit keeps the newest)", file=sys.stderr)
    else:
        raise VllmTrainError(f"{key}: {strategy!r} is invalid (one of steps, epoch, no)")


def _bool(value: str, name: str) -> bool:
    if value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    raise VllmTrainError(f"{name}: {value!r} is invalid (true or false)")


def _dest(args: argparse.Namespace, field: str) -> str | None:
    """The config flag's destination of `field` (``config.precision``, ``config.lora_config.precision``)."""
    return next((d for d in vars(args) if d.startswith(DEST_PREFIX) and d.rpartition(".")[2] == field), None)


def _given(args: argparse.Namespace, field: str):
    """`field`'s value as the user gave it, by flag or in the --config file (None: not given)."""
    dest = _dest(args, field)
    if dest is not None and getattr(args, dest) is not None:
        return getattr(args, dest)
    file = {str(k).replace("-", "_"): v for k, v in (getattr(args, CONFIG_FILE_VALUES, None) or {}).items()}
    nested = file.get("lora_config") if isinstance(file.get("lora_config"), dict) else {}
    return file.get(field, nested.get(field))


def _set(args: argparse.Namespace, field: str, value, source: str) -> None:
    """Set `field` as its flag would, from TRL's `source` key; refused when the user gave it another value."""
    dest = _dest(args, field)
    if dest is None:
        raise VllmTrainError(f"{source}: this command has no {field} setting")
    given = _given(args, field)
    if given is not None and str(given) != str(value):
        raise VllmTrainError(f"{source} and {field} ({given}) disagree: give one of them")
    setattr(args, dest, str(value))
