"""Segmentation metrics on named tumour regions, with the BraTS rules for empty masks.

Every metric compares two boolean region masks of shape (x, y, z) through the voxel counts
tp = |P & T|, fp = |P & ~T|, fn = |~P & T|, tn = |~P & ~T| (P prediction, T reference):

    dice        = 2 tp / (2 tp + fp + fn)   1 if both masks are empty, 0 if exactly one is
    sensitivity = tp / (tp + fn)            1 if the reference is empty (nothing to miss),
                                            whatever the prediction
    specificity = tn / (tn + fp)            over the whole image; 1 if there are no negatives
    ppv         = tp / (tp + fp)            1 if both masks are empty, 0 if only the
                                            prediction is empty (it found nothing that exists)
    hd95        (mm, see `hd95`)            0 if both masks are empty, 373.13 if exactly one is

The Dice and HD95 rules are those of BraTS 2017-2022 (CaPTk): 373.13 mm is the diagonal of the
240 x 240 x 155 mm BraTS volume, sqrt(240^2 + 240^2 + 155^2). Lesion-wise scores are in
tumorseg.lesionwise.

HD95 agrees with MONAI's `compute_hausdorff_distance(..., percentile=95, spacing=...)` with
default settings: surface = mask XOR binary_erosion(mask) (6-connected, voxels outside the image
count as background, so a mask touching the image border has a surface there), distances are
exact Euclidean in mm (header spacing), the 95th percentile (linear interpolation) is taken of
each directed set of surface distances and HD95 is the larger of the two. (The organisers'
current package, brats-evaluation on panoptica, pools both sets before the percentile instead,
which gives a smaller or equal value: 1.9 / 2.8 / 4.7 mm smaller on average on 18 real BraTS
2018 predictions. tumorseg keeps the BraTS 2017-2022 / MONAI definition that published BraTS
results use; tumorseg.lesionwise's "panoptica" rules use the pooled one.)

Summary statistics (`summarize`) use the population standard deviation (ddof=0) and numpy's
default (linear) percentiles.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from tumorseg import io
from tumorseg.errors import TumorsegInputError
from tumorseg.labels import REGION_NAMES, Convention

METRIC_NAMES = ("dice", "hd95", "sensitivity", "specificity", "ppv")
LESION_METRIC_NAMES = ("lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp", "lesion_fn")
HD95_ONE_EMPTY = 373.13  # mm, BraTS 2017-2022
VOLUME_NAMES = ("pred_ml", "ref_ml")  # the region's volume in the prediction and the reference
CSV_COLUMNS = ("case_id", "region") + METRIC_NAMES

Spacing = Sequence[float]


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) voxel counts of two boolean masks of equal shape."""
    pred, ref = _as_masks(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap in [0, 1]; 1 if both masks are empty."""
    tp, fp, fn, _ = confusion(pred, ref)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall tp / (tp + fn); 1 if the reference is empty."""
    tp, _, fn, _ = confusion(pred, ref)
    return 1.0 if tp + fn == 0 else tp / (tp + fn)


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """tn / (tn + fp) over every voxel of the image; 1 if there are no negatives."""
    _, fp, _, tn = confusion(pred, ref)
    return 1.0 if tn + fp == 0 else tn / (tn + fp)


def ppv(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision tp / (tp + fp); for an empty prediction 1 if the reference is empty, else 0."""
    tp, fp, fn, _ = confusion(pred, ref)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two (x, y, z) masks.

    spacing: voxel size in mm along x, y, z (from the header). 0 if both masks are empty,
    373.13 if exactly one is (see the module docstring for the definition).
    """
    pred, ref = _as_masks(pred, ref)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return HD95_ONE_EMPTY
    return _hd95_nonempty(pred, ref, spacing)


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm) of two non-empty (x, y, z) boolean masks:
    (from each surface voxel of `pred` to the nearest of `ref`, from each of `ref` to `pred`).
    Surfaces as in the module docstring (mask XOR 6-connected erosion)."""
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    # Crop to the union's bounding box, then pad one background voxel on every side: erosion
    # then sees background beyond the image border exactly as MONAI (and scipy's default
    # border_value=0) do on the full image, and every surface voxel stays inside the box.
    box = _bbox(pred | ref)
    pred = np.pad(pred[box], 1)
    ref = np.pad(ref[box], 1)
    surf_pred = pred ^ ndimage.binary_erosion(pred)
    surf_ref = ref ^ ndimage.binary_erosion(ref)
    sampling = tuple(float(s) for s in spacing)
    d_pred_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=sampling)[surf_pred]
    d_ref_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)[surf_ref]
    return d_pred_to_ref, d_ref_to_pred


def _hd95_nonempty(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    d_pred_to_ref, d_ref_to_pred = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(d_pred_to_ref, 95), np.percentile(d_ref_to_pred, 95)))


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by `margin`, clipped to the image."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _as_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> dict[str, float]:
    """All of METRIC_NAMES for one pair of boolean masks."""
    return {
        "dice": dice(pred, ref),
        "hd95": hd95(pred, ref, spacing),
        "sensitivity": sensitivity(pred, ref),
        "specificity": specificity(pred, ref),
        "ppv": ppv(pred, ref),
    }


def label_volumes(labels: np.ndarray, convention: Convention, spacing: Spacing) -> dict:
    """Tumour volumes of a label map: {"whole_ml", "core_ml", "enhancing_ml"} in millilitres
    and {"voxels_<value>"} for every non-zero label value of `convention`.

    labels: (x, y, z) in `convention`'s file values; spacing: voxel size in mm (x, y, z).
    """
    ml_per_voxel = float(np.prod(spacing)) / 1000.0
    out: dict = {}
    for region in REGION_NAMES:
        n = int(np.count_nonzero(convention.region_mask(labels, region)))
        out[f"{region}_ml"] = round(n * ml_per_voxel, 6)
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=max(convention.values) + 1)
    for value in sorted(v for v in convention.values if v):
        out[f"voxels_{value}"] = int(counts[value])
    return out


def region_metrics(
    pred_labels: np.ndarray, ref_labels: np.ndarray, convention: Convention, spacing: Spacing
) -> dict[str, dict[str, float]]:
    """{region: {metric: value}} for whole / core / enhancing.

    pred_labels, ref_labels: (x, y, z) label maps in `convention`'s file values.
    spacing: voxel size in mm along x, y, z.
    """
    return {
        region: mask_metrics(
            convention.region_mask(pred_labels, region),
            convention.region_mask(ref_labels, region),
            spacing,
        )
        for region in REGION_NAMES
    }


# -- evaluation of cases on disk ---------------------------------------------------------------


AFFINE_TOLERANCE_MM = 1e-3  # headers written as float32 round-trip within this


class GridMismatch(TumorsegInputError):
    """A prediction whose shape or affine differs from its reference: scores would compare
    different voxels, so the case is not scored."""


def evaluate_cases(
    pairs: Iterable[tuple[str, str | Path | None, str | Path]],
    convention: Convention,
    lesionwise: str | None = None,
) -> list[dict]:
    """Metrics of every case and region, one row each.

    pairs: (case_id, prediction label file or None, reference label file); both files hold
    label maps in `convention`'s file values. A None prediction counts as all background and
    its rows carry missing=True. Spacing (mm) comes from the reference header.
    Returns rows {case_id, region, dice, hd95, sensitivity, specificity, ppv, pred_ml, ref_ml
    (region volumes in mL from the reference's voxel spacing), missing [, lesion_dice,
    lesion_hd95]}.
    """
    from tumorseg.lesionwise import RULES, lesion_scores  # it imports this module

    if lesionwise is not None and lesionwise not in RULES:
        raise ValueError(f"unknown lesion-wise rules {lesionwise!r}; choose one of {RULES}")
    rows = []
    for case_id, pred_path, ref_path in pairs:
        ref_vol = io.read_volume(ref_path)
        ref = ref_vol.data
        convention.encode(ref, where=str(ref_path))  # validates the label values
        if pred_path is None:
            pred = np.zeros(ref.shape, dtype=np.uint8)
        else:
            pred_vol = io.read_volume(pred_path)
            pred = pred_vol.data
            if pred.shape != ref.shape:
                raise GridMismatch(
                    pred_path,
                    f"prediction shape {pred.shape} != reference shape {ref.shape} of {ref_path}",
                )
            if not np.allclose(pred_vol.affine, ref_vol.affine, atol=AFFINE_TOLERANCE_MM):
                raise GridMismatch(pred_path, f"affine differs from the reference {ref_path}: "
                                              "the prediction is not on the reference's grid")
            convention.encode(pred, where=str(pred_path))
        spacing = ref_vol.spacing
        for region in REGION_NAMES:
            p = convention.region_mask(pred, region)
            r = convention.region_mask(ref, region)
            row: dict = {"case_id": str(case_id), "region": region}
            row.update(mask_metrics(p, r, spacing))
            ml = float(np.prod(spacing)) / 1000.0
            row["pred_ml"] = round(int(np.count_nonzero(p)) * ml, 6)
            row["ref_ml"] = round(int(np.count_nonzero(r)) * ml, 6)
            row["missing"] = pred_path is None
            if lesionwise:
                row["lesion_rules"] = lesionwise
                row.update(lesion_scores(p, r, spacing, lesionwise))
            rows.append(row)
    return rows


def summarize(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{region: {metric: {mean, std, median, p25, p75, n}}} over the rows of each region.

    std is the population standard deviation (ddof=0); percentiles interpolate linearly.
    Lesion-wise metrics are summarised when the rows carry them; NaN values (the "panoptica"
    rules' score of a region empty in both masks) are left out, as the organisers' parser
    does, and n counts the values kept.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        per_metric = values.setdefault(row["region"], {})
        for name in METRIC_NAMES + LESION_METRIC_NAMES:
            if name in row:
                per_metric.setdefault(name, []).append(float(row[name]))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for region, per_metric in values.items():
        summary[region] = {}
        for name, vals in per_metric.items():
            arr = np.asarray(vals, dtype=np.float64)
            arr = arr[~np.isnan(arr)]
            if arr.size == 0:
                summary[region][name] = dict.fromkeys(("mean", "std", "median", "p25", "p75"),
                                                      math.nan) | {"n": 0}
                continue
            p25, median, p75 = np.percentile(arr, [25, 50, 75])
            with np.errstate(invalid="ignore"):  # an inf HD95 (panoptica rules): std NaN
                std = float(arr.std(ddof=0))
            summary[region][name] = {
                "mean": float(arr.mean()),
                "std": std,
                "median": float(median),
                "p25": float(p25),
                "p75": float(p75),
                "n": int(arr.size),
            }
    return summary


def format_summary(summary: dict) -> str:
    """A fixed-width text table: one line per (region, metric)."""
    stat_names = ("mean", "std", "median", "p25", "p75")
    header = f"{'region':<10} {'metric':<12} " + " ".join(f"{k:>9}" for k in stat_names)
    header += f" {'n':>5}"
    lines = [header, "-" * len(header)]
    for region, per_metric in summary.items():
        for name, s in per_metric.items():
            stats = " ".join(f"{s[k]:>9.4f}" for k in stat_names)
            lines.append(f"{region:<10} {name:<12} {stats} {s['n']:>5d}")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | Path, leading: Sequence[str] = ()) -> Path:
    """Write rows as CSV (`leading` columns, then case_id,region,dice,hd95,sensitivity,
    specificity,ppv[,pred_ml,ref_ml][,lesion_rules,lesion_dice,lesion_hd95,lesion_tp,
    lesion_fp,lesion_fn]) atomically; volume and lesion columns appear when any row has them."""
    path = Path(path)
    columns = list(leading) + list(CSV_COLUMNS)
    if any("pred_ml" in row for row in rows):
        columns += list(VOLUME_NAMES)
    if any("lesion_dice" in row for row in rows):
        columns += ["lesion_rules"] + list(LESION_METRIC_NAMES)
    with io.atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c, "")) for c in columns])
    return path


def _csv_value(value: object) -> object:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else repr(float(value))  # repr round-trips exactly
    return value


def _json_safe(value: object) -> object:
    """NaN and infinities (an undefined mean, an infinite HD95) as None: strict JSON has no
    literal for them, and jq or a browser's JSON.parse reject Python's NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(summary: dict, path: str | Path) -> Path:
    """Write a summary (or any JSON-able dict) atomically, indented, as strict JSON: non-finite
    numbers become null."""
    path = Path(path)
    with io.atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path
