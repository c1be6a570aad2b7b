"""How many positions the network computes per case, for ways of cutting slices into boxes.

    python benchmarks/box_positions.py [--data ../shared/data/brats2018] [--model two_path]
        [--multiples 1 4 8 16 32] [--bands 1 2 3 4] [--time CASE_ID ... [--rounds 3]]

It counts, over the cases' axial slices with brain (preprocessed as `tumorseg
segment` does), the input-window pixels (box + receptive field - 1 per side) that inference
runs on, the arithmetic's proxy. `multiple` is infer.slice_boxes' rounding of each box side
(more sizes mean fewer equal-size batches and more kernel spectra); `bands` > 1 cuts each
slice's brain box into that many bands of rows, each with its own column extent (a
"staircase"), each band paying the receptive-field margin again. Figures are relative to
bands = 1 at the same multiple. With `--time`, it also times `infer.predict_labels` (one
box per slice) on each named case for every multiple, the multiples alternating within each
round after a warm-up, and counts the voxels whose label differs from the first multiple's.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats2018"


def _round_up(n: int, multiple: int, limit: int) -> int:
    return min(limit, -(-n // multiple) * multiple)


def window_pixels(mask: np.ndarray, rf: int, multiple: int, bands: int) -> tuple[int, set]:
    """Input-window pixels summed over the slices of mask (X, Y, Z), and the box sizes used."""
    nx, ny, _ = mask.shape
    total, sizes = 0, set()
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        m = mask[..., z]
        xs = np.flatnonzero(m.any(1))
        edges = np.linspace(xs[0], xs[-1] + 1, bands + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            ys = np.flatnonzero(m[a:b].any(0))
            if len(ys) == 0:
                continue
            sx, sy = _round_up(b - a, multiple, nx), _round_up(ys[-1] - ys[0] + 1, multiple, ny)
            total += int((sx + rf - 1) * (sy + rf - 1))
            sizes.add((int(sx), int(sy)))
    return total, sizes


def time_multiples(model, pre, multiples: list[int], rounds: int) -> dict:
    """Seconds of predict_labels per multiple (one list per multiple) and label differences."""
    from tumorseg import infer

    original = infer.slice_boxes
    seconds: dict[int, list[float]] = {m: [] for m in multiples}
    labels = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up the engine and the kernel spectra
            for m in multiples:
                infer.slice_boxes = functools.partial(original, multiple=m)
                t0 = time.perf_counter()
                labels[m], _ = infer.predict_labels(model, pre.image, pre.mask)
                if r:
                    seconds[m].append(round(time.perf_counter() - t0, 2))
    finally:
        infer.slice_boxes = original
    first = labels[multiples[0]]
    return {"seconds": seconds,
            "voxels_differing_from_first": {m: int((labels[m] != first).sum()) for m in multiples}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--model", default="two_path")
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--bands", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--time", nargs="+", default=[], metavar="CASE_ID")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tumorseg import weights
    from tumorseg.datasets import find_cases
    from tumorseg.segment import prepare_case

    model, meta = weights.resolve_model(args.model)
    rf = model.receptive_field
    masks, timed_cases = [], {}
    for case in find_cases(args.data):
        pre = prepare_case(case, meta).pre
        masks.append(pre.mask)
        if case.case_id in args.time:  # only these keep their image (~65 MB each)
            timed_cases[case.case_id] = pre
    missing = sorted(set(args.time) - set(timed_cases))
    if missing:
        raise SystemExit(f"--time: no case {', '.join(missing)} under {args.data}")
    rows = []
    for multiple in args.multiples:
        base = None
        for bands in args.bands:
            counts = [window_pixels(m, rf, multiple, bands) for m in masks]
            total = sum(c for c, _ in counts)
            base = base or total
            rows.append({"multiple": multiple, "bands": bands, "window_pixels": total,
                         "relative_to_one_band": round(total / base, 3),
                         "sizes_per_case": round(float(np.mean([len(s) for _, s in counts])), 1)})
    timed = {cid: time_multiples(model, pre, args.multiples, args.rounds)
             for cid, pre in timed_cases.items()}
    print(json.dumps({"cases": len(masks), "model": args.model, "receptive_field": rf,
                      "rows": rows, "timed": timed}, indent=1))


if __name__ == "__main__":
    main()
