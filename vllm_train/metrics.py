"""Run metrics: one JSON line per logging step, TensorBoard scalars (and Weights & Biases, if asked), and
PNG curves at the end."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from vllm_train import distributed, run_manifest
from vllm_train.errors import VllmTrainError
from vllm_train.loading import library_errors

REPORT_BACKENDS = ("tensorboard", "wandb")  # metrics.jsonl is always written


def report_backends(value: str | Sequence[str]) -> list[str]:
    """The config's report_to as TRL takes it: a list or comma string of backends, "all" or "none"."""
    names = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if names == ["none"]:
        return []
    if names == ["all"]:
        names = list(REPORT_BACKENDS)
    if not all(n in REPORT_BACKENDS for n in names):
        raise VllmTrainError(f"config field 'report_to': {value!r} is invalid (none, all, or a list of "
                             f"{', '.join(REPORT_BACKENDS)})")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise VllmTrainError("config field 'report_to': wandb needs the wandb package (pip install wandb)")
    if "wandb" in names and not wandb_can_log():  # else wandb.init fails once the model has loaded
        raise VllmTrainError("config field 'report_to': wandb is not logged in (run `wandb login`, set "
                             "WANDB_API_KEY, or WANDB_MODE=offline to keep the run on disk)")
    return list(dict.fromkeys(names))


def wandb_can_log() -> bool:
    """W&B can start a run: offline or disabled, an API key in the environment, or the one `wandb login`
    stored in the netrc file for the W&B host."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MetricsLogger:
    """Append-only ``metrics.jsonl`` + TensorBoard (``tb/``) + W&B (``wandb/``, if asked) under a run directory.

    On resume the JSONL is cut back to the resumed step, so the file always describes one consistent run.
    In a data-parallel run only rank 0 writes (the logged values are already reduced over ranks); on
    the other ranks the logger does nothing.
    """

    def __init__(self, run_dir: str | Path, report_to: Sequence[str] = ("tensorboard",),
                 resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self._file = self._tb = self._wandb = None
        if not distributed.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            _write_lines_atomically(self.path, kept)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        run_manifest.note(self.path, fingerprint=False)  # appended to while the run lives
        self._tb = None
        if tensorboard and "tensorboard" in report_to:  # tensorboard=False: the trainers' switch to turn it off
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
                run_manifest.note(self.run_dir / "tb")
            except ImportError:  # tensorboard is a dependency, but a logger must never stop training
                self._tb = None
        if "wandb" in report_to:
            self._wandb = _start_wandb(self.run_dir, resumed=resume_step is not None)
            run_manifest.note(self.run_dir / "wandb")

    def log(self, step: int, metrics: dict) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_ID_FILE = "wandb/vllm_train_run_id"  # a resumed run continues the same W&B run


def _start_wandb(run_dir: Path, resumed: bool):
    """A W&B run for this run directory (project from WANDB_PROJECT, default "vllm-train"; WANDB_MODE=offline
    keeps it on disk under <run_dir>/wandb), holding the resolved config; None if wandb is not installed
    (the config refuses report_to=wandb then, so this only guards direct use)."""
    try:
        import wandb
    except ImportError:
        return None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else None
    resolved = run_dir / "resolved_config.json"
    config = json.loads(resolved.read_text()) if resolved.exists() else {}
    with library_errors("report_to wandb"):  # a revoked key, no network: one line
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vllm-train"), name=run_dir.name,
                         dir=str(run_dir), config=config, id=run_id, resume="allow" if run_id else None)
    id_file.write_text(run.id)
    return run


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_lines_atomically(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[str], title: str = "") -> Path | None:
    """One subplot per metric key found in the JSONL and not constant, against step: the raw values thin, a
    smoothed curve (`smooth`) over them (not over a schedule), y-range from `y_range` so one early spike does
    not flatten the rest. Returns the PNG path, or None (also on every rank but 0 of a data-parallel run)."""
    if not distributed.is_main():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    series = {}
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if len(pts) == 1 or len({v for _, v in pts}) > 1:  # a constant (the lr of a constant schedule): no panel
            series[key] = pts
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), squeeze=False, sharex=True)
    for ax, (key, pts) in zip(axes[:, 0], series.items()):
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) >= SMOOTH_FROM and key not in SCHEDULES:
            ax.plot(steps, values, alpha=0.3, linewidth=0.8, color="C0")
            ax.plot(steps, smooth(values), color="C0", label="smoothed")
        else:
            ax.plot(steps, values, marker=".", color="C0")
        ax.set_ylim(*y_range(values))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    run_manifest.note(out_png)
    return out_png


SMOOTH_FROM = 10  # points; fewer are drawn as they are
SCHEDULES = ("lr",)  # set, not measured: never smoothed


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Centred moving average (no lag, unlike an EMA: these plots are read after the fact); the window is
    ~1/10 of the series (odd, >= 3) and shrinks at the ends."""
    if window is None:
        window = max(3, len(values) // 10 | 1)
    half = window // 2
    return [sum(part := values[max(0, i - half):i + half + 1]) / len(part) for i in range(len(values))]


def y_range(values: list[float]) -> tuple[float, float]:
    """The 2nd..98th percentile of the values, padded by 10 %: outliers (a first-step loss 10x the rest)
    leave the plot instead of squashing it; a series without outliers is shown whole."""
    ordered = sorted(values)
    low = ordered[int(0.02 * (len(ordered) - 1))]
    high = ordered[math.ceil(0.98 * (len(ordered) - 1))]
    pad = 0.1 * (high - low) or 0.1 * abs(high) or 0.1
    return low - pad, high + pad
