"""Choose class weights and post-processing on out-of-fold probabilities, with nested CV.

    python scripts/oof_probabilities.py --run RUN          # once: RUN/oof/<case>.npz
    python scripts/tune_postprocess.py --oof RUN/oof [--out tuning.json] [--jobs 2]

A candidate is (class weights multiplying the probabilities before the argmax, the largest
distance (mm) oedema may lie from the core (0: any), min_component voxels, min_core voxels a
kept component must hold, min_enhancing voxels); see
tumorseg.postprocess for the rules. Every candidate is scored on every case (Dice of whole,
core and enhancing; empty vs empty = 1). Reported:
- the default (no weights, the package's default post-processing): the plain CV figure;
- nested: for each fold, the candidate with the best mean-of-three Dice over the *other* folds'
  cases is applied to that fold's cases; pooled over all cases. This is the honest estimate
  of the tuning, since no case's own score chose its candidate;
- the candidate best over all cases (what a release would use) and its (optimistic) score.
"""

from __future__ import annotations

import argparse
import itertools
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from tumorseg.postprocess import PostprocessConfig, distance_to_core, postprocess

REGIONS = {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)}
WEIGHTS = {  # canonical classes 0 other, 1 necrosis, 2 oedema, 4 enhancing (3 absent in 2018)
    "w0": (0.5, 0.7, 1.0, 1.4, 2.0),
    "w1": (1.0, 1.5, 2.0),
    "w2": (0.7, 1.0, 1.4),
    "w4": (1.0, 1.5),
}
DISTANCES = (0, 20, 30, 45)  # mm; 0 = rule off
COMPONENTS = (0, 3000, 10000, 20000)
CORE = (0, 1, 500)
ENHANCING = (0, 500)


def region_dice(pred: np.ndarray, ref: np.ndarray, extra: np.ndarray | None = None) -> list[float]:
    """[whole, core, enhancing] Dice of two canonical label maps (5 classes); `extra`: a (5, 5)
    (pred, ref) histogram of voxels not in the arrays."""
    h = np.bincount(pred.ravel().astype(np.int64) * 5 + ref.ravel(), minlength=25).reshape(5, 5)
    if extra is not None:
        h = h + extra
    out = []
    for classes in REGIONS.values():
        sel = np.zeros(5, bool)
        sel[list(classes)] = True
        tp, fp, fn = h[sel][:, sel].sum(), h[sel][:, ~sel].sum(), h[~sel][:, sel].sum()
        out.append(1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn))
    return out


