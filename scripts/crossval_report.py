"""Markdown tables of a `tumorseg crossval` folder, as pasted into docs/MODEL_CARD.md.

    python scripts/crossval_report.py ~/runs/cv_v2            # plain segmentation
    python scripts/crossval_report.py ~/runs/cv_v2 --tta      # the same folds with --tta
    python scripts/crossval_report.py ~/runs/cv_v8 --views 3  # ... sliced in three planes
    python scripts/crossval_report.py ~/runs/cv_ic --against ~/runs/cv_v8  # paired, per case
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

REGIONS = ("whole", "core", "enhancing")


def _f(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _tag(tta: bool, views: int) -> str:
    return ("_tta" if tta else "") + (f"_views{views}" if views != 1 else "")  # as crossval names them


def _rows(cv_dir: Path, tag: str) -> list[dict]:
    with open(cv_dir / f"cases{tag}.csv") as fh:
        return list(csv.DictReader(fh))


def case_dice(rows: list[dict]) -> dict[str, dict]:
    """case id -> {"fold", "grade", "whole", "core", "enhancing"} (Dice) from cases.csv rows."""
    cases: dict[str, dict] = {}
    for r in rows:
        cases.setdefault(r["case_id"], {"fold": r["fold"], "grade": r["grade"]})[r["region"]] = \
            float(r["dice"])
    return cases


def _mean3(c: dict) -> float:
    return sum(c[r] for r in REGIONS) / len(REGIONS)


def compare(cv_dir: Path, base_dir: Path, tta: bool = False, views: int = 1) -> str:
    """Per-case Dice of cv_dir against base_dir on the cases both have scored, and a summary
    line: the means over those cases, how many cases gain in the mean of three, the median
    change. Raises ValueError when no case is common or a case sits in different folds."""
    tag = _tag(tta, views)
    new, base = case_dice(_rows(cv_dir, tag)), case_dice(_rows(base_dir, tag))
    common = sorted(set(new) & set(base), key=lambda c: (int(new[c]["fold"]), c))
    if not common:
        raise ValueError(f"{cv_dir}: no case scored here is scored in {base_dir}")
    moved = [c for c in common if new[c]["fold"] != base[c]["fold"]]
    if moved:
        raise ValueError(f"{cv_dir}: other folds than {base_dir} (e.g. {moved[0]} in fold "
                         f"{new[moved[0]]['fold']} vs {base[moved[0]]['fold']}): a paired "
                         f"comparison needs the same folds")
    lines = [f"| case | fold | grade | {base_dir.name} whole / core / enhancing | "
             f"{cv_dir.name} whole / core / enhancing | change in the mean of three |",
             "|---|---|---|---|---|---|"]
    deltas = []
    for cid in common:
        b, n = base[cid], new[cid]
        deltas.append(_mean3(n) - _mean3(b))
        lines.append(f"| {cid} | {n['fold']} | {n['grade']} | "
                     + " / ".join(_f(b[r]) for r in REGIONS) + " | "
                     + " / ".join(_f(n[r]) for r in REGIONS) + f" | {deltas[-1]:+.3f} |")

    def means(cases: dict) -> str:
        m = [statistics.fmean(cases[c][r] for c in common) for r in REGIONS]
        return " / ".join(_f(x) for x in m) + f" (mean {_f(statistics.fmean(m))})"

    lines += ["", f"{len(common)} cases: {base_dir.name} {means(base)} -> {cv_dir.name} "
                  f"{means(new)}; {sum(d > 0 for d in deltas)} of {len(common)} cases gain, "
                  f"median change {statistics.median(deltas):+.3f}"]
    return "\n".join(lines)


def report(cv_dir: Path, tta: bool = False, views: int = 1) -> str:
    tag = _tag(tta, views)
    summary = json.loads((cv_dir / f"crossval{tag}.json").read_text())
    rows = _rows(cv_dir, tag)
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
    ap.add_argument("--against", type=Path, metavar="BASE_CV_DIR",
                    help="compare per case with another crossval folder of the same folds")
    args = ap.parse_args()
    try:
        text = (compare(args.cv_dir, args.against, args.tta, args.views) if args.against
                else report(args.cv_dir, args.tta, args.views))
    except FileNotFoundError as exc:
        print(f"error: {exc.filename}: not found (no fold of this crossval folder has been "
              f"scored yet?)", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(text)
