"""`vllm-train`: fine-tune LoRA adapters and serve them with vLLM.

Each subcommand lives in `vllm_train/commands/<name>.py` and registers itself here. Errors in user
input print one line (`error: ...`) on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from vllm_train.errors import VllmTrainError

COMMANDS = ["demo", "sft", "dpo", "rm", "grpo", "ppo", "generate", "eval", "serve", "push", "merge", "service"]
# Commands that run data-parallel under `torchrun --nproc-per-node N -m vllm_train <command>`.
DISTRIBUTED_COMMANDS = ("sft", "dpo", "rm", "grpo", "ppo")

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

    from vllm_train.commands._parse import CommandParser

    parser = argparse.ArgumentParser(
        prog="vllm-train", description="Fine-tune LoRA adapters (SFT, DPO, reward models, PPO/GRPO) and "
        "serve them with vLLM the moment they are trained.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=CommandParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"vllm_train.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"vllm_train.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    for command in sub.choices.values():
        try:
            command.add_argument("--verbose", action="store_true",
                                 help="show vLLM's info and warning logs (default: errors only)")
        except argparse.ArgumentError:  # the command has its own --verbose (push: timings); it means this too
            pass
    from vllm_train.commands._trl import add_trl_spellings

    add_trl_spellings(parser)  # --a_b for every --a-b, --model-name-or-path, TRL's options on training commands
    return parser


# Commands whose vLLM processes log to files, not to the terminal: their logs keep vLLM's own level.
LOGS_TO_FILES = ("serve",)


def quiet_libraries(command: str | None, verbose: bool) -> None:
    """Command-line use: the libraries' info, warnings and loading bars folded as for any library user
    (`vllm_train.quiet`), and every FutureWarning and DeprecationWarning off, in vLLM's engine processes
    too, unless --verbose (or VLLM_TRAIN_VERBOSE=1); our progress bars and summaries stay. Runs before torch
    or vLLM is imported (parsing the command line imports neither): both read these settings once. A level
    the user exported wins."""
    from vllm_train import quiet

    verbose = verbose or quiet.verbose_requested()
    quiet.quiet_libraries(verbose, logs_to_files=command in LOGS_TO_FILES)
    if not verbose and command not in LOGS_TO_FILES:
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def one_line_warning(message, *args, **kwargs) -> str:
    """Command-line use: a warning prints as one `warning: ...` line (not file:line + source line)."""
    return f"warning: {message}\n"


def silence_rank() -> None:
    """Under torchrun, ranks other than 0 print nothing but their errors: rank 0 reports for the run."""
    sys.stdout = open(os.devnull, "w")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from vllm_train.commands._parse import parse_command_line
    from vllm_train.data.tokenize import use_chat_template

    parser = build_parser()
    try:  # a --config file may name the run's model, data, output dir, ... (flags still win)
        args = parse_command_line(parser, list(sys.argv[1:] if argv is None else argv))
    except VllmTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    quiet_libraries(args.command, getattr(args, "verbose", False))  # library users keep their own settings
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from vllm_train import distributed
    from vllm_train.commands._output import NewOutputDir
    from vllm_train.commands._trl import apply_trl_options
    from vllm_train.files import check_can_write

    library_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    new_output = NewOutputDir.of(args)  # removed again if the command fails before its first checkpoint

    rank = os.environ.get("RANK", "0")
    where = f"[rank {rank}] " if distributed.requested() else ""  # which rank failed, under torchrun
    if distributed.requested() and rank != "0":
        silence_rank()
    try:
        apply_trl_options(args)  # TRL's bf16, eval_strategy, resume_from_checkpoint, ... as our settings
        if getattr(args, "output_dir", None):  # under a file, in /proc, no permission: refused before any work
            check_can_write(Path(args.output_dir), "--output-dir")
        if distributed.requested() and args.command not in DISTRIBUTED_COMMANDS:
            raise VllmTrainError(f"{args.command} runs in one process; under torchrun only "
                                 f"{', '.join(DISTRIBUTED_COMMANDS)} do (WORLD_SIZE={os.environ['WORLD_SIZE']})")
        distributed.init()  # a no-op in a single process
        return int(args.run(args) or 0)
    except VllmTrainError as exc:
        if new_output is not None:
            new_output.remove_failed()
        print(f"{where}error: {exc}", file=sys.stderr)
        distributed.record_error(f"{where}error: {exc}")  # torchrun's failure report then names the cause
        return 2
    except Exception:
        if new_output is not None:
            new_output.remove_failed()
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = library_format
        distributed.close()
        use_chat_template(None)  # --chat-template holds for this command only (main may be called again)


if __name__ == "__main__":
    sys.exit(main())