def default_labels(probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The `segment` pipeline's labels (X, Y, Z) uint8 canonical from probabilities (X, Y, Z, 5)
    and the brain mask: argmax, 0 outside the brain, default post-processing."""
    lab = np.argmax(probs, axis=-1).astype(np.uint8)
    lab[~mask] = 0
    return postprocess(lab, PostprocessConfig())


def score_case(path: Path) -> tuple[int, dict[tuple, list[float]]]:
    """All candidates' Dice on one out-of-fold case: (fold, {candidate: [w, c, e]}).

    Only voxels that some weighting can label tumour (max_k w_k p_k > min w0 * p0), or that
    are tumour in the reference, are handled; every other voxel is 0 in every candidate, and
    enters the Dice through a fixed histogram."""
    with np.load(path) as z:
        probs, ref, mask, fold = z["probs"], z["label"], z["mask"], int(z["fold"])
        spacing = tuple(float(v) for v in z["spacing"])
    shape = ref.shape
    flat = probs.reshape(-1, 5).astype(np.float32)
    top = max(max(v) for k, v in WEIGHTS.items() if k != "w0")
    cand = ((flat[:, 1:].max(axis=1) * top > flat[:, 0] * min(WEIGHTS["w0"]))
            & mask.ravel()) | (ref.ravel() > 0)
    idx = np.flatnonzero(cand)
    P, R = flat[idx], ref.ravel()[idx]
    extra = np.zeros((5, 5), np.int64)
    extra[0] = np.bincount(ref.ravel()[~cand], minlength=5)[:5]
    inside = mask.ravel()[idx]
    scores: dict[tuple, list[float]] = {}
    full = np.zeros(ref.size, np.uint8)
    for w0, w1, w2, w4 in itertools.product(*WEIGHTS.values()):
        w = np.array([w0, w1, w2, 1.0, w4], np.float32)
        lab = np.argmax(P * w, axis=-1).astype(np.uint8)
        lab[~inside] = 0
        full[idx] = lab
        dist = distance_to_core(full.reshape(shape), spacing)
        full[idx] = 0
        for dmax in DISTANCES:
            lab_d = lab
            if dmax and dist is not None:
                lab_d = lab.copy()
                lab_d[(lab == 2) & (dist.ravel()[idx] > dmax)] = 0
            for k, dice in _rules_1_2(lab_d, idx, shape, full, R, extra).items():
                scores[(w0, w1, w2, w4, dmax, *k)] = dice
    # The package's own pipeline as the control (must equal the plain CV numbers).
    scores[("default",)] = region_dice(default_labels(probs, mask), ref)
    return fold, scores


def _rules_1_2(lab: np.ndarray, idx: np.ndarray, shape: tuple, full: np.ndarray, R: np.ndarray,
               extra: np.ndarray) -> dict[tuple, list[float]]:
    """Dice of every (min_component, min_core, min_enhancing) on the candidate voxels' labels
    `lab` (rules 1 and 2 of tumorseg.postprocess; `full`: a zero scratch of the volume)."""
    import cc3d

    full[idx] = lab > 0  # binary: cc3d splits different values into different components
    cc, n = cc3d.connected_components(full.reshape(shape), connectivity=26, return_N=True)
    full[idx] = 0
    ccc = cc.ravel()[idx]
    sizes = np.bincount(ccc, minlength=n + 1)
    core = np.bincount(ccc[np.isin(lab, REGIONS["core"])], minlength=n + 1)
    sizes[0] = 0
    out = {}
    for comp, min_core in itertools.product(COMPONENTS, CORE):
        keep = (sizes >= comp) & (core >= min_core)
        if n:
            keep[int(np.argmax(sizes))] = True
        keep[0] = False
        kept = np.where(keep[ccc], lab, 0).astype(np.uint8)
        n_enh = int(np.count_nonzero(kept == 4))
        for enh in ENHANCING:
            final = kept
            if 0 < n_enh < enh:
                final = kept.copy()
                final[final == 4] = 1
            out[(comp, min_core, enh)] = region_dice(final, R, extra)
    return out


def pooled(rows: list[list[float]]) -> dict:
    a = np.asarray(rows)
    return {"whole": float(a[:, 0].mean()), "core": float(a[:, 1].mean()),
            "enhancing": float(a[:, 2].mean()), "mean": float(a.mean()),
            "cases_whole_below_0.6": int((a[:, 0] < 0.6).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=1, help="cases scored in parallel processes")
    args = ap.parse_args()
    paths = sorted(args.oof.glob("*.npz"))
    per_case = {}
    with ProcessPoolExecutor(max(args.jobs, 1)) as pool:
        for p, scored in zip(paths, pool.map(score_case, paths)):
            per_case[p.stem] = scored
            print(f"scored {p.stem}", flush=True)
    keys = [k for k in next(iter(per_case.values()))[1] if k != ("default",)]
    folds = sorted({f for f, _ in per_case.values()})

    def best_over(ids: list[str]) -> tuple:
        return max(keys, key=lambda k: np.mean([per_case[i][1][k] for i in ids]))

    def nested(candidates: list[tuple]) -> tuple[list[list[float]], dict]:
        rows, chosen = [], {}
        for f in folds:
            inner = [i for i, (g, _) in per_case.items() if g != f]
            outer = [i for i, (g, _) in per_case.items() if g == f]
            k = max(candidates, key=lambda c: np.mean([per_case[i][1][c] for i in inner]))
            chosen[f] = list(k)
            rows += [per_case[i][1][k] for i in outer]
        return rows, chosen

    nested_rows, chosen = nested(keys)
    # Rule 0 alone on the package's defaults (no weights, 10,000 mm^3, 500 mm^3 at 1 mm voxels).
    default = PostprocessConfig()
    rule0 = {d: (1.0, 1.0, 1.0, 1.0, d, int(default.min_component_mm3), 0,
                 int(default.min_enhancing_mm3)) for d in DISTANCES}
    rule0_rows, rule0_chosen = nested(list(rule0.values()))
    ids = list(per_case)
    best = best_over(ids)
    names = ["w0", "w1", "w2", "w4", "max_oedema_distance_mm", "min_component_voxels",
             "min_core_voxels", "min_enhancing_voxels"]
    result = {
        "cases": len(ids),
        "default": pooled([per_case[i][1][("default",)] for i in ids]),
        "nested": pooled(nested_rows),
        "rule0_alone": {str(d): pooled([per_case[i][1][k] for i in ids]) for d, k in rule0.items()},
        "rule0_alone_nested": pooled(rule0_rows),
        "rule0_alone_chosen_per_fold": {str(f): k[4] for f, k in rule0_chosen.items()},
        "chosen_per_fold": {str(f): dict(zip(names, k)) for f, k in chosen.items()},
        "best_all": dict(zip(names, best)),
        "best_all_score": pooled([per_case[i][1][best] for i in ids]),
        "per_case_best_all": {i: per_case[i][1][best] for i in ids},
        "per_case_default": {i: per_case[i][1][("default",)] for i in ids},
        "per_case_rule0": {i: {str(d): per_case[i][1][k] for d, k in rule0.items()} for i in ids},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
