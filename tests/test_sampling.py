"""Sampling: where training looks (anchors) and how much each output pixel counts (weights).

Two hand-made cases with known class counts make every expectation exact; distributions are
checked with a chi-square statistic on a few thousand draws from a fixed seed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tumorseg.models import dense_padding
from tumorseg.sampling import Sampler, _nearest, _rotated_grid, class_weights, prepare

RF = 33  # two_path
CHI2_99_9 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # chi-square quantile 0.999 by dof


def _case(case_id, shape, brain, blocks, seed):
    """A preprocessed-like case: image (4, X, Y, Z) with distinct values, labels as `blocks`.

    brain: (x0, x1, y0, y1) box of the brain mask, every slice; blocks: (class, x0, x1, y0, y1, z).
    """
    x, y, z = shape
    image = np.random.default_rng(seed).standard_normal((4, x, y, z)).astype(np.float32)
    mask = np.zeros(shape, bool)
    bx0, bx1, by0, by1 = brain
    mask[bx0:bx1, by0:by1, :] = True
    label = np.zeros(shape, np.uint8)
    for c, x0, x1, y0, y1, zz in blocks:
        label[x0:x1, y0:y1, zz] = c
    label[~mask] = 0
    image[:, ~mask] = 0
    return SimpleNamespace(case_id=case_id, image=image, mask=mask, label=label)


@pytest.fixture(scope="module")
def cases():
    # Case a: 16 x 20 x 3, brain 12 x 14; necrosis 4 voxels, oedema 20, enhancing 6; no class 3.
    a = _case("a", (16, 20, 3), (2, 14, 3, 17),
              [(2, 4, 8, 5, 11, 1), (1, 5, 7, 7, 9, 1), (4, 10, 12, 4, 7, 2)], seed=0)
    # Case b: 10 x 9 x 2 (smaller than an 8-tile plus margin in some slices), necrosis 12 voxels.
    b = _case("b", (10, 9, 2), (1, 9, 1, 8), [(1, 2, 5, 2, 6, 0)], seed=1)
    return [a, b]


@pytest.fixture(scope="module")
def data(cases):
    return prepare(cases, RF)


def _counts(cases):
    """Voxels of each class inside the brain, per case: [n_cases, 5]."""
    return np.array([[np.sum((c.label == k) & c.mask) for k in range(5)] for c in cases], float)


def _anchor_classes(data, anchors):
    return np.array([data.labels[case][z, x0, y0] for case, z, x0, y0 in anchors])


def _chi2(observed, expected):
    keep = expected > 0
    assert np.all(observed[~keep] == 0), f"draws of classes with zero probability: {observed}"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_fixture_class_counts(cases):
    # the expectations below rely on these exact counts
    np.testing.assert_array_equal(_counts(cases)[:, 1:], [[4, 20, 0, 6], [12, 0, 0, 0]])


def test_balanced_anchors_draw_each_present_class_equally(cases, data):
    sampler = Sampler(data, RF, 1, "balanced")
    assert sampler.present == [0, 1, 2, 4]
    n = 4000
    anchors = sampler.anchors(np.random.default_rng(0), n)
    classes = _anchor_classes(data, anchors)
    observed = np.bincount(classes, minlength=5).astype(float)
    expected = np.array([n / 4, n / 4, n / 4, 0, n / 4])
    stat = _chi2(observed, expected)
    assert stat < CHI2_99_9[3], f"balanced class counts {observed} (chi2 {stat:.1f})"
    # Within a class, every voxel is equally likely: necrosis has 4 voxels in a, 12 in b.
    nec_cases = np.array([a[0] for a, c in zip(anchors, classes) if c == 1])
    obs = np.bincount(nec_cases, minlength=2).astype(float)
    stat = _chi2(obs, obs.sum() * np.array([4, 12]) / 16)
    assert stat < CHI2_99_9[1], f"necrosis anchors per case {obs}, expected ratio 1:3"


def test_natural_anchors_follow_the_class_distribution_inside_the_brain(cases, data):
    sampler = Sampler(data, RF, 1, "natural")
    counts = _counts(cases)
    np.testing.assert_allclose(sampler.class_freq, counts.sum(0) / counts.sum())
    n = 4000
    anchors = sampler.anchors(np.random.default_rng(1), n)
    assert all(data.masks[c][z, x, y] for c, z, x, y in anchors), "anchor outside the brain"
    observed = np.bincount(_anchor_classes(data, anchors), minlength=5).astype(float)
    stat = _chi2(observed, n * sampler.class_freq)
    assert stat < CHI2_99_9[3], \
        f"natural class counts {observed}, expected {n * sampler.class_freq}"
    per_case = np.bincount([a[0] for a in anchors], minlength=2).astype(float)
    stat = _chi2(per_case, n * counts.sum(1) / counts.sum())
    assert stat < CHI2_99_9[1], f"natural anchors per case {per_case}"


@pytest.mark.parametrize("mode", ["balanced", "natural", "slice_weighted"])
@pytest.mark.parametrize("tile", [1, 8])
def test_anchors_are_reproducible_from_the_seed(data, mode, tile):
    sampler = Sampler(data, RF, tile, mode)
    first = sampler.anchors(np.random.default_rng([7, 0, 3]), 50)
    again = sampler.anchors(np.random.default_rng([7, 0, 3]), 50)
    other = sampler.anchors(np.random.default_rng([7, 0, 4]), 50)
    assert first == again
    assert first != other


@pytest.mark.parametrize("mode", ["balanced", "natural", "slice_weighted"])
@pytest.mark.parametrize("tile", [1, 8])
def test_tiles_lie_inside_the_padded_slice_and_align_with_labels(cases, data, mode, tile):
    sampler = Sampler(data, RF, tile, mode)
    before, _ = dense_padding(RF)
    size = tile + RF - 1
    anchors = sampler.anchors(np.random.default_rng(2), 300)
    images = sampler.images(anchors)
    labels, weights = sampler.targets(anchors)
    assert images.shape == (300, 4, size, size)
    assert labels.shape == weights.shape == (300, tile, tile)
    for i, (case, z, x0, y0) in enumerate(anchors):
        _, nx, ny = data.labels[case].shape
        padded = data.images[case].shape[-2:]
        assert 0 <= x0 and 0 <= y0
        # The tile's outputs lie in the slice (or start at 0 when the slice is narrower than T),
        # so its input window lies in the padded slice.
        assert x0 + tile <= max(nx, tile) and y0 + tile <= max(ny, tile), (case, z, x0, y0)
        if nx >= tile and ny >= tile:
            assert x0 + size <= padded[0] and y0 + size <= padded[1]
        # Output pixel (u, v) of the tile is voxel (x0+u, y0+v): its patch is centred there.
        pre = cases[case]
        for u in range(min(tile, nx - x0)):
            for v in range(min(tile, ny - y0)):
                np.testing.assert_array_equal(images[i, :, u + before, v + before],
                                              pre.image[:, x0 + u, y0 + v, z])
                assert labels[i, u, v] == pre.label[x0 + u, y0 + v, z]
                if not pre.mask[x0 + u, y0 + v, z]:
                    assert weights[i, u, v] == 0, "weight outside the brain"
        # Pixels beyond a slice narrower than the tile carry no weight.
        assert np.all(weights[i, max(nx - x0, 0):, :] == 0)
        assert np.all(weights[i, :, max(ny - y0, 0):] == 0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)


def test_balanced_tiles_contain_their_drawn_class(data):
    """T > 1: the drawn anchor voxel lies inside the tile, so rare classes appear in ~1/4 of tiles
    at least (necrosis is one of 4 present classes)."""
    sampler = Sampler(data, RF, 8, "balanced")
    anchors = sampler.anchors(np.random.default_rng(3), 2000)
    labels, _ = sampler.targets(anchors)
    for c in (1, 2, 4):
        frac = np.mean([(lab == c).any() for lab in labels])
        assert frac >= 0.22, f"class {c} in only {frac:.1%} of balanced 8x8 tiles"


LABELS = np.array([
    [[0, 0, 1], [0, 2, 2], [4, 4, 4]],
    [[0, 0, 0], [0, 0, 0], [0, 0, 2]],
    [[3, 3, 0], [0, 0, 0], [1, 0, 0]],
])
VALID = np.ones(LABELS.shape, bool)
VALID[1, 0, :] = False  # three pixels outside the brain
VALID[2, 2, 0] = False  # the only necrosis pixel of tile 2 lies outside


def test_balanced_weights_give_each_present_class_the_same_total():
    w = class_weights(LABELS, VALID, "balanced")
    present = [c for c in range(5) if np.any(VALID & (LABELS == c))]
    assert present == [0, 1, 2, 3, 4]
    for c in present:
        sel = VALID & (LABELS == c)
        assert w[sel].sum() == pytest.approx(1 / len(present), abs=1e-6), f"class {c}"
        assert np.ptp(w[sel]) == pytest.approx(0, abs=1e-7), f"class {c} pixels weighted unequally"
    assert np.all(w[~VALID] == 0)
    assert w.sum() == pytest.approx(1, abs=1e-6)


def test_natural_weights_are_uniform_inside_the_brain():
    w = class_weights(LABELS, VALID, "natural")
    np.testing.assert_allclose(w[VALID], 1 / VALID.sum(), rtol=1e-6)
    assert np.all(w[~VALID] == 0)


def test_slice_weighted_balances_classes_within_each_tile_and_tiles_equally():
    w = class_weights(LABELS, VALID, "slice_weighted")
    assert np.all(w[~VALID] == 0)
    for i in range(len(LABELS)):
        assert w[i].sum() == pytest.approx(1 / 3, abs=1e-6), f"tile {i} total {w[i].sum()}"
        present = [c for c in range(5) if np.any(VALID[i] & (LABELS[i] == c))]
        for c in present:
            sel = VALID[i] & (LABELS[i] == c)
            assert w[i][sel].sum() == pytest.approx(1 / 3 / len(present), abs=1e-6), (i, c)
            assert np.ptp(w[i][sel]) == pytest.approx(0, abs=1e-7)


def test_weights_are_zero_when_nothing_is_valid():
    assert not class_weights(LABELS, np.zeros_like(VALID), "balanced").any()


@pytest.mark.parametrize("tile", [1, 8])
def test_window_labels_are_the_labels_under_each_input_window(cases, data, tile):
    """Checked against the labels zero-padded like the images and cut like them."""
    sampler = Sampler(data, RF, tile, "balanced")
    before, after = dense_padding(RF)
    size = tile + RF - 1
    anchors = sampler.anchors(np.random.default_rng(5), 200)
    windows = sampler.window_labels(anchors)
    assert windows.shape == (200, size, size)
    for i, (case, z, x0, y0) in enumerate(anchors):
        padded = np.pad(cases[case].label[:, :, z], ((before, after + size), (before, after + size)))
        np.testing.assert_array_equal(windows[i], padded[x0:x0 + size, y0:y0 + size])
    assert (windows == 2).any()  # the windows do reach the oedema block


def test_planes_add_each_case_sliced_coronally_and_sagittally(cases):
    data = prepare(cases, RF, ("axial", "coronal", "sagittal"))
    before, after = dense_padding(RF)
    assert data.case_ids == ["a", "a@coronal", "a@sagittal", "b", "b@coronal", "b@sagittal"]
    for k, pre in enumerate(cases):
        axial, coronal, sagittal = (3 * k + j for j in range(3))
        x, y, z = pre.label.shape
        assert data.labels[axial].shape == (z, x, y)
        assert data.labels[coronal].shape == (y, x, z)
        assert data.labels[sagittal].shape == (x, y, z)
        for j in range(y):  # coronal slice j is the plane y = j, axes (x, z)
            np.testing.assert_array_equal(data.labels[coronal][j], pre.label[:, j, :])
            np.testing.assert_array_equal(data.masks[coronal][j], pre.mask[:, j, :])
            np.testing.assert_array_equal(
                data.images[coronal][j][:, before:before + x, before:before + z], pre.image[:, :, j, :])
        for i in range(x):  # sagittal slice i is the plane x = i, axes (y, z)
            np.testing.assert_array_equal(data.labels[sagittal][i], pre.label[i])
            np.testing.assert_array_equal(
                data.images[sagittal][i][:, before:before + y, before:before + z], pre.image[:, i])
        assert data.images[sagittal].shape == (x, 4, y + before + after, z + before + after)
    # Every plane holds the same voxels, so the class frequencies are those of the axial stacks.
    np.testing.assert_allclose(Sampler(data, RF, 8, "balanced").class_freq,
                               Sampler(prepare(cases, RF), RF, 8, "balanced").class_freq)


def _near_tumour_bruteforce(case, mm):
    """Healthy brain voxels of `case` within `mm` of a tumour voxel, by comparing every pair:
    a set of (z, x, y), independent of scipy's distance transform."""
    lab, msk = case.label, case.mask
    tumour = np.argwhere(lab > 0)
    out = set()
    for x, y, z in np.argwhere((lab == 0) & msk):
        if len(tumour) and (((tumour - (x, y, z)) ** 2).sum(1) <= mm * mm).any():
            out.add((int(z), int(x), int(y)))
    return out


