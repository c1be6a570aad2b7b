"""Score an ensemble of cross-validation runs on their out-of-fold probabilities.

    python scripts/oof_probabilities.py --run RUN_A     # once per run: RUN/oof/<case>.npz
    python scripts/ensemble_oof.py --oof RUN_A/oof --oof RUN_B/oof [--json out.json]

For every case that each OOF folder holds, the runs' class probabilities are averaged (the
ensemble) and, as the control, each run is scored alone; each goes through the package's
default post-processing (`tumorseg.postprocess`), and the Dice of whole, core and enhancing
tumour (BraTS 2017+ regions, empty vs empty = 1) is printed per case and pooled. The runs must
share their folds and preprocessing (the same cache), so each case is out-of-fold for every
model. Keep the OOF folders outside the repository: they are derived from the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tune_postprocess import default_labels, pooled, region_dice


def _fail(message: str) -> None:
    """One line on stderr and exit code 2, as the CLI does for bad input."""
    print(f"ensemble_oof: {message}", file=sys.stderr)
    raise SystemExit(2)


def score(dirs: list[Path]) -> dict:
    """{case_id: {"fold": int, "runs": [[w, c, e] per dir], "ensemble": [w, c, e]}} over the
    cases every dir holds."""
    common = sorted(set.intersection(*({p.stem for p in d.glob("*.npz")} for d in dirs)))
    if not common:
        _fail("the OOF folders share no case")
    out = {}
    for cid in common:
        total, first, singles = None, None, []
        for d in dirs:
            with np.load(d / f"{cid}.npz") as z:
                probs = z["probs"].astype(np.float32)
                ref, mask, fold = z["label"], z["mask"], int(z["fold"])
            if first is None:
                first, total = ref, np.zeros_like(probs)
            elif probs.shape != total.shape or not np.array_equal(ref, first):
                _fail(f"{d / cid}.npz is not on the grid of {dirs[0] / cid}.npz "
                      "(the runs must share a preprocessing cache)")
            singles.append(region_dice(default_labels(probs, mask), ref))
            total += probs
        out[cid] = {"fold": fold, "runs": singles,
                    "ensemble": region_dice(default_labels(total / len(dirs), mask), ref)}
        row = " | ".join(f"{w:.3f} {c:.3f} {e:.3f}" for w, c, e in singles)
        w, c, e = out[cid]["ensemble"]
        print(f"{cid:24s} fold {fold}  {row}  ->  {w:.3f} {c:.3f} {e:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", action="append", type=Path, required=True,
                    help="a RUN/oof folder (give two or more)")
    ap.add_argument("--json", type=Path, help="write the per-case and pooled scores here")
    args = ap.parse_args()
    if len(args.oof) < 2:
        ap.error("give at least two --oof folders")
    cases = score(args.oof)
    summary = {"runs": [str(d) for d in args.oof], "cases": cases,
               "pooled_runs": [pooled([c["runs"][i] for c in cases.values()])
                               for i in range(len(args.oof))],
               "pooled_ensemble": pooled([c["ensemble"] for c in cases.values()])}
    for name, p in [*zip(map(str, args.oof), summary["pooled_runs"]),
                    (f"ensemble of {len(args.oof)}", summary["pooled_ensemble"])]:
        print(f"{name}: {p['whole']:.3f} / {p['core']:.3f} / {p['enhancing']:.3f} "
              f"(mean {p['mean']:.3f}) over {len(cases)} cases")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
