"""How visible each case's oedema is, next to its cross-validated whole-tumour Dice.

    python scripts/oedema_contrast.py ../shared/data/brats2018 [--crossval ~/runs/cv_v5]

Contrast of a modality = (mean of the reference's oedema - mean of the brain outside the
tumour) / standard deviation of the brain outside the tumour, on the raw images (the brain is
the non-zero voxels). Prints a markdown table sorted by FLAIR contrast and, with --crossval,
the Spearman correlation between FLAIR contrast and whole-tumour Dice (from its cases.csv).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from tumorseg.datasets import MODALITIES, find_cases, load_case

OEDEMA = 2  # canonical class


def contrast(image: np.ndarray, canonical: np.ndarray) -> float:
    """(mean over oedema - mean over tumour-free brain) / std over tumour-free brain; NaN if no oedema."""
    brain = image != 0
    normal = image[brain & (canonical == 0)]
    oedema = image[canonical == OEDEMA]
    if oedema.size == 0 or normal.std() == 0:
        return float("nan")
    return float((oedema.mean() - normal.mean()) / normal.std())


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a)).astype(float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--crossval", type=Path, help="a `tumorseg crossval` folder (its cases.csv)")
    args = ap.parse_args()
    dice = {}
    if args.crossval:
        with open(args.crossval / "cases.csv") as fh:
            dice = {r["case_id"]: float(r["dice"]) for r in csv.DictReader(fh) if r["region"] == "whole"}
    rows = []
    for case in find_cases(args.data):
        loaded = load_case(case)  # image (4, x, y, z) in MODALITIES order; label canonical
        flair, t2 = (loaded.image[MODALITIES.index(m)] for m in ("flair", "t2"))
        rows.append((case.case_id, contrast(flair, loaded.label), contrast(t2, loaded.label),
                     dice.get(case.case_id)))
    rows.sort(key=lambda r: r[1])
    print("| case | FLAIR oedema contrast | T2 oedema contrast | whole-tumour Dice |")
    print("|---|---:|---:|---:|")
    for cid, flair, t2, d in rows:
        print(f"| {cid} | {flair:.2f} | {t2:.2f} | {'-' if d is None else f'{d:.3f}'} |")
    scored = [(r[1], r[3]) for r in rows if r[3] is not None and not np.isnan(r[1])]
    if len(scored) > 2:
        a = np.array(scored)
        rho = np.corrcoef(_ranks(a[:, 0]), _ranks(a[:, 1]))[0, 1]
        print(f"\nSpearman correlation of FLAIR contrast and whole-tumour Dice: {rho:.2f} ({len(a)} cases)")


if __name__ == "__main__":
    main()
