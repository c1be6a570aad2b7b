"""To model space and back (tumorseg.geometry), and `segment` on reoriented / resampled scans."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.geometry import MODEL_SPACE, ModelSpace, to_model_space, transform_for

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> nib.Nifti1Image:
    """`data` (LPS) stored with axis codes `codes`, with the affine nibabel computes for it:
    an independent construction of the input the transform must undo."""
    import nibabel.orientations as nio

    img = nib.Nifti1Image(data, affine)
    return img.as_reoriented(nio.ornt_transform(nio.io_orientation(affine),
                                                nio.axcodes2ornt(tuple(codes))))


def test_brats_grid_is_identity():
    t = transform_for(LPS, (240, 240, 155))
    assert t.identity
    a = np.arange(24).reshape(2, 3, 4)
    assert t.to_model(a, 0) is a and t.to_input(a) is a


@pytest.mark.parametrize("codes", ["RAS", "LAS", "SPL", "ASR", "IRP"])
def test_reorientation_is_exact_both_ways(codes):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 5, (7, 9, 11)).astype(np.uint8)
    img = _reoriented(data, LPS, codes)
    stored = np.asarray(img.dataobj)
    assert nib.aff2axcodes(img.affine) == tuple(codes)
    t = transform_for(img.affine, stored.shape)
    assert t.reorients and not t.resamples
    np.testing.assert_array_equal(t.to_model(stored, 0), data)
    np.testing.assert_array_equal(t.to_input(data), stored)
    # Channels ride along on trailing axes.
    stack = np.stack([stored, stored + 1], axis=-1)
    np.testing.assert_array_equal(t.to_model(stack, 0)[..., 1], data + 1)


def test_resampling_grid_and_round_trip():
    aff = LPS @ np.diag([1.0, 1.0, 3.0, 1.0])
    t = transform_for(aff, (5, 6, 7))
    assert t.resamples and t.model_shape == (5, 6, 21)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (5, 6, 7)).astype(np.uint8)
    up = t.to_model(labels, 0)
    # Model voxel j's centre (j + 0.5) mm lies in input voxel floor((j + 0.5) / 3).
    np.testing.assert_array_equal(up, np.repeat(labels, 3, axis=2))
    np.testing.assert_array_equal(t.to_input(up), labels)
    # Linear: against numpy's interpolation of one profile at the centres' source coordinates.
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)
    lin = t.to_model(image, 1)
    src = (np.arange(21) + 0.5) / 3 - 0.5
    np.testing.assert_allclose(lin[2, 3], np.interp(src, np.arange(7), image[2, 3]), atol=1e-5)


def test_downsampling_to_the_model_spacing():
    t = transform_for(LPS @ np.diag([0.5, 0.5, 1.0, 1.0]), (10, 8, 4))
    assert t.model_shape == (5, 4, 4)
    labels = np.zeros((10, 8, 4), np.uint8)
    labels[4:8, 2:6] = 2
    back = t.to_input(t.to_model(labels, 0))
    assert back.shape == labels.shape
    # Nearest neighbour down then up keeps every other voxel's value over 2-voxel blocks.
    np.testing.assert_array_equal(back[1::2, 1::2], labels[1::2, 1::2])


def test_model_space_from_meta_and_validation():
    assert ModelSpace.from_meta({}) == MODEL_SPACE
    assert ModelSpace.from_meta({"geometry": {"axcodes": "RAS", "spacing": [2, 2, 2]}}) == \
        ModelSpace("RAS", (2.0, 2.0, 2.0))
    with pytest.raises(ValueError):
        ModelSpace("LLS")
    with pytest.raises(ValueError):
        ModelSpace("LPS", (1.0, 0.0, 1.0))


def test_to_model_space_keeps_reference(phantom, tmp_path):
    from tumorseg.datasets import find_cases, load_case
    from tumorseg.phantom import write_phantom

    write_phantom(phantom, tmp_path / "d", "brats2017")
    loaded = load_case(find_cases(tmp_path / "d")[0])
    same, t = to_model_space(loaded)
    assert t.identity and same is loaded


def _moved(data: np.ndarray, affine: np.ndarray, codes: str, z_step: int) -> nib.Nifti1Image:
    """`data` (LPS, `affine`) keeping only every z_step-th axial slice (from 1: the slices a
    z_step mm grid holds at its voxel centres), stored with axis codes `codes`."""
    aff = affine.copy()
    aff[:3, 2] *= z_step
    # The new voxel 0 is the old slice 1's centre, in a block of z_step old slices.
    aff[:3, 3] = affine[:3, 3] + affine[:3, 2] * (1 - (z_step - 1) / 2)
    out = _reoriented(data[:, :, 1::z_step], aff, codes)
    return nib.Nifti1Image(np.asarray(out.dataobj), out.affine)


def _transformed_case(src: Path, dst: Path, codes: str, z_step: int) -> None:
    """Copy a BraTS case through `_moved`."""
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.nii.gz")):
        img = nib.load(str(f))
        nib.save(_moved(np.asarray(img.dataobj), img.affine, codes, z_step), str(dst / f.name))


@pytest.mark.slow
def test_segment_permuted_flipped_and_3mm_case(shared_data, tmp_path):
    """A real case stored sagittally (axes ASR: permuted and flipped) at 1 x 1 x 3 mm gives the
    same whole tumour as the untouched case, and its output lies on its own grid."""
    from tumorseg.datasets import find_cases
    from tumorseg.metrics import dice
    from tumorseg.segment import SegmentOptions, segment_cases

    cid = "Brats18_2013_11_1"
    plain_root, moved_root = tmp_path / "plain", tmp_path / "moved"
    shutil.copytree(shared_data / cid, plain_root / cid)
    _transformed_case(shared_data / cid, moved_root / cid, "ASR", 3)
    opts = SegmentOptions()
    segment_cases(None, find_cases(plain_root), tmp_path / "out_plain", opts)
    segment_cases(None, find_cases(moved_root), tmp_path / "out_moved", opts)
    moved_in = nib.load(str(moved_root / cid / f"{cid}_t1.nii.gz"))
    moved_out = nib.load(str(tmp_path / "out_moved" / f"{cid}.nii.gz"))
    assert moved_out.shape == moved_in.shape
    np.testing.assert_allclose(moved_out.affine, moved_in.affine, atol=1e-5)
    # The untouched output carried to the moved grid by the same (independent) construction.
    plain = nib.load(str(tmp_path / "out_plain" / f"{cid}.nii.gz"))
    expect = np.asarray(_moved(np.asarray(plain.dataobj), plain.affine, "ASR", 3).dataobj)
    got = np.asarray(moved_out.dataobj)
    d = dice(got > 0, expect > 0)
    assert d >= 0.95, d


def test_training_cache_is_in_model_space(phantom, tmp_path):
    """A case stored with other axes is cached (for training) as the LPS case is: same arrays."""
    from tumorseg.datasets import find_cases
    from tumorseg.phantom import write_phantom
    from tumorseg.preprocess import PreprocessSettings, cached_preprocess, load_preprocessed

    folder = write_phantom(phantom, tmp_path / "lps", "brats2017")
    moved = tmp_path / "moved" / folder.name
    moved.mkdir(parents=True)
    for f in folder.glob("*.nii.gz"):
        img = nib.load(str(f))
        out = _reoriented(np.asarray(img.dataobj), img.affine, "SAR")
        nib.save(nib.Nifti1Image(np.asarray(out.dataobj), out.affine), str(moved / f.name))
    settings = PreprocessSettings()
    a = load_preprocessed(cached_preprocess(find_cases(folder.parent)[0], settings,
                                            tmp_path / "c1")[0])
    b = load_preprocessed(cached_preprocess(find_cases(moved.parent)[0], settings,
                                            tmp_path / "c2")[0])
    assert a.image.shape == b.image.shape
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)


@pytest.mark.parametrize("scale, rule", [(0.01, "outside 0.1-10 mm"), (20.0, "outside 0.1-10 mm"),
                                         (np.nan, "not finite and invertible"),
                                         (0.0, "not finite and invertible")])
def test_implausible_voxel_sizes_are_refused(phantom, tmp_path, scale, rule):
    from tumorseg.datasets import find_cases, load_case
    from tumorseg.errors import TumorsegInputError
    from tumorseg.phantom import write_phantom

    folder = write_phantom(phantom, tmp_path / "d", "brats2017")
    loaded = load_case(find_cases(folder.parent)[0])
    loaded.reference.affine = loaded.reference.affine @ np.diag([scale, 1.0, 1.0, 1.0])
    with pytest.raises(TumorsegInputError, match=rule) as err:
        to_model_space(loaded)
    assert str(loaded.reference.path) in str(err.value)


def test_field_of_view_beyond_a_head_is_refused(phantom, tmp_path):
    from tumorseg.datasets import find_cases, load_case
    from tumorseg.errors import TumorsegInputError
    from tumorseg.phantom import write_phantom

    folder = write_phantom(phantom, tmp_path / "d", "brats2017")
    loaded = load_case(find_cases(folder.parent)[0])
    # 56 voxels of 9.5 mm along y: 532 mm, beyond the 512 voxels of a 1 mm model grid.
    loaded.reference.affine = loaded.reference.affine @ np.diag([9.0, 9.5, 1.0, 1.0])
    with pytest.raises(TumorsegInputError, match="exceeds 512 per axis"):
        to_model_space(loaded)
