"""Metrics: hand-computed values, MONAI as the reference implementation, BraTS empty rules."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tumorseg import io
from tumorseg.errors import TumorsegInputError
from tumorseg.labels import CONVENTIONS
from tumorseg.lesionwise import LESION_HD95_MISS
from tumorseg.lesionwise import brats2023 as lesionwise
from tumorseg.metrics import (
    HD95_ONE_EMPTY,
    METRIC_NAMES,
    dice,
    evaluate_cases,
    format_summary,
    hd95,
    ppv,
    region_metrics,
    sensitivity,
    specificity,
    summarize,
    write_csv,
    write_json,
)

BRATS2017 = CONVENTIONS["brats2017"]


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    import torch

    from monai import metrics  # a test dependency (pyproject [test]): absent is a failure

    def t(a):
        return torch.as_tensor(a[None, None], dtype=torch.float32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        out = metrics.compute_hausdorff_distance(
            t(pred), t(ref), include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(out[0, 0])


def monai_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    import torch

    from monai import metrics  # a test dependency (pyproject [test]): absent is a failure

    def t(a):
        return torch.as_tensor(a[None, None], dtype=torch.float32)

    return float(metrics.compute_dice(t(pred), t(ref), include_background=True)[0, 0])


def blob(shape, seed: int, sigma: float = 2.0, level: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def assert_close(ours: float, ref: float, tol: float, what: str) -> None:
    diff = ours - ref
    assert abs(diff) <= tol, f"{what}: ours {ours!r} vs reference {ref!r}, diff {diff!r}"


# -- overlap metrics by hand ---------------------------------------------------------------


def test_overlap_metrics_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], bool).reshape(10, 1, 1)
    ref = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], bool).reshape(10, 1, 1)
    # tp=2, fp=2, fn=1, tn=5
    assert dice(pred, ref) == pytest.approx(4 / 7, abs=1e-12)
    assert sensitivity(pred, ref) == pytest.approx(2 / 3, abs=1e-12)
    assert specificity(pred, ref) == pytest.approx(5 / 7, abs=1e-12)
    assert ppv(pred, ref) == pytest.approx(2 / 4, abs=1e-12)


@pytest.mark.parametrize(
    "pred_any, ref_any, expected",
    [
        (False, False, {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "ppv": 1.0}),
        (True, False, {"dice": 0.0, "hd95": HD95_ONE_EMPTY, "sensitivity": 1.0, "ppv": 0.0}),
        (False, True, {"dice": 0.0, "hd95": HD95_ONE_EMPTY, "sensitivity": 0.0, "ppv": 0.0}),
    ],
)
def test_empty_rules(pred_any, ref_any, expected):
    pred = np.zeros((5, 5, 5), bool)
    ref = np.zeros((5, 5, 5), bool)
    pred[1, 1, 1] = pred_any
    ref[3, 3, 3] = ref_any
    got = {
        "dice": dice(pred, ref),
        "hd95": hd95(pred, ref, (1.0, 1.0, 1.0)),
        "sensitivity": sensitivity(pred, ref),
        "ppv": ppv(pred, ref),
    }
    assert got == expected


def test_hd95_penalty_is_the_brats_volume_diagonal():
    """373.13 mm (BraTS 2017-2022, CaPTk): the diagonal of the 240 x 240 x 155 mm volume, i.e.
    the HD95 of two voxels at opposite corners of it, computed by the non-empty path."""
    a = np.zeros((2, 2, 2), bool)
    b = np.zeros((2, 2, 2), bool)
    a[0, 0, 0] = b[1, 1, 1] = True
    corners = hd95(a, b, (240.0, 240.0, 155.0))
    assert_close(corners, math.sqrt(240**2 + 240**2 + 155**2), 1e-9, "corner to corner")
    assert round(corners, 2) == HD95_ONE_EMPTY


def test_specificity_without_negatives_is_one():
    full = np.ones((3, 3, 3), bool)
    assert specificity(full, full) == 1.0
    assert specificity(np.zeros_like(full), full) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


# -- HD95 ----------------------------------------------------------------------------------


def test_hd95_single_voxels_hand_computed():
    pred = np.zeros((6, 5, 4), bool)
    ref = np.zeros((6, 5, 4), bool)
    pred[0, 0, 0] = True
    ref[3, 0, 2] = True
    spacing = (0.8, 1.0, 2.5)
    expected = math.hypot(3 * 0.8, 2 * 2.5)
    assert_close(hd95(pred, ref, spacing), expected, 1e-9, "hd95")
    assert_close(monai_hd95(pred, ref, spacing), expected, 1e-3, "monai")


def test_hd95_shifted_cubes_hand_computed():
    # 4^3 cubes shifted by one voxel along z: every surface distance is 0 or one z step.
    pred = np.zeros((10, 10, 10), bool)
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    pred[2:6, 2:6, 3:7] = True
    assert hd95(pred, ref, (1.0, 1.0, 2.0)) == pytest.approx(2.0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.0, 2.5)])
def test_against_monai_random_blobs(seed, spacing):
    shape = (24, 20, 14)
    pred = blob(shape, seed)
    ref = blob(shape, seed + 100)
    assert pred.any() and ref.any() and (pred & ref).any()
    assert_close(dice(pred, ref), monai_dice(pred, ref), 1e-6, "dice")
    assert_close(hd95(pred, ref, spacing), monai_hd95(pred, ref, spacing), 1e-3, "hd95")


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.0, 2.5)])
def test_against_monai_masks_touching_the_border(spacing):
    # Voxels on the image border are surface voxels (outside counts as background); cropping
    # must keep that, including a mask filling the whole image.
    shape = (12, 10, 8)
    ref = np.zeros(shape, bool)
    ref[0:6, :, 2:8] = True
    pred = np.zeros(shape, bool)
    pred[0:4, 1:10, 0:6] = True
    assert_close(hd95(pred, ref, spacing), monai_hd95(pred, ref, spacing), 1e-3, "border")
    full = np.ones(shape, bool)
    inner = np.zeros(shape, bool)
    inner[2:9, 1:8, 3:6] = True
    assert_close(hd95(full, inner, spacing), monai_hd95(full, inner, spacing), 1e-3, "full")
    assert hd95(full, full, spacing) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.0, 2.5)])
def test_against_monai_single_voxel_vs_blob(spacing):
    ref = blob((16, 16, 12), 7)
    pred = np.zeros_like(ref)
    pred[15, 0, 11] = True  # a corner voxel
    assert_close(dice(pred, ref), monai_dice(pred, ref), 1e-6, "dice")
    assert_close(hd95(pred, ref, spacing), monai_hd95(pred, ref, spacing), 1e-3, "hd95")


# -- regions and files ---------------------------------------------------------------------


def test_region_metrics_brats2017():
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros((4, 4, 4), np.uint8)
    ref[0, 0, :4] = [1, 2, 4, 4]  # whole 4, core 3, enhancing 2
    pred[0, 0, :4] = [2, 2, 4, 0]  # whole 3, core 1, enhancing 1
    out = region_metrics(pred, ref, BRATS2017, (1.0, 1.0, 1.0))
    assert list(out) == ["whole", "core", "enhancing"]
    assert all(list(m) == list(METRIC_NAMES) for m in out.values())
    assert out["whole"]["dice"] == pytest.approx(2 * 3 / 7)
    assert out["core"]["dice"] == pytest.approx(2 * 1 / 4)
    assert out["enhancing"]["dice"] == pytest.approx(2 * 1 / 3)
    assert out["core"]["sensitivity"] == pytest.approx(1 / 3)
    assert out["whole"]["ppv"] == 1.0
    assert out["whole"]["specificity"] == 1.0


def _save(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag(list(zooms) + [1.0])), str(path))
    return path


def test_evaluate_cases_files(tmp_path):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1, 1, 1] = 4
    ref[1, 1, 3] = 1
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = 4
    pred[1, 1, 5] = 1
    ref_path = _save(tmp_path / "ref.nii.gz", ref, (1.0, 1.0, 2.0))
    pred_path = _save(tmp_path / "pred.nii.gz", pred, (1.0, 1.0, 2.0))
    rows = evaluate_cases([("a", pred_path, ref_path), ("b", None, ref_path)], BRATS2017)
    assert [(r["case_id"], r["region"], r["missing"]) for r in rows] == [
        ("a", "whole", False),
        ("a", "core", False),
        ("a", "enhancing", False),
        ("b", "whole", True),
        ("b", "core", True),
        ("b", "enhancing", True),
    ]
    # whole: surfaces {z=1, z=3} vs {z=1, z=5}: directed 95th percentiles 2*2 mm and ~2*1.9 mm
    assert rows[0]["dice"] == pytest.approx(0.5)
    assert rows[0]["hd95"] == pytest.approx(monai_hd95(pred > 0, ref > 0, (1, 1, 2)), abs=1e-3)
    assert rows[2]["dice"] == 1.0 and rows[2]["hd95"] == 0.0
    assert rows[3]["dice"] == 0.0 and rows[3]["hd95"] == HD95_ONE_EMPTY
    assert rows[3]["sensitivity"] == 0.0 and rows[3]["ppv"] == 0.0


def test_a_prediction_off_the_reference_grid_is_refused(tmp_path, capsys):
    """Another spacing or origin means other voxels: refused, one line naming both files."""
    from tumorseg.cli import main
    from tumorseg.metrics import GridMismatch

    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:5, 2:5, 2:5] = 2
    ref_path = _save(tmp_path / "ref.nii.gz", ref, (1.0, 1.0, 2.0))
    for zooms in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.01)):
        pred_path = _save(tmp_path / "pred.nii.gz", ref, zooms)
        with pytest.raises(GridMismatch, match="affine differs from the reference"):
            evaluate_cases([("a", pred_path, ref_path)], BRATS2017)
    (tmp_path / "ref_case" / "c1").mkdir(parents=True)
    _save(tmp_path / "ref_case" / "c1" / "c1_seg.nii.gz", ref, (1.0, 1.0, 2.0))
    for m in ("flair", "t1", "t1ce", "t2"):
        _save(tmp_path / "ref_case" / "c1" / f"c1_{m}.nii.gz",
              np.random.default_rng(0).integers(1, 100, (8, 8, 8)).astype(np.int16), (1.0, 1.0, 2.0))
    (tmp_path / "pred").mkdir()
    _save(tmp_path / "pred" / "c1.nii.gz", ref, (1.0, 1.0, 1.0))
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref_case")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "c1.nii.gz" in err[0] and "c1_seg.nii.gz" in err[0] and "affine" in err[0]


def test_evaluate_cases_lesionwise_columns(tmp_path):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:6, 1:6, 1:6] = 2  # 125 voxels of oedema: one lesion above the 50-voxel threshold
    ref_path = _save(tmp_path / "ref.nii.gz", ref)
    rows = evaluate_cases([("a", ref_path, ref_path)], BRATS2017, lesionwise="brats2023")
    assert rows[0]["lesion_dice"] == 1.0 and rows[0]["lesion_hd95"] == 0.0
    assert rows[1]["lesion_dice"] == 1.0 and rows[1]["lesion_hd95"] == 0.0  # both empty


def test_evaluate_cases_rejects_bad_inputs(tmp_path):
    ref_path = _save(tmp_path / "ref.nii.gz", np.zeros((4, 4, 4), np.uint8))
    small = _save(tmp_path / "small.nii.gz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TumorsegInputError, match=r"small\.nii\.gz.*shape"):
        evaluate_cases([("a", small, ref_path)], BRATS2017)
    bad = np.zeros((4, 4, 4), np.uint8)
    bad[0, 0, 0] = 3  # no label 3 in BraTS 2017
    bad_path = _save(tmp_path / "bad.nii.gz", bad)
    with pytest.raises(TumorsegInputError, match=r"bad\.nii\.gz.*\[3\]"):
        evaluate_cases([("a", bad_path, ref_path)], BRATS2017)
    with pytest.raises(TumorsegInputError, match=r"bad\.nii\.gz.*\[3\]"):
        evaluate_cases([("a", None, bad_path)], BRATS2017)


# -- lesion-wise ---------------------------------------------------------------------------


def test_lesionwise_hand_computed():
    shape = (30, 30, 30)
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    ref[2:6, 2:6, 2:6] = True  # lesion A, 64 voxels, matched
    pred[2:6, 2:6, 3:7] = True  # A shifted by one voxel: Dice 96/128, HD95 1 mm
    ref[20:24, 20:24, 20:24] = True  # lesion B, 64 voxels, missed: Dice 0, HD95 374
    ref[2:4, 20:22, 20:22] = True  # 8 voxels: dropped (<= 50)
    pred[2:4, 20:22, 22:24] = True  # overlaps only the dropped lesion's dilation: ignored
    pred[12:15, 25:28, 2:5] = True  # false positive: Dice 0, HD95 374
    out = lesionwise(pred, ref, (1.0, 1.0, 1.0))
    assert (out["n_lesions"], out["n_tp"], out["n_fn"], out["n_fp"]) == (2, 1, 1, 1)
    assert out["lesion_dice"] == pytest.approx((0.75 + 0 + 0) / 3, abs=1e-12)
    assert out["lesion_hd95"] == pytest.approx((1.0 + 374 + 374) / 3, abs=1e-9)
    assert [(les["voxels"], les["matched"]) for les in out["lesions"]] == [(64, True), (64, False)]


def test_lesionwise_merges_lesions_whose_dilations_touch():
    ref = np.zeros((30, 20, 20), bool)
    ref[2:8, 2:8, 2:8] = True
    ref[12:18, 2:8, 2:8] = True  # gap of 4 voxels < 2 * 3 dilation steps: one lesion
    ref[25:29, 12:16, 12:16] = True  # 64 voxels, 7 voxels from the rest: separate
    out = lesionwise(ref, ref, (1.0, 1.0, 1.0))
    assert [les["voxels"] for les in out["lesions"]] == [432, 64]
    assert (out["lesion_dice"], out["lesion_hd95"]) == (1.0, 0.0)


def test_lesionwise_empty_rules():
    empty = np.zeros((10, 10, 10), bool)
    some = empty.copy()
    some[2:8, 2:8, 2:8] = True
    small = empty.copy()
    small[1:3, 1:3, 1:3] = True
    assert lesionwise(empty, empty, (1, 1, 1))[("lesion_dice")] == 1.0
    assert lesionwise(empty, empty, (1, 1, 1))["lesion_hd95"] == 0.0
    only_fp = lesionwise(some, empty, (1, 1, 1))
    assert (only_fp["lesion_dice"], only_fp["lesion_hd95"], only_fp["n_fp"]) == (0.0, 374.0, 1)
    missed = lesionwise(empty, some, (1, 1, 1))
    assert (missed["lesion_dice"], missed["lesion_hd95"], missed["n_fn"]) == (0.0, 374.0, 1)
    # Only a dropped (small) GT lesion and no prediction: nothing to score.
    assert lesionwise(empty, small, (1, 1, 1))["lesion_dice"] == 1.0


def naive_lesionwise(pred, ref, spacing, iters=3, thresh=50):
    """Full-volume transcription of the BraTS 2023 reference loop (no cropping)."""
    import cc3d

    struct = ndimage.generate_binary_structure(3, 2)  # as the reference code
    gt_cc = cc3d.connected_components(ref.astype(np.uint8), connectivity=26)
    pred_cc = cc3d.connected_components(pred.astype(np.uint8), connectivity=26)
    dil_cc = cc3d.connected_components(
        ndimage.binary_dilation(ref, struct, iterations=iters).astype(np.uint8), connectivity=26
    )
    lesions = np.where(gt_cc > 0, dil_cc, 0)
    tp, terms = set(), []
    for comp in range(1, lesions.max() + 1):
        gt = lesions == comp
        if not gt.any():
            continue
        ids = set(np.unique(pred_cc[ndimage.binary_dilation(gt, struct, iterations=iters)])) - {0}
        tp |= ids
        if gt.sum() <= thresh:
            continue
        union = np.isin(pred_cc, list(ids))
        terms.append((dice(union, gt), hd95(union, gt, spacing) if ids else LESION_HD95_MISS))
    n_fp = len(set(np.unique(pred_cc)) - tp - {0})
    if not terms and not n_fp:
        return 1.0, 0.0
    n = len(terms) + n_fp
    return sum(d for d, _ in terms) / n, (sum(h for _, h in terms) + 374 * n_fp) / n


def balls(shape, seed: int, n: int) -> np.ndarray:
    """Union of n random ellipsoids (radius 1-4.5 voxels)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        centre, radius = rng.uniform(0, shape), rng.uniform(1.0, 4.5)
        mask |= (((grid - centre) / (1.0, 1.0, 0.8)) ** 2).sum(-1) <= radius**2
    return mask


