"""Training curves (`curves.png` in a run folder) and the remaining-time estimate of a run.

Both read what training already records: metrics.jsonl holds one row every 10 steps
({"phase", "epoch", "step", "loss", "lr", ...}) and one row per epoch (the same keys plus
"patches_per_s" and, on validation epochs, "val_dice_whole" / "_core" / "_enhancing" / "_mean").
"""

from __future__ import annotations

import json
from pathlib import Path

from tumorseg.io import atomic_write

REGION_COLOURS = {"whole": "tab:green", "core": "tab:red", "enhancing": "tab:orange",
                  "mean": "black"}


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step rows, epoch rows) of a metrics.jsonl; blank or truncated lines are skipped."""
    steps, epochs = [], []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the run rewrites it on resume
            continue
        (epochs if "patches_per_s" in row else steps).append(row)
    return steps, epochs


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Write a two-panel PNG: training loss against the run's step (phases one after the other,
    a dotted line where phase 2 starts), and validation Dice per region against the run's epoch.
    Written atomically; returns `out_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, epochs = read_metrics(metrics_path)
    offsets = _phase_offsets(steps + epochs)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    for phase in sorted({r["phase"] for r in steps}):
        rows = [r for r in steps if r["phase"] == phase]
        ax_loss.plot([offsets[phase] + r["step"] for r in rows], [r["loss"] for r in rows],
                     lw=0.8, label=f"phase {phase}")
        if phase > 1:
            ax_loss.axvline(offsets[phase], ls=":", color="grey")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.set_yscale("log")
    epoch_offsets = _phase_offsets(epochs, key="epoch")
    val = [r for r in epochs if "val_dice_mean" in r]
    for region, colour in REGION_COLOURS.items():
        xs = [epoch_offsets[r["phase"]] + r["epoch"] for r in val]
        ax_dice.plot(xs, [r[f"val_dice_{region}"] for r in val], "o-", color=colour, label=region,
                     lw=2 if region == "mean" else 1)
    ax_dice.set(xlabel="epoch (both phases)", ylabel="Dice", title="validation", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


def _phase_offsets(rows: list[dict], key: str = "step") -> dict[int, int]:
    """{phase: number of `key` units in the phases before it} (from the rows' maxima)."""
    last: dict[int, int] = {}
    for r in rows:
        last[r["phase"]] = max(last.get(r["phase"], 0), r[key])
    offsets, total = {}, 0
    for phase in sorted(last):
        offsets[phase] = total
        total += last[phase]
    return offsets


def eta_seconds(steps_left: list[int], rates: list[float | None]) -> float:
    """Remaining seconds of a run: steps_left[i] (phase i's steps still to run) times rates[i]
    (its measured seconds per step, validation included); a phase not measured yet (None)
    takes the rate of the nearest measured phase before it (an over-estimate for phase 2,
    which trains only the output layer)."""
    total, known = 0.0, None
    for left, rate in zip(steps_left, rates):
        known = rate if rate is not None else known
        if left > 0 and known is not None:
            total += left * known
    return total


def format_duration(seconds: float) -> str:
    """'1h05m', '12m30s' or '45s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
