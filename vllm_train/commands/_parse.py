"""The command line as one set of values: --config's run options put before the flags, and one value per
setting.

A setting may have two spellings (``--rank`` and TRL's ``--lora-r``, RL's ``--num-steps`` and
``--max-steps``, ``--split`` and ``--dataset-train-split``). Given twice with different values -- on the
command line, or as two keys of one --config file -- it is refused in one line naming both: which one
would win is an accident of argparse. A flag overriding the file's value is no conflict: flags win.
"""

from __future__ import annotations

import argparse
import itertools

from vllm_train.commands._common import CONFIG_FILE_VALUES, DEST_PREFIX, same_value
from vllm_train.errors import VllmTrainError
from vllm_train.files import load_config_file, parse_bool

SPELLINGS = "_spellings"  # args attribute while parsing: {dest: [(option string, value), ...]}, in order


class SpellingStore(argparse._StoreAction):
    """argparse's store action that also notes which spelling gave each value (several spellings only)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        if len(self.option_strings) > 1:
            if getattr(namespace, SPELLINGS, None) is None:
                setattr(namespace, SPELLINGS, {})
            getattr(namespace, SPELLINGS).setdefault(self.dest, []).append((option_string, values))


class CommandParser(argparse.ArgumentParser):
    """A command's parser: every plain option stores through `SpellingStore`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, SpellingStore)
        self.register("action", "store", SpellingStore)


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args` of `argv` with --config's run options in front (`run_options_from_config`); two
    spellings of one setting with different values are refused (`VllmTrainError`)."""
    argv, file_values, from_file = run_options_from_config(parser, argv)
    args = parser.parse_args(argv)
    given = vars(args).pop(SPELLINGS, None) or {}
    for dest, uses in given.items():
        for (flag_a, a), (flag_b, b) in itertools.combinations(uses[from_file.get(dest, 0):], 2):
            if flag_a != flag_b and not same_value(a, b):
                raise VllmTrainError(f"{flag_a} {_shown(a)} and {flag_b} {_shown(b)} set the same option; give one")
    if file_values is not None:
        setattr(args, CONFIG_FILE_VALUES, file_values)  # the file is read once
    return args


def run_options_from_config(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], dict | None, dict]:
    """One --config file may hold a whole run. Its keys that name an option of the command (``model``,
    ``data``, ``eval_data``, ``prompts``, ``output_dir``, ``adapter``, ``reward``, ``num_steps`` /
    ``max_steps`` of RL, ...; dashes or underscores) become that option, put before the command line's own
    options so that a flag still wins. Returns (argv, the file's remaining keys: its config fields, how many
    options of each dest came from the file), or (argv, None, {}) when there is no --config (or --help is
    asked). Two keys for one option with different values, and a yes/no option that is neither, are refused."""
    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if not argv or subparsers is None or argv[0] not in subparsers.choices or {"-h", "--help"} & set(argv):
        return argv, None, {}
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return argv, None, {}
    values = load_config_file(path)
    options = {o[2:].replace("-", "_"): a for a in subparsers.choices[argv[0]]._actions for o in a.option_strings
               if o.startswith("--") and not a.dest.startswith(DEST_PREFIX) and a.dest not in ("help", "config")}
    front: list[str] = []
    seen: dict[str, tuple[str, object]] = {}  # dest -> (the key that gave it, its value)
    counts: dict[str, int] = {}  # dest -> options given to it in front
    for key in [k for k in values if str(k).replace("-", "_") in options]:
        action, value = options[str(key).replace("-", "_")], values.pop(key)
        if action.dest in seen and not same_value(seen[action.dest][1], value):
            raise VllmTrainError(f"{path}: '{seen[action.dest][0]}: {seen[action.dest][1]}' and '{key}: {value}' "
                                 f"set the same option ({action.option_strings[0]}); keep one")
        seen.setdefault(action.dest, (key, value))
        words = _as_flags(action, value, f"{path}: '{key}'")
        front += words
        counts[action.dest] = counts.get(action.dest, 0) + bool(words)
    return [argv[0], *front, *argv[1:]], values, counts


def _as_flags(action: argparse.Action, value, what: str) -> list[str]:
    """The command-line words that give `action` the file's `value`."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true: --overwrite, --no-progress, ...
        return [flag] if parse_bool(value, what) else []
    if isinstance(value, list):
        return [flag, *map(str, value)] if action.nargs in ("+", "*") else [flag, ",".join(map(str, value))]
    return [] if value is None else [flag, str(value)]


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
