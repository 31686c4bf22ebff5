"""A training command's --output-dir: checked before anything is read, cleared (--overwrite) only after
everything the command was given has been read and checked, right before the run's first write.

`check_output_dir` looks and touches nothing; it returns an `OutputDir` whose `prepare()` carries out an
--overwrite (`run_manifest.plan_overwrite`: the earlier run's own files, never an input of this command,
never in a directory that is not a run). A command calls `prepare()` after its data, model, adapter and
reward have loaded, so that a bad input stops it with the earlier run intact.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from vllm_train import distributed, run_manifest
from vllm_train.errors import VllmTrainError

# The options whose paths a command reads: none may lie in the --output-dir that --overwrite clears.
INPUT_OPTIONS = ("adapter", "data", "eval_data", "prompts", "eval_prompts", "reward_model")


def command_inputs(args: argparse.Namespace, model_dir: str | None = None) -> dict[str, str]:
    """The command's input paths by flag: `INPUT_OPTIONS` it has, and the local model directory."""
    found = {"--" + name.replace("_", "-"): getattr(args, name) for name in INPUT_OPTIONS if getattr(args, name, None)}
    if model_dir:
        found["--model"] = model_dir
    return found


@dataclasses.dataclass
class OutputDir:
    """A checked --output-dir; `prepare()` clears the earlier run there when --overwrite asked for it."""

    path: Path
    plan: run_manifest.OverwritePlan | None = None

    def prepare(self) -> None:
        """Carry out the --overwrite (rank 0), then let every rank go on (under torchrun)."""
        if self.plan is not None:
            self.plan.carry_out()
            self.plan = None
        distributed.barrier()  # every rank has looked (rank 0 has cleared) before rank 0 writes


def check_output_dir(path: str | Path, resume_from: str | None, overwrite: bool, kind: str = "adapter",
                     inputs: dict[str, str] | None = None) -> OutputDir:
    """Refuse to mix a new run into a non-empty directory unless resuming or told to overwrite; nothing is
    touched here.

    ``--resume-from latest`` continues the run in `path` (a fresh start when `path` is empty); a non-empty
    `path` without a checkpoint is refused, so resuming never rewrites another run's or a user's files.
    ``--overwrite`` (not resuming) is planned here and refused when it may not be done (`plan_overwrite`:
    `inputs` are the command's input paths by flag, `kind` the run's kind in `run_files.RUN_WRITES`)."""
    from vllm_train.trainers import common, run_files

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VllmTrainError(f"--output-dir {path} exists and is not a directory")
    not_empty = path.is_dir() and any(path.iterdir())
    if not_empty and not resume_from and not overwrite:
        hint = "pass --overwrite, or --resume-from latest to continue that run" if run_manifest.is_run(path) \
            else "it holds no vllm-train run: choose another --output-dir"
        raise VllmTrainError(f"--output-dir {path} is not empty ({hint})")
    resumes = resume_from and (resume_from != "latest" or common.list_checkpoints(path))
    if not_empty and resume_from == "latest" and not resumes and not overwrite:
        raise VllmTrainError(f"--resume-from latest: --output-dir {path} is not empty but holds no checkpoint "
                             f"to resume (pass --overwrite to start a new run there)")
    plan = None
    if not_empty and overwrite and not resumes:
        plan = run_manifest.plan_overwrite(path, inputs or {}, run_files.RUN_WRITES[kind])
    return OutputDir(path, plan)


@dataclasses.dataclass
class NewOutputDir:
    """The --output-dir a command starts in: removed again when the command fails before its first
    checkpoint (`remove_failed`), so a failed start never leaves a half-made run behind."""

    path: Path
    existed: bool  # an empty directory the user made: emptied, not removed

    @classmethod
    def of(cls, args: argparse.Namespace) -> NewOutputDir | None:
        """None when the command has no --output-dir or the directory already holds files (a resume, an
        --overwrite: that run's files are not this command's to remove)."""
        value = getattr(args, "output_dir", None)
        if value is None:
            return None
        path = Path(value)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            return None
        return cls(path, path.exists())

    def remove_failed(self) -> None:
        from vllm_train.trainers.common import list_checkpoints

        if not distributed.is_main() or not self.path.is_dir() or list_checkpoints(self.path):
            return
        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()


def add_output_args(parser: argparse.ArgumentParser) -> None:
    # transformers' TrainingArguments (TRL's configs) write to ./trainer_output when no output_dir is given
    parser.add_argument("--output-dir", default="trainer_output", metavar="DIR",
                        help="directory for the adapter and run files (default: trainer_output, as TRL's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the vllm-train run in a non-empty --output-dir: the files its run_manifest.json "
                             "lists are deleted once every input has been checked (other files stay; a directory "
                             "that is not a run is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
