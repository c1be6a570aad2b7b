"""Training curves and the remaining-time estimate (tumorseg.curves)."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from tumorseg.curves import eta_seconds, format_duration, plot_curves, read_metrics


def test_eta_uses_each_phases_measured_rate_and_the_last_known_for_the_rest():
    assert eta_seconds([200, 100], [0.5, 0.1]) == pytest.approx(200 * 0.5 + 100 * 0.1)
    assert eta_seconds([200, 100], [0.5, None]) == pytest.approx(300 * 0.5)  # phase 2 unmeasured
    assert eta_seconds([0, 40], [0.5, 0.25]) == pytest.approx(10.0)
    assert eta_seconds([10, 5], [None, None]) == 0.0  # nothing measured yet: no estimate


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (60, "1m00s"),
                                           (750, "12m30s"), (3600, "1h00m"), (3900, "1h05m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def _metrics_file(path):
    rows = []
    for phase, steps, epochs in ((1, 30, 3), (2, 20, 2)):
        per_epoch = steps // epochs
        for step in range(1, steps + 1):
            if step % 10 == 0 or step == 1:
                rows.append({"phase": phase, "epoch": (step - 1) // per_epoch + 1, "step": step,
                             "loss": 1.0 / step, "lr": 1e-3, "momentum": 0.9})
            if step % per_epoch == 0:
                rows.append({"phase": phase, "epoch": step // per_epoch, "step": step,
                             "loss": 1.0 / step, "lr": 1e-3, "patches_per_s": 100.0,
                             **{f"val_dice_{r}": 0.1 * step / steps for r in
                                ("whole", "core", "enhancing", "mean")}})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"phase": 2, "ep'  # cut by a kill
    path.write_text(text)
    return rows


def test_read_metrics_splits_step_and_epoch_rows_and_skips_a_cut_line(tmp_path):
    rows = _metrics_file(tmp_path / "metrics.jsonl")
    steps, epochs = read_metrics(tmp_path / "metrics.jsonl")
    assert steps == [r for r in rows if "momentum" in r]
    assert epochs == [r for r in rows if "patches_per_s" in r]
    assert len(epochs) == 5


def test_plot_curves_writes_a_png(tmp_path):
    _metrics_file(tmp_path / "metrics.jsonl")
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    image = imread(out)
    assert image.shape[:2] == (400, 1000)
    assert (image[..., :3] < 0.5).any()  # lines drawn, not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
