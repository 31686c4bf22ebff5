"""Run directories and their manifest: what a run wrote, so that ``--overwrite`` removes that and nothing else.

A run directory holds the run marker ``resolved_config.json`` (written first by every run) and, beside
it, the manifest ``run_manifest.json``: the paths the run wrote, relative to the directory, added as
they are written (`note`) and dropped when the run deletes them again (`forget`: checkpoint rotation).
A file written once records its size and sha256, so that a file changed afterwards is known to be the
user's now; a file still growing (metrics.jsonl) and a directory the run made whole (tb/,
checkpoints/step-N/) record nothing more.

``--overwrite`` (`plan_overwrite`) is checked before anything is touched and carried out right before the
new run's first write (`OverwritePlan.carry_out`). It removes exactly the manifest's paths, only in a
directory that holds a manifest, and refuses in one line: a directory that is not a run, a path that is
also an input of the command, a listed file changed since the run wrote it, or a file the run did not
write where the new run will write. A run directory written before manifests existed is refused too:
which of its files are the run's (a README.md? a config.json?) cannot be told, and guessing by name is
how users' files were lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from vllm_train import distributed
from vllm_train.errors import VllmTrainError

RUN_MARKER = "resolved_config.json"
MANIFEST = "run_manifest.json"
FINGERPRINT_LIMIT = 64 << 20  # larger files (merged weights) are recorded by size: nobody edits those by hand


def is_run(path: str | Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file() or (Path(path) / MANIFEST).is_file()


def entries(run_dir: str | Path) -> dict[str, dict] | None:
    """The manifest's paths ("name", "dir/name", "dir/" for a whole directory) -> their record; None when
    `run_dir` has no manifest."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        paths = json.loads(path.read_text())["paths"]
    except (ValueError, KeyError, TypeError):
        raise VllmTrainError(f"{path}: unreadable run manifest (delete the run's files yourself)") from None
    return paths if isinstance(paths, dict) else {}


def start(run_dir: str | Path) -> None:
    """Give `run_dir` a manifest if it has none (rank 0): the run's later writes are noted in it."""
    if distributed.is_main() and entries(run_dir) is None:
        _write(Path(run_dir), {})


def note(path: str | Path, fingerprint: bool = True) -> None:
    """Record `path` (just written) in the manifest of the run directory it is in: its own directory or the
    one above (a run writes at most one level down, rm's adapter/). Paths under a temp name (a part with a
    leading dot) are not recorded: they are renamed or removed. `fingerprint=False`: a file still growing."""
    found = _run_of(Path(path))
    if found is None or not distributed.is_main() or not Path(path).exists():
        return
    run_dir, key = found
    paths = entries(run_dir) or {}
    paths[key] = fingerprint_of(Path(path)) if fingerprint and not key.endswith("/") else {}
    _write(run_dir, paths)


def forget(path: str | Path) -> None:
    """Drop `path` (deleted by the run) from its run directory's manifest."""
    found = _run_of(Path(path), exists=False)
    if found is None or not distributed.is_main():
        return
    run_dir, key = found
    paths = entries(run_dir) or {}
    if paths.pop(key, None) is not None or paths.pop(key + "/", None) is not None:
        _write(run_dir, paths)


def fingerprint_of(path: Path) -> dict:
    size = path.stat().st_size
    if size > FINGERPRINT_LIMIT:
        return {"size": size}
    return {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _run_of(path: Path, exists: bool = True) -> tuple[Path, str] | None:
    """(run directory, manifest key of `path`) or None when `path` is not in a run directory."""
    for run_dir in (path.parent, path.parent.parent):
        if (run_dir / MANIFEST).is_file():
            rel = path.relative_to(run_dir).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                return None
            return run_dir, rel + "/" if exists and path.is_dir() else rel
    return None


def _write(run_dir: Path, paths: dict) -> None:
    target = run_dir / MANIFEST
    tmp = run_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "paths": dict(sorted(paths.items()))}, indent=1) + "\n")
    os.replace(tmp, target)


# ---- --overwrite ----------------------------------------------------------------------------------
@dataclasses.dataclass
class OverwritePlan:
    """The earlier run's paths that --overwrite removes (checked by `plan_overwrite`)."""

    run_dir: Path
    paths: list[str]

    def carry_out(self) -> list[str]:
        """Remove the paths (rank 0): the marker after the rest, the manifest last, so that a clear cut
        short still leaves a run that a second --overwrite finishes; directories left empty go too."""
        if not distributed.is_main():
            return []
        order = sorted(self.paths, key=lambda p: p == RUN_MARKER)
        for key in order:
            target = self.run_dir / key.rstrip("/")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            _remove_empty_parents(target.parent, self.run_dir)
        (self.run_dir / MANIFEST).unlink(missing_ok=True)
        return order


def plan_overwrite(run_dir: str | Path, inputs: Mapping[str, str | Path | None], writes: Iterable[str],
                   flag: str = "--output-dir") -> OverwritePlan:
    """What --overwrite removes in `run_dir`, after checking that it may (one-line errors; nothing is
    touched). `inputs`: the command's input paths by flag, none of which may be in `run_dir`; `writes`:
    where the new run will write (relative paths; a directory covers what is below it)."""
    run_dir = Path(run_dir)
    for name, value in inputs.items():
        if value and Path(value).exists() and _inside(Path(value), run_dir):
            raise VllmTrainError(f"--overwrite: {name} {value} is in {flag} {run_dir}, whose earlier run "
                                 f"--overwrite would delete; write the new run to another {flag}")
    paths = entries(run_dir)
    if paths is None and (run_dir / RUN_MARKER).is_file():
        raise VllmTrainError(f"--overwrite: {flag} {run_dir} was written by an older vllm-train (no {MANIFEST}), "
                             f"so its own files cannot be told from yours; delete them yourself or use another "
                             f"{flag}")
    if paths is None:
        raise VllmTrainError(f"--overwrite: {flag} {run_dir} is not empty and holds no vllm-train run (no "
                             f"{RUN_MARKER}); nothing is written into it: choose another {flag}")
    for key, record in paths.items():
        if record and _changed(run_dir / key, record):
            raise VllmTrainError(f"--overwrite: {run_dir / key} was changed after vllm-train wrote it; move it "
                                 f"away to keep it (--overwrite deletes the earlier run's files)")
    for key in writes:
        for found in _files_at(run_dir, key):
            rel = found.relative_to(run_dir).as_posix()
            if not _covered(rel, paths):
                raise VllmTrainError(f"--overwrite: {found} was not written by the earlier run (it is not in its "
                                     f"{MANIFEST}) and the new run writes there; move it away first")
    return OverwritePlan(run_dir, list(paths))


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _changed(path: Path, record: dict) -> bool:
    if not path.is_file():
        return False  # gone already: nothing of the user's to keep
    now = fingerprint_of(path) if "sha256" in record else {"size": path.stat().st_size}
    return now != record


def _files_at(run_dir: Path, key: str) -> list[Path]:
    """The files at `key` (a file, or every file below a directory) but those under temp names."""
    target = run_dir / key.rstrip("/")
    if target.is_file() or target.is_symlink():
        return [target]
    if not target.is_dir():
        return []
    return [p for p in target.rglob("*") if not p.is_dir()
            and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]


def _covered(rel: str, paths: Mapping[str, dict]) -> bool:
    return rel in (MANIFEST, *paths) or any(key.endswith("/") and rel.startswith(key) for key in paths)


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    while directory != stop and _inside(directory, stop) and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent
