"""The synthetic phantom: deterministic, every tumour class present, plausible MR contrast."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.datasets import MODALITIES
from tumorseg.errors import TumorsegInputError
from tumorseg.phantom import make_phantom

CSF, GM, WM = 1, 2, 3  # indices into TISSUE_NAMES
NECROSIS, OEDEMA, NON_ENHANCING, ENHANCING = 1, 2, 3, 4


def _assert_same(a, b):
    assert a.case_id == b.case_id
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    np.testing.assert_array_equal(a.affine, b.affine)
    for m in MODALITIES:
        np.testing.assert_array_equal(a.images[m], b.images[m])


def test_same_seed_gives_identical_phantom():
    _assert_same(make_phantom((48, 56, 32), seed=3), make_phantom((48, 56, 32), seed=3))


def test_different_seeds_differ():
    a, b = make_phantom((48, 56, 32), seed=3), make_phantom((48, 56, 32), seed=4)
    assert not np.array_equal(a.label, b.label)
    assert not np.array_equal(a.images["t1"], b.images["t1"])


@pytest.mark.parametrize("seed", range(10))
def test_all_tumour_classes_present_at_default_shape(seed):
    counts = np.bincount(make_phantom(seed=seed).label.ravel(), minlength=5)
    assert len(counts) == 5
    assert counts[1:].min() >= 300, counts


def test_types_ranges_background_and_geometry(phantom):
    brain = phantom.tissue > 0
    assert phantom.label.dtype == np.uint8 and phantom.label.shape == (48, 56, 32)
    assert set(np.unique(phantom.label[~brain])) == {0}  # tumour only inside the brain
    for m in MODALITIES:
        img = phantom.images[m]
        assert img.dtype == np.float32 and img.shape == (48, 56, 32)
        assert np.all(img[~brain] == 0)
        assert np.all(img[brain] > 0)
        assert 500 < img.max() < 1500
    assert np.array_equal(np.diag(phantom.affine), [-1.0, -1.0, 1.0, 1.0])
    assert np.all(phantom.affine[:3, 3] != 0)


def test_spacing_sets_affine():
    ph = make_phantom((32, 32, 24), spacing=(0.5, 0.8, 2.0))
    assert ph.spacing == (0.5, 0.8, 2.0)
    assert np.array_equal(np.diag(ph.affine)[:3], [-0.5, -0.8, 2.0])


def test_contrast_follows_real_mr():
    ph = make_phantom(seed=0)
    healthy = ph.label == 0

    def mean(m, mask):
        return float(ph.images[m][mask].mean())

    wm, gm, csf = (healthy & (ph.tissue == t) for t in (WM, GM, CSF))
    lab = {k: ph.label == k for k in (NECROSIS, OEDEMA, NON_ENHANCING, ENHANCING)}
    assert mean("flair", lab[OEDEMA]) > mean("flair", wm) > mean("flair", csf)
    assert mean("t1c", lab[ENHANCING]) > 1.3 * mean("t1c", lab[NECROSIS])
    assert mean("t1c", lab[ENHANCING]) > mean("t1", lab[ENHANCING])  # contrast uptake
    assert mean("t1", lab[NECROSIS]) < mean("t1", wm)
    assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
    assert mean("t2", csf) > mean("t2", wm) and mean("t2", lab[OEDEMA]) > mean("t2", wm)
    assert mean("t2", gm) > mean("t2", wm)


def test_bias_field_varies_wm_intensity_smoothly():
    ph = make_phantom(seed=0)
    wm = (ph.label == 0) & (ph.tissue == WM)
    half = np.zeros_like(wm)
    half[: wm.shape[0] // 2] = True
    left, right = ph.images["t1"][wm & half].mean(), ph.images["t1"][wm & ~half].mean()
    assert abs(left - right) / (left + right) > 0.005  # a flat field would give ~0


def test_bad_shape_is_an_input_error():
    with pytest.raises(TumorsegInputError, match="phantom shape"):
        make_phantom((8, 8, 8))