def test_healthy_share_sets_the_fraction_of_healthy_anchors(data):
    sampler = Sampler(data, RF, 1, "balanced", healthy_share=0.6)
    n = 4000
    observed = np.bincount(_anchor_classes(data, sampler.anchors(np.random.default_rng(8), n)),
                           minlength=5).astype(float)
    expected = np.array([0.6, 0.4 / 3, 0.4 / 3, 0, 0.4 / 3]) * n  # tumour classes share the rest
    stat = _chi2(observed, expected)
    assert stat < CHI2_99_9[3], f"class counts {observed}, expected {expected} (chi2 {stat:.1f})"


def test_border_anchors_are_the_healthy_voxels_near_a_tumour_each_equally_likely(cases, data):
    mm = 2.0
    sampler = Sampler(data, RF, 1, "balanced", healthy_share=0.5, border_share=1.0, border_mm=mm)
    near = [_near_tumour_bruteforce(c, mm) for c in cases]
    for k, case_near in enumerate(near):
        z, x, y = np.unravel_index(sampler.border[k], data.labels[k].shape)
        assert set(zip(z.tolist(), x.tolist(), y.tolist())) == case_near, f"case {k}"
    anchors = sampler.anchors(np.random.default_rng(9), 6000)
    healthy = [(c, z, x, y) for c, z, x, y in anchors if data.labels[c][z, x, y] == 0]
    assert all((z, x, y) in near[c] for c, z, x, y in healthy), "a healthy anchor far from tumour"
    # Uniform over the union of both cases' border voxels.
    index = {(c, v): i for i, (c, v) in enumerate((c, v) for c in range(2) for v in sorted(near[c]))}
    observed = np.bincount([index[(c, (z, x, y))] for c, z, x, y in healthy],
                           minlength=len(index)).astype(float)
    stat = _chi2(observed, np.full(len(index), len(healthy) / len(index)))
    dof = len(index) - 1
    assert stat < dof + 4 * np.sqrt(2 * dof), f"border anchors not uniform (chi2 {stat:.0f}, dof {dof})"


