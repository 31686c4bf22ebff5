"""Writing files so that nothing bad or half-written ever replaces a good one.

Every file goes to a temp name in its directory first and is renamed into place (a reader never sees half
a file; a failed write leaves the previous file as it was). Weights are written only when every value is
finite (`save_weights`, used by every path that writes weights: adapters, checkpoints, the merged model,
the reward and value heads): a run that diverged, or a merge whose weights overflow their dtype, fails the
write with one line naming the file and the tensor instead of saving NaN or inf. What lands in a run
directory is noted in its manifest (`vllm_train.run_manifest`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_train import run_manifest
from vllm_train.errors import VllmTrainError


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Refuse (one line naming `where` and the tensor) when a floating-point tensor holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise VllmTrainError(f"{where}: not written: tensor {name} has {bad} non-finite value(s) (NaN or inf) "
                                 f"of {tensor.numel()} in {str(tensor.dtype).removeprefix('torch.')}; the "
                                 f"previous file is kept")


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(temp path)`, then rename the temp file to `path`; the temp file is removed if anything fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_weights(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Write `tensors` as a safetensors file at `path`: checked finite, then written atomically and noted in
    the run manifest. A non-finite tensor raises `VllmTrainError` and the file at `path` stays as it was."""
    check_finite(tensors, path)
    write_atomically(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=metadata))
    run_manifest.note(path)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` atomically and note it in the run manifest."""
    write_atomically(path, lambda tmp: tmp.write_text(text))
    run_manifest.note(path)
    return Path(path)