@pytest.mark.parametrize("seed", [0, 3, 6])  # seeds whose cases have TP, FN and FP lesions
def test_lesionwise_against_naive_full_volume(seed):
    shape = (40, 36, 30)
    ref = balls(shape, seed, 10)
    pred = np.roll(ref, 1, axis=0)
    pred[:12] = False  # misses the lesions there
    pred |= balls(shape, seed + 50, 4)  # false positives (some may touch lesions)
    out = lesionwise(pred, ref, (1.0, 1.0, 1.5))
    expected_dice, expected_hd95 = naive_lesionwise(pred, ref, (1.0, 1.0, 1.5))
    assert out["n_tp"] > 0 and out["n_fn"] > 0 and out["n_fp"] > 0
    assert out["lesion_dice"] == pytest.approx(expected_dice, abs=1e-12)
    assert out["lesion_hd95"] == pytest.approx(expected_hd95, abs=1e-9)


# -- summaries and output files ------------------------------------------------------------


def _rows():
    rows = []
    for i, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        for region in ("whole", "core"):
            row = {"case_id": f"c{i}", "region": region, "missing": False}
            row.update({m: value * (2 if region == "core" else 1) for m in METRIC_NAMES})
            rows.append(row)
    return rows


def test_summarize_hand_computed():
    summary = summarize(_rows())
    assert list(summary) == ["whole", "core"]
    assert list(summary["whole"]) == list(METRIC_NAMES)
    whole = summary["whole"]["dice"]
    assert whole["n"] == 4
    assert whole["mean"] == pytest.approx(2.5)
    assert whole["std"] == pytest.approx(math.sqrt(1.25))  # population std, ddof=0
    assert whole["median"] == pytest.approx(2.5)
    assert (whole["p25"], whole["p75"]) == (pytest.approx(1.75), pytest.approx(3.25))
    assert summary["core"]["hd95"]["mean"] == pytest.approx(5.0)
    text = format_summary(summary)
    lines = text.splitlines()
    assert len(lines) == 2 + 2 * len(METRIC_NAMES)
    assert len({len(line) for line in lines}) == 1  # fixed width
    expected = ["whole", "dice", "2.5000", "1.1180", "2.5000", "1.7500", "3.2500", "4"]
    assert lines[2].split() == expected


