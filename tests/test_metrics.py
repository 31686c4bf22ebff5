"""Curves: smoothing, y-ranges and panels of `plot_curves`, against hand-worked values."""

from __future__ import annotations

import json
import struct

import pytest

from vllm_train.metrics import plot_curves, smooth, y_range


def test_smooth_is_a_centred_moving_average():
    # window 3: the ends average the two points they have
    assert smooth([1.0, 2.0, 3.0, 10.0], window=3) == pytest.approx([1.5, 2.0, 5.0, 6.5])
    line = [float(v) for v in range(100)]
    assert smooth(line)[5:95] == pytest.approx(line[5:95])  # window 11 by default: no lag inside a line
    assert smooth(line)[0] == pytest.approx(2.5)  # the first point averages values 0..5


def test_y_range_drops_a_lone_spike_but_shows_a_short_series_whole():
    assert y_range([float(v) for v in range(1, 11)]) == pytest.approx((1 - 0.9, 10 + 0.9))
    low, high = y_range([1000.0] + [float(v) for v in range(99)])  # a first-step loss 10x the rest
    assert (low, high) == pytest.approx((1 - 9.7, 98 + 9.7))


def _png_height(path) -> int:
    return struct.unpack(">II", path.read_bytes()[16:24])[1]  # IHDR: width, height


def test_plot_has_no_panel_for_a_constant(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": s % 3})
                               + "\n" for s in range(1, 40)))
    two = plot_curves(metrics, tmp_path / "two.png", ["loss", "lr", "grad_norm"])
    one = plot_curves(metrics, tmp_path / "one.png", ["loss", "lr"])
    assert _png_height(two) == 2 * _png_height(one)  # 2.6 inches per panel; lr drew none
    assert plot_curves(metrics, tmp_path / "none.png", ["lr"]) is None
