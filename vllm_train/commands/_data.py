"""Where a training command's records come from: a data file (--data / --prompts), or a split of a dataset on
the Hugging Face hub (--dataset-name ORG/NAME [--dataset-config C] [--split S] [--eval-split S]), read with the
optional `datasets` library (`data.io.HubDataset`). These are options of the command like --data, so a
--config file may give them too (``dataset_name: ...``, ``split: ...``; TRL's ``dataset_train_split`` and
``dataset_test_split`` are second spellings of --split and --eval-split)."""

from __future__ import annotations

import argparse
from typing import Any

from vllm_train.errors import VllmTrainError

HUB_HELP = ("a dataset on the Hugging Face hub instead of FILE, read with the `datasets` library (pip install "
            "'vllm-train[hub]'): downloaded once into its cache; HF_HOME, HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 "
            "are honoured")


def add_data_args(p: argparse.ArgumentParser, data_help: str, eval_help: str, data_flag: str = "--data",
                  eval_flag: str = "--eval-data") -> None:
    """`data_flag` FILE or --dataset-name (one of them), `eval_flag` FILE, and the hub dataset's config and splits."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(data_flag, metavar="FILE", help=f"{data_help} (.jsonl/.json/.parquet)")
    source.add_argument("--dataset-name", metavar="ORG/NAME", help=HUB_HELP)
    p.add_argument(eval_flag, metavar="FILE", help=eval_help)
    p.add_argument("--dataset-config", metavar="NAME", help="config (subset) of --dataset-name")
    p.add_argument("--split", "--dataset-train-split", metavar="SPLIT",
                   help="split of --dataset-name to train on (default: train)")
    p.add_argument("--eval-split", "--dataset-test-split", metavar="SPLIT",
                   help=f"split of --dataset-name to hold out, as {eval_flag} does")


def data_sources(args: argparse.Namespace, data: str = "data", eval_data: str = "eval_data") -> tuple[Any, Any]:
    """(training source, held-out source or None): paths as given, or `HubDataset`s of --dataset-name."""
    from vllm_train.data.io import HubDataset

    name, eval_file = args.dataset_name, getattr(args, eval_data)
    if name is None:
        for flag, value in (("--dataset-config", args.dataset_config), ("--split", args.split),
                            ("--eval-split", args.eval_split)):
            if value is not None:
                raise VllmTrainError(f"{flag} needs --dataset-name (it picks from a hub dataset)")
        return getattr(args, data), eval_file
    if args.eval_split and eval_file:
        raise VllmTrainError(f"--eval-split and --{eval_data.replace('_', '-')}: give one held-out set")
    train = HubDataset(name, args.split or "train", args.dataset_config)
    held_out = HubDataset(name, args.eval_split, args.dataset_config) if args.eval_split else eval_file
    return train, held_out