@pytest.mark.parametrize("options", [{"healthy_share": 1.0}, {"border_share": 1.5},
                                     {"border_share": 0.5, "border_mm": 0.0},
                                     {"sampling": "natural", "healthy_share": 0.3}])
def test_anchor_options_out_of_range_are_rejected(options):
    from tumorseg.train import PhaseConfig

    with pytest.raises(ValueError):
        PhaseConfig(**options)


@pytest.mark.parametrize("tile", [1, 8])
def test_rotation_by_zero_reads_exactly_the_plain_tiles(data, tile):
    sampler = Sampler(data, RF, tile, "balanced")
    anchors = sampler.anchors(np.random.default_rng(5), 12)
    images, labels, weights, window = sampler.rotated(anchors, np.zeros(len(anchors)))
    plain_labels, plain_weights = sampler.targets(anchors)
    np.testing.assert_array_equal(images, sampler.images(anchors))
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_array_equal(weights, plain_weights)
    np.testing.assert_array_equal(window, sampler.window_labels(anchors))


def test_rotation_by_a_right_angle_is_the_turned_tile(data):
    # Turned about the tile's centre by +90 degrees, a tile reads the plain tile clockwise
    # (np.rot90 k = -1); the square window turns with it, so nothing new comes into view.
    sampler = Sampler(data, RF, 8, "balanced")
    anchors = sampler.anchors(np.random.default_rng(6), 12)
    images, labels, _, window = sampler.rotated(anchors, np.full(len(anchors), np.pi / 2))
    plain_labels, _ = sampler.targets(anchors)
    np.testing.assert_allclose(images, np.rot90(sampler.images(anchors), -1, axes=(2, 3)), atol=1e-5)
    np.testing.assert_array_equal(labels, np.rot90(plain_labels, -1, axes=(1, 2)))
    np.testing.assert_array_equal(window, np.rot90(sampler.window_labels(anchors), -1, axes=(1, 2)))


