"""Markdown tables of a `tumorseg crossval` folder, as pasted into docs/MODEL_CARD.md.

    python scripts/crossval_report.py ~/runs/cv_v2            # plain segmentation
    python scripts/crossval_report.py ~/runs/cv_v2 --tta      # the same folds with --tta
    python scripts/crossval_report.py ~/runs/cv_v8 --views 3  # ... sliced in three planes
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

REGIONS = ("whole", "core", "enhancing")


def _f(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report(cv_dir: Path, tta: bool = False, views: int = 1) -> str:
    tag = ("_tta" if tta else "") + (f"_views{views}" if views != 1 else "")  # as crossval names them
    summary = json.loads((cv_dir / f"crossval{tag}.json").read_text())
    with open(cv_dir / f"cases{tag}.csv") as fh:
        rows = list(csv.DictReader(fh))
    lines = ["| fold | cases | Dice whole | Dice core | Dice enhancing | mean | HD95 whole | HD95 core | HD95 enhancing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(summary["per_fold"] + [summary["pooled"]]):
        name = "pooled" if i == len(summary["per_fold"]) else str(i)
        lines.append(f"| {name} | {s['cases']} | " + " | ".join(_f(s[f"dice_{r}"]) for r in REGIONS)
                     + f" | {_f(s['mean_dice'])} | "
                     + " | ".join(_f(s[f"hd95_{r}"], 1) for r in REGIONS) + " |")
    lines += ["", "| case | fold | grade | Dice whole / core / enhancing | HD95 whole / core / enhancing (mm) |",
              "|---|---|---|---|---|"]
    cases: dict[str, dict] = {}
    for r in rows:
        cases.setdefault(r["case_id"], {"fold": r["fold"], "grade": r["grade"]})[r["region"]] = r
    for cid in sorted(cases, key=lambda c: (int(cases[c]["fold"]), c)):
        c = cases[cid]
        dice = " / ".join(_f(float(c[r]["dice"])) for r in REGIONS)
        hd = " / ".join(_f(float(c[r]["hd95"]), 1) for r in REGIONS)
        lines.append(f"| {cid} | {c['fold']} | {c['grade']} | {dice} | {hd} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_dir", type=Path)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--views", type=int, choices=(1, 3), default=1)
    args = ap.parse_args()
    print(report(args.cv_dir, args.tta, args.views))
