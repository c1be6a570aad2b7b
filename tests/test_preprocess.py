"""Preprocessing: numerics against numpy, exact crop inversion, cache behaviour, N4."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tumorseg.datasets import find_cases, load_case
from tumorseg.phantom import make_phantom, write_phantom
from tumorseg.preprocess import (
    CropRecord, PreprocessSettings, bounding_box, brain_mask, cache_path, cached_preprocess,
    load_preprocessed, n4_correct, preprocess_arrays, preprocess_dataset)


def _reference_pipeline(image: np.ndarray):
    """Independent numpy version of mask -> clip(1, 99) -> z-score, uncropped."""
    mask = (image != 0).any(0)
    out = np.zeros(image.shape, np.float64)
    for c in range(4):
        v = image[c].astype(np.float64)
        lo, hi = np.percentile(v[mask], [1, 99])
        v = np.clip(v, lo, hi)
        out[c][mask] = (v[mask] - v[mask].mean()) / v[mask].std()
    return mask, out


def _check_against_numpy(image, label):
    pre = preprocess_arrays(image, label, PreprocessSettings(margin=5))
    mask, ref = _reference_pipeline(image)
    np.testing.assert_array_equal(pre.crop.uncrop(pre.mask), mask)
    np.testing.assert_allclose(pre.crop.uncrop(pre.image), ref, atol=2e-5)
    inside = pre.image[:, pre.mask].astype(np.float64)
    np.testing.assert_allclose(inside.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(inside.std(1), 1, atol=1e-5)
    np.testing.assert_array_equal(pre.crop.uncrop(pre.label), label)
    return pre


def test_matches_numpy_on_a_phantom():
    ph = make_phantom((48, 56, 32), seed=2)
    image = np.stack([ph.images[m] for m in ("t1", "t1c", "t2", "flair")])
    pre = _check_against_numpy(image, ph.label)
    # the crop keeps the margin: the brain box plus 5 voxels (clipped at the volume border)
    box = bounding_box(brain_mask(image), 0)
    assert all(s == max(b - 5, 0) for s, b in zip(pre.crop.start, box.start))


@pytest.mark.realdata
@pytest.mark.slow
def test_matches_numpy_on_a_real_case(shared_data):
    case = find_cases(shared_data / "Brats18_TCIA10_639_1")[0]  # an LGG that saturates at 32767
    loaded = load_case(case)
    _check_against_numpy(loaded.image, loaded.label)


def test_crop_then_uncrop_is_identity():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, 20, 30, 25)).astype(np.float32)
    mask = np.zeros((20, 30, 25), bool)
    mask[3:9, 10:29, 0:4] = True
    rec = bounding_box(mask, margin=2)
    assert rec == CropRecord((20, 30, 25), (1, 8, 0), (11, 30, 6))
    cropped = rec.crop(vol)
    assert cropped.shape == (2, 10, 22, 6)
    restored = rec.uncrop(cropped)
    np.testing.assert_array_equal(rec.crop(restored), cropped)
    outside = np.ones(vol.shape, bool)
    outside[(Ellipsis, *rec.slices)] = False
    assert not restored[outside].any()
    # identity on anything that is zero outside the box
    np.testing.assert_array_equal(rec.uncrop(rec.crop(restored)), restored)


def test_cache_hit_miss_and_rebuild(tmp_path):
    write_phantom(make_phantom((32, 40, 24), seed=0, case_id="c0"), tmp_path / "data", "brats2017")
    (case,) = find_cases(tmp_path / "data")
    cache = tmp_path / "cache"
    path, rebuilt = cached_preprocess(case, PreprocessSettings(), cache)
    assert rebuilt and path == cache_path(cache, "c0")
    first = load_preprocessed(path)
    assert not cached_preprocess(case, PreprocessSettings(), cache)[1]  # hit
    assert cached_preprocess(case, PreprocessSettings(margin=3), cache)[1]  # settings changed
    assert not cached_preprocess(case, PreprocessSettings(margin=3), cache)[1]
    # a source file that changes (new mtime) invalidates the entry
    t1 = case.images["t1"]
    os.utime(t1, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cached_preprocess(case, PreprocessSettings(margin=3), cache)[1]
    # a truncated cache entry is rebuilt, never trusted
    path.write_bytes(path.read_bytes()[:100])
    assert cached_preprocess(case, PreprocessSettings(margin=3), cache)[1]
    again = load_preprocessed(path)
    assert again.settings == PreprocessSettings(margin=3)
    assert not any(p.name.startswith(".") for p in cache.iterdir()), "temporary files left behind"
    assert first.image.dtype == np.float32 and first.label.dtype == np.uint8


def test_preprocess_dataset_reports_a_bad_case_and_continues(tmp_path):
    root = tmp_path / "data"
    for s in range(2):
        write_phantom(make_phantom((32, 40, 24), seed=s, case_id=f"c{s}"), root, "brats2017")
    cases = find_cases(root)
    (root / "c1" / "c1_t2.nii.gz").write_bytes(b"not a volume")
    done, failed = preprocess_dataset(cases, PreprocessSettings(), tmp_path / "cache", progress=False)
    assert [p.name for p in done] == ["c0.npz"]
    assert failed[0][0] == "c1" and "c1_t2.nii.gz" in failed[0][1]


def test_n4_reduces_a_multiplicative_bias_field():
    """A uniform tissue under a smooth bias field: N4 must shrink its coefficient of variation."""
    shape = (48, 48, 32)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = x**2 + y**2 + (z * 1.2) ** 2 < 0.8
    rng = np.random.default_rng(0)
    tissue = 500.0 + rng.normal(0, 5, shape)
    bias = np.exp(0.25 * x + 0.15 * y - 0.1 * z)
    vol = np.where(mask, tissue * bias, 0).astype(np.float32)
    corrected = n4_correct(vol, mask, shrink=2)

    def cv(v):
        return v[mask].std() / v[mask].mean()

    assert cv(vol) > 0.1
    assert cv(corrected) < 0.5 * cv(vol), (cv(vol), cv(corrected))


def test_settings_round_trip_and_reject_unknown_keys():
    s = PreprocessSettings(n4=True, margin=3)
    assert PreprocessSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown preprocessing setting"):
        PreprocessSettings.from_dict({"nfour": True})
