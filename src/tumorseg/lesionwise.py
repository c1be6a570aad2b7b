"""Lesion-wise Dice and HD95 of one tumour region, under the two rule sets in use.

Lesion-wise scores judge each tumour lesion (a connected component of the reference) on its
own, so a missed small lesion or a spurious blob weighs as much as a large lesion. BraTS has
published two incompatible rule sets, and papers use both; `RULES` names them:

- "brats2023" (`brats2023`): the BraTS 2023 challenge's reference code
  (rachitsaluja/BraTS-2023-Metrics). Nearby reference lesions are merged (3 dilations), every
  predicted component touching a dilated lesion counts towards it, lesions of <= 50 voxels are
  ignored, and each missed lesion and each false-positive component adds a term of Dice 0 and
  HD95 374 mm to the mean. Missing and spurious lesions are therefore penalised.
- "panoptica" (`panoptica_rules`): the organisers' current package, `brats-evaluation` 0.0.10
  on panoptica 2.1.7 (config "gli"). Components are matched one to one (Hungarian assignment
  on 1 - Dice, pairs with Dice >= 1e-6); Dice and HD95 are averaged over the matched pairs
  only; missed and false lesions are only counted (tp / fp / fn). A region with no match scores
  Dice 0 and HD95 inf; with both masks empty, NaN (the package's values, kept as they are).
  Per-pair HD95 pools both directed surface-distance sets before the 95th percentile.

Both use 26-connected components. tests/test_lesionwise_official.py runs the organisers'
package beside these functions on real BraTS cases and phantoms and checks they agree.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from tumorseg import metrics
from tumorseg.metrics import Spacing

RULES = ("brats2023", "panoptica")
LESION_HD95_MISS = 374.0  # mm, BraTS 2023 lesion-wise penalty
PANOPTICA_MIN_DICE = 1e-6  # brats-evaluation's matching_threshold (config "gli")


def lesion_scores(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing,
                  rules: str) -> dict:
    """{"lesion_dice", "lesion_hd95" (mm), "lesion_tp", "lesion_fp", "lesion_fn"} of one
    region under `rules` (one of RULES). Masks: (x, y, z) boolean; spacing: mm along x, y, z."""
    if rules == "brats2023":
        out = brats2023(pred_mask, ref_mask, spacing)
        tp, fp, fn = out["n_tp"], out["n_fp"], out["n_fn"]
    elif rules == "panoptica":
        out = panoptica_rules(pred_mask, ref_mask, spacing)
        tp, fp, fn = out["tp"], out["fp"], out["fn"]
    else:
        raise ValueError(f"unknown lesion-wise rules {rules!r}; choose one of {', '.join(RULES)}")
    return {"lesion_dice": out["lesion_dice"], "lesion_hd95": out["lesion_hd95"],
            "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn}


def panoptica_rules(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Spacing) -> dict:
    """Lesion-wise scores as brats-evaluation 0.0.10 / panoptica 2.1.7 (config "gli") give them.

    pred_mask, ref_mask: (x, y, z) boolean; spacing: mm along x, y, z (the package reads it
    from the NIfTI header). Returns {"lesion_dice" (the package's sq_dsc), "lesion_hd95"
    (sq_hd95, mm), "tp", "fp", "fn", "pairs": [{"ref", "pred", "dice", "hd95"}]} with
    component ids numbered as cc3d numbers them.
    """
    import cc3d
    from scipy.optimize import linear_sum_assignment

    pred, ref = metrics._as_masks(pred_mask, ref_mask)
    pred_cc, n_pred = cc3d.connected_components(pred.astype(np.uint8), connectivity=26,
                                                return_N=True)
    ref_cc, n_ref = cc3d.connected_components(ref.astype(np.uint8), connectivity=26,
                                              return_N=True)
    pairs = []
    if n_ref and n_pred:
        cost = _matching_cost(pred_cc, ref_cc, n_pred, n_ref)
        for i, j in zip(*linear_sum_assignment(cost)):
            if cost[i, j] < 1.0:
                pairs.append(_scored_pair(pred_cc, ref_cc, int(j) + 1, int(i) + 1, spacing))
    tp = len(pairs)
    if n_ref == 0 and n_pred == 0:
        lesion_dice = lesion_hd95 = math.nan
    elif tp == 0:
        lesion_dice, lesion_hd95 = 0.0, math.inf
    else:
        lesion_dice = float(np.mean([p["dice"] for p in pairs]))
        lesion_hd95 = float(np.mean([p["hd95"] for p in pairs]))
    return {"lesion_dice": lesion_dice, "lesion_hd95": lesion_hd95, "tp": tp,
            "fp": int(n_pred) - tp, "fn": int(n_ref) - tp, "pairs": pairs}


def _matching_cost(pred_cc: np.ndarray, ref_cc: np.ndarray, n_pred: int, n_ref: int
                   ) -> np.ndarray:
    """[n_ref, n_pred] cost 1 - Dice of overlapping pairs, 1 + 1e-6 elsewhere (the package's
    matrix, so that scipy's assignment breaks ties the same way)."""
    both = (pred_cc > 0) & (ref_cc > 0)
    pair_ids, overlap = np.unique(ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both],
                                  return_counts=True)
    ref_size = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    pred_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    for pair_id, inter in zip(pair_ids, overlap):
        r, p = divmod(int(pair_id), n_pred + 1)
        score = 2.0 * inter / (ref_size[r] + pred_size[p])
        if score >= PANOPTICA_MIN_DICE:
            cost[r - 1, p - 1] = 1.0 - score
    return cost


def _scored_pair(pred_cc: np.ndarray, ref_cc: np.ndarray, p: int, r: int, spacing: Spacing
                 ) -> dict:
    """Dice and pooled HD95 (mm) of predicted component p and reference component r."""
    pred, ref = pred_cc == p, ref_cc == r
    to_ref, to_pred = metrics.surface_distances(pred, ref, spacing)
    hd95 = float(np.percentile(np.concatenate([to_pred, to_ref]), 95))
    return {"ref": r, "pred": p, "dice": metrics.dice(pred, ref), "hd95": hd95}


def brats2023(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Spacing,
    dilation_iters: int = 3,
    min_lesion_voxels: int = 50,
) -> dict:
    """BraTS 2023 lesion-wise Dice and HD95 (mm) for one region.

    pred_mask, ref_mask: (x, y, z) boolean masks; spacing: voxel size in mm along x, y, z.

    Follows the BraTS 2023 reference code (rachitsaluja/BraTS-2023-Metrics, BraTS-GLI settings):
    1. GT lesions are the 26-connected components of the reference. Components whose dilations
       touch are merged: the reference is dilated as a whole (`dilation_iters` iterations of the
       18-connected structuring element, scipy's generate_binary_structure(3, 2), exactly as the
       reference code) and each 26-connected component of the dilated mask defines one lesion =
       the reference voxels inside it. Predicted components are the 26-connected
       components of the prediction.
    2. Each lesion is dilated again the same way; the predicted components that intersect its
       dilation are its matches (a component may match several lesions).
    3. Per lesion: Dice and HD95 between the lesion and the union of its matches (HD95 as
       `metrics.hd95`); a lesion without matches (FN) scores Dice 0, HD95 374.
    4. Lesions with at most `min_lesion_voxels` voxels are dropped from the score, and the
       predicted components matching them are not counted as false positives.
    5. Each predicted component that matches no lesion (FP) adds a term Dice 0, HD95 374.
    6. score = sum of terms / (number of kept lesions + number of FP components); when that
       count is 0 (e.g. both masks empty) Dice is 1 and HD95 is 0.

    Simplifications against the reference code: the size threshold counts voxels (the reference
    compares the volume in mm^3 with 50, identical on BraTS's 1 mm isotropic grid; both drop
    lesions of exactly the threshold); per-lesion HD95 is tumorseg.metrics' MONAI-compatible `hd95`
    (surface voxels, plain percentiles) instead of DeepMind's surface-distance package
    (surfel areas, area-weighted percentiles), so HD95 values differ slightly on real shapes.

    Returns {"lesion_dice", "lesion_hd95", "n_lesions" (kept GT lesions), "n_tp" (kept lesions
    with a match), "n_fn", "n_fp", "lesions": [{"voxels", "matched", "dice", "hd95"} per kept
    lesion]}.
    """
    import cc3d

    pred, ref = metrics._as_masks(pred_mask, ref_mask)
    # 18-connected (faces and edges): the reference code's generate_binary_structure(3, 2).
    struct = ndimage.generate_binary_structure(3, 2)
    pred_cc = cc3d.connected_components(pred.astype(np.uint8), connectivity=26)
    lesions = _merged_lesions(ref, struct, dilation_iters)

    matched: set[int] = set()  # predicted components matching any lesion, dropped ones included
    scores = []
    for lesion_box, lesion in lesions:
        # The dilated lesion fits in the lesion's box grown by `dilation_iters` voxels.
        box = _grow(lesion_box, dilation_iters, ref.shape)
        local = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
        inner = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(lesion_box, box))
        local[inner] = lesion
        dilated = ndimage.binary_dilation(local, structure=struct, iterations=dilation_iters)
        ids = np.unique(pred_cc[box][dilated])
        ids = ids[ids != 0]
        matched.update(int(i) for i in ids)
        n_voxels = int(np.count_nonzero(lesion))
        if n_voxels <= min_lesion_voxels:
            continue
        if len(ids) == 0:
            scores.append(
                {"voxels": n_voxels, "matched": False, "dice": 0.0, "hd95": LESION_HD95_MISS}
            )
            continue
        gt = np.zeros(ref.shape, dtype=bool)
        gt[lesion_box] = lesion
        union = np.isin(pred_cc, ids)
        scores.append(
            {
                "voxels": n_voxels,
                "matched": True,
                "dice": metrics.dice(union, gt),
                "hd95": metrics._hd95_nonempty(union, gt, spacing),
            }
        )

    n_fp = int(pred_cc.max()) - len(matched)
    n_terms = len(scores) + n_fp
    if n_terms == 0:
        lesion_dice, lesion_hd95 = 1.0, 0.0
    else:
        lesion_dice = sum(s["dice"] for s in scores) / n_terms
        lesion_hd95 = (sum(s["hd95"] for s in scores) + n_fp * LESION_HD95_MISS) / n_terms
    n_tp = sum(1 for s in scores if s["matched"])
    return {
        "lesion_dice": float(lesion_dice),
        "lesion_hd95": float(lesion_hd95),
        "n_lesions": len(scores),
        "n_tp": n_tp,
        "n_fn": len(scores) - n_tp,
        "n_fp": n_fp,
        "lesions": scores,
    }


def _merged_lesions(
    ref: np.ndarray, struct: np.ndarray, iters: int
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """GT lesions as (box, boolean mask within box), merged where their dilations connect."""
    import cc3d

    if not ref.any():
        return []
    box = metrics._bbox(ref, margin=iters)  # the whole dilation fits (clipped at the image border)
    ref_box = ref[box]
    dilated = ndimage.binary_dilation(ref_box, structure=struct, iterations=iters)
    dilated_cc = cc3d.connected_components(dilated.astype(np.uint8), connectivity=26)
    lesion_ids = np.where(ref_box, dilated_cc, 0)
    out = []
    for idx, sl in enumerate(ndimage.find_objects(lesion_ids), start=1):
        if sl is None:
            continue
        lesion_box = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sl))
        out.append((lesion_box, lesion_ids[sl] == idx))
    return out


def _grow(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape)
    )
