"""Post-processing rules on tiny label maps with exact expected outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.postprocess import PostprocessConfig, postprocess, remove_small_components


def _blank(shape=(8, 8, 8)) -> np.ndarray:
    return np.zeros(shape, np.uint8)


def test_small_component_removed_large_kept_exactly():
    pred = _blank()
    pred[0:3, 0:3, 0:3] = 2  # 27 voxels of oedema
    pred[1, 1, 1] = 4  # one enhancing voxel inside it: same component
    pred[6, 6, 6] = 1  # an isolated voxel: its own component
    out = postprocess(pred, PostprocessConfig(min_component_mm3=2, min_enhancing_mm3=0))
    expected = pred.copy()
    expected[6, 6, 6] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and pred[6, 6, 6] == 1  # input untouched


def test_26_connectivity_corner_neighbours_are_one_component():
    pred = _blank()
    pred[2, 2, 2] = pred[3, 3, 3] = pred[4, 4, 4] = 2  # touching only at corners
    pred[7, 0, 0] = 2  # isolated
    cfg = PostprocessConfig(min_component_mm3=3, keep_largest=False, min_enhancing_mm3=0)
    expected = pred.copy()
    expected[7, 0, 0] = 0
    np.testing.assert_array_equal(postprocess(pred, cfg), expected)


def test_whole_tumour_mask_joins_classes_into_one_component():
    pred = _blank()
    pred[2, 2, 2], pred[2, 2, 3], pred[2, 2, 4] = 1, 2, 3  # three classes, one 3-voxel lesion
    cfg = PostprocessConfig(min_component_mm3=3, keep_largest=False, min_enhancing_mm3=0)
    np.testing.assert_array_equal(postprocess(pred, cfg), pred)


@pytest.mark.parametrize("keep_largest, kept", [(True, True), (False, False)])
def test_largest_component_kept_below_threshold_only_with_keep_largest(keep_largest, kept):
    pred = _blank()
    pred[0:2, 0:2, 0] = 2  # 4 voxels: the largest
    pred[5, 5, 5] = 2  # 1 voxel
    cfg = PostprocessConfig(min_component_mm3=10, keep_largest=keep_largest,
                            min_enhancing_mm3=0)
    expected = _blank()
    if kept:
        expected[0:2, 0:2, 0] = 2
    np.testing.assert_array_equal(postprocess(pred, cfg), expected)


def test_largest_tie_keeps_the_first_component():
    mask = np.zeros((5, 1, 1), bool)
    mask[0, 0, 0] = mask[4, 0, 0] = True
    expected = np.zeros_like(mask)
    expected[0, 0, 0] = True
    np.testing.assert_array_equal(remove_small_components(mask, 2, keep_largest=True), expected)


def test_few_enhancing_voxels_become_necrosis_core_and_whole_unchanged():
    pred = _blank()
    pred[0:3, 0:3, 0:3] = 2
    pred[1, 1, 0:2] = 4  # 2 enhancing voxels
    out = postprocess(pred, PostprocessConfig(min_component_mm3=0, min_enhancing_mm3=3))
    expected = pred.copy()
    expected[1, 1, 0:2] = 1
    np.testing.assert_array_equal(out, expected)
    for classes in ((1, 2, 3, 4), (1, 3, 4)):  # whole, core
        np.testing.assert_array_equal(np.isin(out, classes), np.isin(pred, classes))


def test_enough_enhancing_voxels_stay():
    pred = _blank()
    pred[1, 1, 0:3] = 4
    cfg = PostprocessConfig(min_component_mm3=0, min_enhancing_mm3=3)
    np.testing.assert_array_equal(postprocess(pred, cfg), pred)


def test_enhancing_rule_counts_after_component_removal():
    pred = _blank()
    pred[0:3, 0:3, 0:3] = 2
    pred[0, 0, 0] = 4  # 1 enhancing voxel in the large lesion
    pred[6:8, 6, 6] = 4  # 2 enhancing voxels in a small lesion that rule 1 removes
    cfg = PostprocessConfig(min_component_mm3=5, min_enhancing_mm3=2)
    expected = pred.copy()
    expected[6:8, 6, 6] = 0
    expected[0, 0, 0] = 1  # 1 < 2 enhancing voxels left
    np.testing.assert_array_equal(postprocess(pred, cfg), expected)


def test_disabled_and_empty_are_identity():
    pred = _blank()
    pred[3, 3, 3] = 4
    np.testing.assert_array_equal(postprocess(pred, PostprocessConfig(enabled=False)), pred)
    np.testing.assert_array_equal(postprocess(_blank()), _blank())


def test_defaults_documented_and_validated():
    cfg = PostprocessConfig()
    assert (cfg.enabled, cfg.min_component_mm3, cfg.keep_largest, cfg.min_enhancing_mm3,
            cfg.max_oedema_distance_mm) == (True, 10000, True, 500, 0)
    for bad in (-1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="min_component_mm3"):
            PostprocessConfig(min_component_mm3=bad)
    with pytest.raises(ValueError, match="unknown"):
        PostprocessConfig.from_dict({"min_component_voxels": 3})
    assert PostprocessConfig.from_meta({}) == cfg
    stored = PostprocessConfig(min_component_mm3=123.0, min_enhancing_mm3=4.0)
    assert PostprocessConfig.from_meta({"postprocess": stored.to_dict()}) == stored


def test_thresholds_are_volumes_on_anisotropic_grids():
    """The same tissue volume is kept or removed whatever the voxel size: a 4 x 4 x 4 mm cube
    (64 mm^3) is 64 voxels at 1 mm and 8 voxels at 2 x 2 x 2 mm, 16 at 1 x 2 x 2 mm."""
    cfg_keep = PostprocessConfig(min_component_mm3=64, keep_largest=False, min_enhancing_mm3=0)
    cfg_drop = PostprocessConfig(min_component_mm3=65, keep_largest=False, min_enhancing_mm3=0)
    for spacing, side in (((1.0, 1.0, 1.0), (4, 4, 4)), ((2.0, 2.0, 2.0), (2, 2, 2)),
                          ((1.0, 2.0, 2.0), (4, 2, 2))):
        pred = _blank()
        pred[:side[0], :side[1], :side[2]] = 2
        np.testing.assert_array_equal(postprocess(pred, cfg_keep, spacing), pred)
        np.testing.assert_array_equal(postprocess(pred, cfg_drop, spacing), _blank())
    # Enhancing rule: 2 voxels of 0.5 mm^3 = 1 mm^3.
    pred = _blank()
    pred[0:3, 0:3, 0:3] = 2
    pred[1, 1, 0:2] = 4
    half = (0.5, 1.0, 1.0)
    assert (postprocess(pred, PostprocessConfig(min_component_mm3=0, min_enhancing_mm3=1.0),
                        half) == 4).sum() == 2
    assert (postprocess(pred, PostprocessConfig(min_component_mm3=0, min_enhancing_mm3=1.01),
                        half) == 4).sum() == 0


def test_oedema_far_from_core_removed_exactly_on_anisotropic_grids():
    """Rule 0 against a brute-force distance: random label maps, every oedema voxel farther
    than D mm (spacing-scaled Euclidean) from every core voxel becomes 0, nothing else moves."""
    rng = np.random.default_rng(3)
    for spacing, limit in (((1.0, 1.0, 1.0), 3.0), ((1.0, 2.0, 0.5), 2.5), ((2.0, 2.0, 2.0), 4.0)):
        pred = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(9, 8, 7),
                          p=[0.5, 0.02, 0.46, 0.02])
        cfg = PostprocessConfig(min_component_mm3=0, min_enhancing_mm3=0,
                                max_oedema_distance_mm=limit)
        coords = np.stack(np.indices(pred.shape), -1).reshape(-1, 3) * np.asarray(spacing)
        core = coords[np.isin(pred.ravel(), (1, 3, 4))]
        assert len(core)
        nearest = np.sqrt(((coords[:, None] - core[None]) ** 2).sum(-1)).min(1).reshape(pred.shape)
        expected = pred.copy()
        expected[(pred == 2) & (nearest > limit)] = 0
        assert (expected != pred).any() and ((pred == 2) & (nearest <= limit)).any()
        np.testing.assert_array_equal(postprocess(pred, cfg, spacing), expected)


def test_oedema_distance_rule_boundary_and_no_core():
    pred = _blank((12, 3, 3))
    pred[:, 1, 1] = 2
    pred[0, 1, 1] = 1
    cfg = PostprocessConfig(min_component_mm3=0, max_oedema_distance_mm=5)
    out = postprocess(pred, cfg)
    np.testing.assert_array_equal(out[:, 1, 1], [1, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0])  # 5 mm stays
    only_oedema = pred.copy()
    only_oedema[0, 1, 1] = 2  # no core: an LGG called oedema keeps its whole tumour
    np.testing.assert_array_equal(postprocess(only_oedema, cfg), only_oedema)
    np.testing.assert_array_equal(postprocess(pred, PostprocessConfig(min_component_mm3=0)), pred)
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="max_oedema_distance_mm must be a distance"):
            PostprocessConfig(max_oedema_distance_mm=bad)