def test_write_csv_and_json(tmp_path):
    rows = _rows()
    path = write_csv(rows, tmp_path / "out" / "metrics.csv")
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["case_id", "region", "dice", "hd95", "sensitivity", "specificity", "ppv"]
    assert table[1] == ["c0", "whole", "1.0", "1.0", "1.0", "1.0", "1.0"]
    assert len(table) == 1 + len(rows)
    for row in rows:
        row.update(lesion_rules="panoptica", lesion_dice=0.1, lesion_hd95=2.0 / 3.0,
                   lesion_tp=1, lesion_fp=0, lesion_fn=2)
    summary = summarize(rows)
    assert json.loads(write_json(summary, tmp_path / "s.json").read_text()) == summary
    # strict JSON: NaN and infinities become null (a strict parser rejects Python's NaN)
    odd = {"mean": math.nan, "hd95": [1.5, math.inf, -math.inf], "n": np.int64(3)}
    text = write_json(odd, tmp_path / "odd.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c} in JSON"))
    assert strict == {"mean": None, "hd95": [1.5, None, None], "n": 3}
    rows[-1]["lesion_dice"], rows[-1]["lesion_hd95"] = math.nan, math.inf
    with open(write_csv(rows, path), newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][-6:] == ["lesion_rules", "lesion_dice", "lesion_hd95", "lesion_tp",
                             "lesion_fp", "lesion_fn"]
    assert table[1][-6:] == ["panoptica", "0.1", repr(2.0 / 3.0), "1", "0", "2"]
    assert float(table[1][-4]) == 2.0 / 3.0  # exact round trip
    assert table[-1][-5:-3] == ["nan", "inf"]
    # NaN (both masks empty under the panoptica rules) is left out of the summary.
    region = rows[-1]["region"]
    n_region = sum(r["region"] == region for r in rows)
    assert summarize(rows)[region]["lesion_dice"]["n"] == n_region - 1
    assert summarize(rows)[region]["lesion_hd95"]["mean"] == math.inf  # as the package's
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]  # no temp files


