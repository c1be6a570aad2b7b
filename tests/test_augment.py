"""Training augmentation (tumorseg.augment): flips keep inputs and targets aligned, intensity
changes touch brain pixels only, and the draws are reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.augment import AugmentConfig, augment

RF, T = 5, 4  # a toy receptive field: the input window is T + RF - 1 = 8 pixels wide


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 4, T + RF - 1, T + RF - 1)).astype(np.float32)
    images[:, :, :2, :] = 0  # outside the brain
    labels = rng.integers(0, 5, (n, T, T))
    weights = rng.random((n, T, T)).astype(np.float32)
    return images, labels, weights


def test_mirror_flips_window_and_targets_together():
    images, labels, weights = _batch()
    before = [a.copy() for a in (images, labels, weights)]
    out = augment(images, labels, weights, np.random.default_rng(3), AugmentConfig(mirror=True))
    flips = np.random.default_rng(3).random((len(images), 2)) < 0.5  # the same first draw
    assert flips.any() and not flips.all()
    for i in range(len(images)):
        axes = [a for a in (0, 1) if flips[i, a]]
        img, lab, w = before[0][i], before[1][i], before[2][i]
        for a in axes:
            img, lab, w = np.flip(img, a + 1), np.flip(lab, a), np.flip(w, a)
        np.testing.assert_array_equal(out[0][i], img)
        np.testing.assert_array_equal(out[1][i], lab)
        np.testing.assert_array_equal(out[2][i], w)
    assert np.isclose(out[2].sum(), before[2].sum())


def test_intensity_changes_brain_pixels_only_within_bounds():
    images, labels, weights = _batch()
    original = images.copy()
    cfg = AugmentConfig(scale=0.2, shift=0.3)
    out, lab, _ = augment(images, labels.copy(), weights, np.random.default_rng(1), cfg)
    np.testing.assert_array_equal(lab, labels)  # no flips without mirror
    assert np.all(out[:, :, :2, :] == 0)  # zero padding / outside the brain stays zero
    rng = np.random.default_rng(1)
    rng.random((len(images), 2))
    scales = rng.uniform(0.8, 1.2, (len(images), 4)).astype(np.float32)
    shifts = rng.uniform(-0.3, 0.3, (len(images), 4)).astype(np.float32)
    expected = original * scales[:, :, None, None] + shifts[:, :, None, None]
    np.testing.assert_allclose(out[:, :, 2:, :], expected[:, :, 2:, :], rtol=1e-6, atol=1e-6)
    assert np.all((scales >= 0.8) & (scales <= 1.2)) and np.abs(shifts).max() <= 0.3


def test_knee_compresses_values_above_one_then_scales():
    images, labels, weights = _batch()
    images *= 2  # values well above the knee
    original = images.copy()
    cfg = AugmentConfig(scale=0.2, shift=0.3, knee=0.6)
    out, _, _ = augment(images, labels, weights, np.random.default_rng(4), cfg)
    rng = np.random.default_rng(4)
    rng.random((len(images), 2))
    scales = rng.uniform(0.8, 1.2, (len(images), 4)).astype(np.float32)
    shifts = rng.uniform(-0.3, 0.3, (len(images), 4)).astype(np.float32)
    slopes = rng.uniform(0.4, 1.0, (len(images), 4)).astype(np.float32)
    assert slopes.min() < 0.6  # some strong compressions in this draw
    assert out[:, :, :2, :].max() == 0 and out[:, :, :2, :].min() == 0
    for i in range(len(images)):
        for ch in range(4):
            v = original[i, ch, 2:, :].astype(np.float64)
            kneed = np.array([x if x <= 1 else 1 + (x - 1) * slopes[i, ch] for x in v.ravel()])
            expected = kneed.reshape(v.shape) * scales[i, ch] + shifts[i, ch]
            np.testing.assert_allclose(out[i, ch, 2:, :], expected, rtol=1e-5, atol=1e-5)
            order = np.argsort(v, axis=None, kind="stable")  # monotone: the order is kept
            assert np.all(np.diff(out[i, ch, 2:, :].ravel()[order]) >= -1e-6)


def test_knee_draws_come_last_so_older_recipes_keep_their_batches():
    """Flips, scales and shifts are the generator's first draws with or without knee, so a
    recipe without knee trains on the batches it trained on before knee existed."""
    plain = augment(*_batch(), np.random.default_rng(9), AugmentConfig(mirror=True, scale=0.1))
    with_knee = augment(*_batch(), np.random.default_rng(9), AugmentConfig(mirror=True, scale=0.1,
                                                                            knee=0.5))
    np.testing.assert_array_equal(with_knee[1], plain[1])  # the same flips
    np.testing.assert_array_equal(with_knee[2], plain[2])
    assert not np.array_equal(with_knee[0], plain[0])
    assert AugmentConfig(knee=0.1).enabled


def test_same_generator_same_batch_and_off_is_identity():
    a = augment(*_batch(), np.random.default_rng(7), AugmentConfig(mirror=True, scale=0.1, shift=0.1))
    b = augment(*_batch(), np.random.default_rng(7), AugmentConfig(mirror=True, scale=0.1, shift=0.1))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    off = augment(*_batch(), np.random.default_rng(7), AugmentConfig())
    for x, y in zip(off, _batch()):
        np.testing.assert_array_equal(x, y)
    assert not AugmentConfig().enabled and AugmentConfig(shift=0.1).enabled


@pytest.mark.parametrize("kw", [{"scale": 1.0}, {"scale": -0.1}, {"shift": -1.0}, {"knee": -0.2}, {"knee": 1.0},
                                {"oedema": 1.0}, {"oedema": -0.1}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="augment"):
        AugmentConfig(**kw)


def test_oedema_fades_towards_the_healthy_brain_mean_in_half_the_tiles():
    images, labels, weights = _batch(n=40)
    rng = np.random.default_rng(4)
    window = rng.integers(0, 3, (40, T + RF - 1, T + RF - 1))  # other, necrosis, oedema
    original = images.copy()
    out, lab, w = augment(images, labels.copy(), weights.copy(), np.random.default_rng(11),
                          AugmentConfig(oedema=0.6), window)
    np.testing.assert_array_equal(lab, labels)
    draws = np.random.default_rng(11)
    draws.random((40, 2))
    for _ in range(3):  # scales, shifts, slopes
        draws.uniform(0, 1, (40, 4))
    faint = draws.random(40) < 0.5
    factors = draws.uniform(0.4, 1.0, (40, 4))
    assert 0 < faint.sum() < 40
    for i in range(40):
        brain = np.any(original[i] != 0, axis=0)
        oedema, healthy = (window[i] == 2) & brain, (window[i] == 0) & brain
        expected = original[i].copy()
        if faint[i]:
            for ch in range(4):
                m = original[i, ch][healthy].mean()
                expected[ch][oedema] = m + (original[i, ch][oedema] - m) * factors[i, ch]
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)
    assert np.all(out[:, :, :2, :] == 0)  # oedema labels outside the brain fade nothing there
    assert np.all((factors >= 0.4) & (factors <= 1.0)) and AugmentConfig(oedema=0.1).enabled


def test_oedema_fading_needs_window_labels_and_leaves_earlier_draws_alone():
    with pytest.raises(ValueError, match="input windows"):
        augment(*_batch(), np.random.default_rng(0), AugmentConfig(oedema=0.5))
    plain = augment(*_batch(), np.random.default_rng(9), AugmentConfig(mirror=True, scale=0.1))
    window = np.zeros((6, T + RF - 1, T + RF - 1), np.int64)  # no oedema: nothing fades
    faded = augment(*_batch(), np.random.default_rng(9),
                    AugmentConfig(mirror=True, scale=0.1, oedema=0.5), window)
    for x, y in zip(faded, plain):
        np.testing.assert_array_equal(x, y)


def test_bias_field_adds_a_weighted_plane_to_the_brain_of_half_the_tiles():
    """The field goes in after the oedema fading and before knee, scale and shift."""
    images, labels, weights = _batch(n=40)
    images *= 2  # values above the knee, so the order of field and knee matters
    original = images.copy()
    cfg = AugmentConfig(scale=0.2, shift=0.3, knee=0.5, bias=0.7)
    out, lab, _ = augment(images, labels.copy(), weights.copy(), np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(lab, labels)
    assert np.all(out[:, :, :2, :] == 0)  # outside the brain stays zero
    draws = np.random.default_rng(5)  # the draws in their documented order
    draws.random((40, 2))
    scales = draws.uniform(0.8, 1.2, (40, 4))
    shifts = draws.uniform(-0.3, 0.3, (40, 4))
    slopes_knee = draws.uniform(0.5, 1.0, (40, 4))
    draws.random(40)  # oedema: faint
    draws.uniform(0, 1, (40, 4))  # oedema: factors
    on = draws.random(40) < 0.5
    offset = draws.uniform(-0.7, 0.7, 40)
    slopes = draws.uniform(-0.35, 0.35, (40, 2))
    w = draws.uniform(0.5, 1.0, (40, 4))
    assert 0 < on.sum() < 40
    side = T + RF - 1
    for i in range(40):
        expected = original[i].copy()
        for ch in range(4):
            for r in range(2, side):  # rows 0-1 are outside the brain
                for col in range(side):
                    v = float(original[i, ch, r, col])
                    if on[i]:
                        u_r, v_c = -1 + 2 * r / (side - 1), -1 + 2 * col / (side - 1)
                        v += w[i, ch] * (offset[i] + slopes[i, 0] * u_r + slopes[i, 1] * v_c)
                    if v > 1.0:
                        v = 1.0 + (v - 1.0) * slopes_knee[i, ch]
                    expected[ch, r, col] = v * scales[i, ch] + shifts[i, ch]
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-5)


def test_bias_field_comes_after_every_earlier_draw():
    """Tiles the field skips match a run without it exactly: its draws come last."""
    plain = augment(*_batch(n=20), np.random.default_rng(9), AugmentConfig(mirror=True, scale=0.1))
    biased = augment(*_batch(n=20), np.random.default_rng(9),
                     AugmentConfig(mirror=True, scale=0.1, bias=1.0))
    draws = np.random.default_rng(9)
    draws.random((20, 2))
    for _ in range(3):
        draws.uniform(0, 1, (20, 4))
    draws.random(20)
    draws.uniform(0, 1, (20, 4))
    on = draws.random(20) < 0.5
    assert 0 < on.sum() < 20
    np.testing.assert_array_equal(biased[0][~on], plain[0][~on])
    assert np.all(np.abs(biased[0][on] - plain[0][on]).max(axis=(1, 2, 3)) > 0)
    for x, y in zip(biased[1:], plain[1:]):  # labels and weights: same flips
        np.testing.assert_array_equal(x, y)
    assert AugmentConfig(bias=0.5).enabled and not AugmentConfig(bias=0.0).enabled
    with pytest.raises(ValueError, match="bias"):
        AugmentConfig(bias=-0.1)
