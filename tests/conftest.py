"""Shared fixtures, and builders of bad datasets reused by API and CLI tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The engine's measured choices go to a plan file of this test session, not the user's cache.
os.environ.setdefault("TUMORSEG_ENGINE_PLAN",
                      str(Path(tempfile.mkdtemp(prefix="tumorseg-plan-")) / "plan.json"))

import nibabel as nib
import numpy as np
import pytest

from tumorseg.phantom import Phantom, make_phantom, write_phantom

SMALL_SHAPE = (48, 56, 32)


@pytest.fixture
def phantom() -> Phantom:
    """A small deterministic synthetic case, (48, 56, 32) voxels."""
    return make_phantom(SMALL_SHAPE, seed=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real BraTS 2018 cases (../shared/data/brats2018, or $TUMORSEG_SHARED_DATA).

    Skips when absent (a fresh clone has no ../shared); fails instead when
    TUMORSEG_REQUIRE_SHARED_DATA=1, as CI sets it.
    """
    env = os.environ.get("TUMORSEG_SHARED_DATA")
    default = Path(__file__).parents[1] / ".." / "shared" / "data" / "brats2018"
    path = (Path(env) if env else default).resolve()
    if not path.is_dir():
        if os.environ.get("TUMORSEG_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{path} not present but TUMORSEG_REQUIRE_SHARED_DATA=1")
        pytest.skip("../shared/data/brats2018 not present")
    return path


# --- bad inputs ------------------------------------------------------------------------------
# Each kind builds a root holding exactly one bad case ("bad_001", brats2017 layout; msd for the
# channel case). BAD_EXPECT: kind -> (name the error must mention, key word of the rule).
BAD_CASE = "bad_001"
BAD_EXPECT = {
    "missing_modality": (BAD_CASE, "missing modality t1c"),
    "duplicate_modality": (f"{BAD_CASE}_t1.nii.gz", "expected exactly one"),
    "shape_mismatch": (f"{BAD_CASE}_t2.nii.gz", "shape"),
    "affine_mismatch": (f"{BAD_CASE}_t2.nii.gz", "affine"),
    "image_2d": (f"{BAD_CASE}_flair.nii.gz", "2 dimensions"),
    "image_5d": (f"{BAD_CASE}_flair.nii.gz", "5 dimensions"),
    "msd_3_channels": (f"{BAD_CASE}.nii.gz", "expected 4 channels"),
    "nan": (f"{BAD_CASE}_t1ce.nii.gz", "NaN"),
    "inf": (f"{BAD_CASE}_t1ce.nii.gz", "Inf"),
    "all_zero": (f"{BAD_CASE}_t2.nii.gz", "all zero"),
    "constant_in_brain": (f"{BAD_CASE}_flair.nii.gz", "distinct non-zero values"),
    "binary_mask": (f"{BAD_CASE}_t2.nii.gz", "distinct non-zero values"),
    "truncated_gzip": (f"{BAD_CASE}_t1.nii.gz", "truncated"),
    "corrupt_gzip": (f"{BAD_CASE}_t1.nii.gz", "corrupt"),
    "label_out_of_range": (f"{BAD_CASE}_seg.nii.gz", "outside"),
    "label_non_integer": (f"{BAD_CASE}_seg.nii.gz", "non-integer"),
    "empty_folder": ("empty_folder", "no cases found"),
    "missing_folder": ("missing_folder", "does not exist"),
}
BAD_KINDS = list(BAD_EXPECT)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def make_bad_dataset(tmp_path: Path, kind: str) -> Path:
    """Build `tmp_path/<kind>`: a dataset root with exactly one bad case; return the root."""
    if kind not in BAD_EXPECT:
        raise ValueError(f"unknown bad-dataset kind {kind!r}; valid: {', '.join(BAD_KINDS)}")
    root = tmp_path / kind
    if kind == "missing_folder":
        return root
    root.mkdir(parents=True)
    if kind == "empty_folder":
        return root
    ph = make_phantom((32, 32, 24), seed=1, case_id=BAD_CASE)
    aff = ph.affine
    if kind == "msd_3_channels":
        write_phantom(ph, root, "msd")
        img = np.stack([np.round(ph.images[m]).astype(np.int16) for m in ("flair", "t1", "t2")], -1)
        _save(root / "imagesTr" / f"{BAD_CASE}.nii.gz", img, aff)
        return root
    case = write_phantom(ph, root, "brats2017")
    f = {m: case / f"{BAD_CASE}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")}
    t1 = np.round(ph.images["t1"]).astype(np.int16)
    if kind == "missing_modality":
        f["t1ce"].unlink()
    elif kind == "duplicate_modality":
        _save(case / f"{BAD_CASE}_t1.nii", t1, aff)  # same modality, uncompressed
    elif kind == "shape_mismatch":
        _save(f["t2"], t1[:, :, :-2], aff)
    elif kind == "affine_mismatch":
        shifted = aff.copy()
        shifted[:3, 3] += 2.0
        _save(f["t2"], t1, shifted)
    elif kind == "image_2d":
        _save(f["flair"], t1[:, :, 10], aff)
    elif kind == "image_5d":
        _save(f["flair"], np.stack([t1, t1], -1)[:, :, :, None, :], aff)  # (x, y, z, 1, 2)
    elif kind in ("nan", "inf"):
        bad = ph.images["t1c"].copy()
        bad[16, 16, 12] = np.nan if kind == "nan" else np.inf
        _save(f["t1ce"], bad, aff)
    elif kind == "all_zero":
        _save(f["t2"], np.zeros_like(t1), aff)
    elif kind == "constant_in_brain":
        _save(f["flair"], np.where(t1 != 0, 500, 0).astype(t1.dtype), aff)
    elif kind == "binary_mask":  # a brain mask saved where the T2 belongs
        _save(f["t2"], (t1 != 0).astype(np.uint8), aff)
    elif kind == "truncated_gzip":
        data = f["t1"].read_bytes()
        f["t1"].write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_gzip":
        f["t1"].write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "label_out_of_range":
        seg = np.asarray(nib.load(str(f["seg"])).dataobj).copy()
        seg[0, 0, 0] = 3  # BraTS 2017 has no label 3
        _save(f["seg"], seg, aff)
    elif kind == "label_non_integer":
        seg = np.asarray(nib.load(str(f["seg"])).dataobj).astype(np.float32)
        seg[0, 0, 0] = 1.5
        _save(f["seg"], seg, aff)
    return root