def test_rotated_tiles_keep_zero_outside_the_brain_and_balanced_weights(data):
    sampler = Sampler(data, RF, 8, "balanced")
    anchors = sampler.anchors(np.random.default_rng(7), 16)
    angles = np.deg2rad(np.random.default_rng(8).uniform(-30, 30, len(anchors)))
    images, labels, weights, window = sampler.rotated(anchors, angles)
    assert np.isclose(weights.sum(), 1.0)
    # Each present class gets the same total weight (balanced mode), as for unrotated tiles.
    totals = [weights[labels == c].sum() for c in np.unique(labels[weights > 0])]
    np.testing.assert_allclose(totals, totals[0], rtol=1e-6)
    # Bilinear reads near the brain's edge mix in the zeros outside it; those pixels must stay
    # 0 (whole-slice inference sees 0 there), as must their labels.
    for i, (case, z, x0, y0) in enumerate(anchors):
        centre = (x0 + 3.5, y0 + 3.5)
        brain = _nearest(data.masks[case][z], _rotated_grid(8 + RF - 1, centre, angles[i]))
        assert not np.any(images[i][:, brain == 0])
        assert np.all(window[i][brain == 0] == 0)


def test_rotation_range_is_checked():
    from tumorseg.augment import AugmentConfig

    with pytest.raises(ValueError, match="rotate"):
        AugmentConfig(rotate=200.0)
