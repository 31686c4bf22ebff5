"""`vllm-train`: fine-tune LoRA adapters and serve them with vLLM.

Each subcommand lives in `vllm_train/commands/<name>.py` and registers itself here. Errors in user
input print one line (`error: ...`) on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_train.errors import VllmTrainError

COMMANDS = ["demo", "sft", "dpo", "rm", "grpo", "ppo", "generate", "eval", "serve", "push"]

EPILOG = """\
quick start (offline, on the shipped tiny model):
  vllm-train demo                         SFT on the toy task, accuracy before -> after, vLLM parity check
  vllm-train sft --model vllm_train/assets/tiny-llama \\
      --data vllm_train/assets/data/sft_train.jsonl --output-dir runs/sft
  vllm-train eval --model vllm_train/assets/tiny-llama --adapter runs/sft \\
      --data vllm_train/assets/data/sft_eval.jsonl
  vllm-train generate --model vllm_train/assets/tiny-llama --adapter runs/sft --chat "What is 47 + 38?"

Run `vllm-train <command> --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="vllm-train", description="Fine-tune LoRA adapters (SFT, DPO, reward models, PPO/GRPO) and "
        "serve them with vLLM the moment they are trained.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vllm_train.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vllm_train.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet third-party chatter for command-line use; library users keep their own settings.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except VllmTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
