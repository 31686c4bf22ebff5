"""Where a command's records come from: a data file (--data / --prompts), or a split of a dataset on the
Hugging Face hub (--dataset-name ORG/NAME [--dataset-config C] [--split S]; training commands also
[--eval-split S]), read with the optional `datasets` library (`data.io.HubDataset`). These are options of the
command like --data, so a --config file may give them too (``dataset_name: ...``, ``split: ...``; TRL's
``dataset_train_split`` and ``dataset_test_split`` are second spellings of --split and --eval-split).

Exactly one of the file and --dataset-name is checked here, not by an argparse group: argparse would print
its whole usage block, and bad input is one ``error:`` line (exit status 2)."""

from __future__ import annotations

import argparse
from typing import Any

from vllm_train.errors import VllmTrainError

HUB_HELP = ("a dataset on the Hugging Face hub instead of FILE, read with the `datasets` library (pip install "
            "'vllm-train[hub]'): downloaded once into its cache; HF_HOME, HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 "
            "are honoured")


def add_source_args(p: argparse.ArgumentParser, data_help: str, data_flag: str = "--data",
                    split_use: str = "to train on") -> None:
    """`data_flag` FILE or --dataset-name (exactly one, checked by `data_source`), its config and split."""
    p.add_argument(data_flag, metavar="FILE", help=f"{data_help} (.jsonl/.json/.parquet; this or --dataset-name)")
    p.add_argument("--dataset-name", metavar="ORG/NAME", help=HUB_HELP)
    p.add_argument("--dataset-config", metavar="NAME", help="config (subset) of --dataset-name")
    p.add_argument("--split", "--dataset-train-split", metavar="SPLIT",
                   help=f"split of --dataset-name {split_use} (default: train)")


def add_data_args(p: argparse.ArgumentParser, data_help: str, eval_help: str, data_flag: str = "--data",
                  eval_flag: str = "--eval-data") -> None:
    """`add_source_args`, plus `eval_flag` FILE and the hub dataset's held-out split."""
    add_source_args(p, data_help, data_flag)
    p.add_argument(eval_flag, metavar="FILE", help=eval_help)
    p.add_argument("--eval-split", "--dataset-test-split", metavar="SPLIT",
                   help=f"split of --dataset-name to hold out, as {eval_flag} does")


def data_source(args: argparse.Namespace, data: str = "data") -> Any:
    """The path given as --`data`, or a `HubDataset` of --dataset-name: exactly one of them."""
    from vllm_train.data.io import HubDataset

    flag, path, name = "--" + data.replace("_", "-"), getattr(args, data), args.dataset_name
    if path is not None and name is not None:
        raise VllmTrainError(f"{flag} and --dataset-name: give one of them (a data file or a hub dataset)")
    if path is None and name is None:
        raise VllmTrainError(f"no data: give {flag} FILE or --dataset-name ORG/NAME")
    if name is None:
        for option, value in (("--dataset-config", args.dataset_config), ("--split", args.split),
                              ("--eval-split", getattr(args, "eval_split", None))):
            if value is not None:
                raise VllmTrainError(f"{option} needs --dataset-name (it picks from a hub dataset)")
        return path
    return HubDataset(name, args.split or "train", args.dataset_config)


def data_sources(args: argparse.Namespace, data: str = "data", eval_data: str = "eval_data") -> tuple[Any, Any]:
    """(training source, held-out source or None): paths as given, or `HubDataset`s of --dataset-name."""
    from vllm_train.data.io import HubDataset

    train, eval_file = data_source(args, data), getattr(args, eval_data)
    if args.dataset_name is None:
        return train, eval_file
    if args.eval_split and eval_file:
        raise VllmTrainError(f"--eval-split and --{eval_data.replace('_', '-')}: give one held-out set")
    held_out = HubDataset(args.dataset_name, args.eval_split, args.dataset_config) if args.eval_split else eval_file
    return train, held_out