# -- real data -----------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("case", ["Brats18_2013_3_1", "Brats18_CBICA_ALU_1"])
def test_real_cases_against_monai(shared_data, tmp_path, case):
    ref_path = shared_data / case / f"{case}_seg.nii.gz"
    ref_vol = io.read_volume(ref_path)
    ref = ref_vol.data.astype(np.uint8)
    # A plausible imperfect prediction: eroded whole tumour, core shifted 3 voxels along x,
    # enhancing dilated by one voxel, and a distant false-positive cube.
    whole = ndimage.binary_erosion(ref > 0, iterations=2)
    core = np.roll(np.isin(ref, (1, 4)), 3, axis=0) & whole
    enhancing = ndimage.binary_dilation(ref == 4) & core
    pred = np.where(whole, 2, 0)
    pred[core] = 1
    pred[enhancing] = 4
    pred[20:26, 20:26, 20:26] = 4
    pred_path = io.write_volume(tmp_path / "pred.nii.gz", pred.astype(np.uint8), ref_vol)

    rows = evaluate_cases([(case, pred_path, ref_path)], BRATS2017, lesionwise="brats2023")
    for row in rows:
        p = BRATS2017.region_mask(pred, row["region"])
        r = BRATS2017.region_mask(ref, row["region"])
        what = f"{case} {row['region']}"
        assert_close(row["dice"], monai_dice(p, r), 1e-6, f"{what} dice")
        assert_close(row["hd95"], monai_hd95(p, r, ref_vol.spacing), 1e-3, f"{what} hd95")
        assert 0 < row["dice"] < 1 and row["hd95"] > 0
        lesion_dice, lesion_hd95 = naive_lesionwise(p, r, ref_vol.spacing)
        assert_close(row["lesion_dice"], lesion_dice, 1e-12, f"{what} lesion dice")
        assert_close(row["lesion_hd95"], lesion_hd95, 1e-9, f"{what} lesion hd95")
