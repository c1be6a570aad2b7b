"""Regression guard for the released weights: one shared case per model must keep the
whole-tumour Dice recorded in docs/MODEL_CARD.md (minus a small tolerance). Both released models
trained on all 24 shared cases, the guard case among them, so it catches regressions only."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tumorseg.weights import RELEASED, WEIGHTS_DIR, read_index

CARD = Path(__file__).parents[1] / "docs" / "MODEL_CARD.md"
GUARD_CASE = "Brats18_2013_3_1"
TOLERANCE = 0.02


def _card_value(model: str) -> float:
    """The `regression guard` line of the model card: `guard <model> <case> whole <dice>`."""
    m = re.search(rf"guard {model} {GUARD_CASE} whole ([0-9.]+)", CARD.read_text())
    assert m, f"docs/MODEL_CARD.md records no regression-guard Dice for {model}"
    return float(m.group(1))


@pytest.mark.parametrize("name", RELEASED)
def test_released_file_matches_its_sha256(name):
    entry = read_index()[name]
    digest = hashlib.sha256((WEIGHTS_DIR / entry["file"]).read_bytes()).hexdigest()
    assert digest == entry["sha256"]


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", RELEASED)
def test_released_model_keeps_its_validation_dice(name, shared_data, tmp_path, capsys):
    from tumorseg.cli import main

    import nibabel as nib
    import numpy as np

    case_dir = shared_data / GUARD_CASE
    assert main(["segment", "-i", str(case_dir), "-o", str(tmp_path / "pred"), "--model", name,
                 "--no-progress"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(case_dir),
                 "-o", str(tmp_path / "m.csv")]) == 0
    rows = (tmp_path / "m.csv").read_text().splitlines()
    header = rows[0].split(",")
    (whole,) = [dict(zip(header, r.split(","))) for r in rows[1:] if ",whole," in r]
    # The Dice evaluate reported, recomputed from the two files: whole tumour = any label.
    pred = np.asarray(nib.load(tmp_path / "pred" / f"{GUARD_CASE}.nii.gz").dataobj) > 0
    ref = np.asarray(nib.load(case_dir / f"{GUARD_CASE}_seg.nii.gz").dataobj) > 0
    assert ref.any() and pred.shape == ref.shape
    dice = 2.0 * np.count_nonzero(pred & ref) / (np.count_nonzero(pred) + np.count_nonzero(ref))
    assert float(whole["dice"]) == pytest.approx(dice, abs=1e-12)
    assert dice >= _card_value(name) - TOLERANCE, (dice, _card_value(name))


def test_release_writes_float16_weights_with_a_checked_sha256(tmp_path):
    import torch

    from test_segment import write_tiny_model
    from tumorseg import weights

    src = write_tiny_model(tmp_path / "model.pt")
    wdir = tmp_path / "weights"
    wdir.mkdir()
    path = weights.release(src, "two_path", weights_dir=wdir)
    index = read_index(wdir)
    assert index["two_path"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    payload = torch.load(path, weights_only=False)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    assert "optimizer" not in payload and payload["preprocess"] and payload["convention"] == "brats2017"
    original = torch.load(src, weights_only=False)["state_dict"]
    for k, v in payload["state_dict"].items():
        assert torch.equal(v, original[k].half()), k
