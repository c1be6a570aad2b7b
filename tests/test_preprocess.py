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


def test_preprocess_dataset_isolates_any_failure(tmp_path, monkeypatch):
    from tumorseg import preprocess

    root = tmp_path / "data"
    for s in range(3):
        write_phantom(make_phantom((32, 40, 24), seed=s, case_id=f"c{s}"), root, "brats2017")
    real = preprocess.preprocess_case

    def flaky(loaded, settings):
        if loaded.case.case_id == "c1":
            raise MemoryError()
        return real(loaded, settings)

    monkeypatch.setattr(preprocess, "preprocess_case", flaky)
    done, failed = preprocess_dataset(find_cases(root), PreprocessSettings(), tmp_path / "cache",
                                      progress=False)
    assert [p.name for p in done] == ["c0.npz", "c2.npz"] and failed == [("c1", "MemoryError")]


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


# -- cache key: everything that changes the cached arrays ---------------------------------------

def _entry(path):
    """The identity of a cache file: an atomic rewrite is a new file (new inode)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


@pytest.fixture
def cached_case(tmp_path):
    """A brats2017 phantom and an msd copy of it, each with a fresh cache entry."""
    ph = make_phantom((32, 40, 24), seed=0, case_id="c0")
    write_phantom(ph, tmp_path / "brats", "brats2017")
    write_phantom(ph, tmp_path / "msd", "msd")
    (case,) = find_cases(tmp_path / "brats")
    (msd,) = find_cases(tmp_path / "msd")
    for c, cache in ((case, tmp_path / "cache"), (msd, tmp_path / "cache_msd")):
        assert cached_preprocess(c, PreprocessSettings(), cache)[1]
    return case, msd, tmp_path / "cache", tmp_path / "cache_msd"


@pytest.mark.parametrize("field, value", [
    ("clip_percentiles", (2.0, 98.0)), ("n4", True), ("n4_shrink", 2),
    ("n4_iterations", (5, 5)), ("margin", 3)])
def test_cache_rebuilds_when_a_setting_changes(cached_case, field, value):
    case, _, cache, _ = cached_case
    assert getattr(PreprocessSettings(), field) != value
    settings = PreprocessSettings(**{field: value})
    before = _entry(cache_path(cache, "c0"))
    path, rebuilt = cached_preprocess(case, settings, cache)
    assert rebuilt and _entry(path) != before
    assert load_preprocessed(path).settings == settings
    assert not cached_preprocess(case, settings, cache)[1]


def test_cache_reuses_an_unchanged_entry(cached_case, tmp_path):
    _, _, cache, cache_msd = cached_case
    for root, d in ((tmp_path / "brats", cache), (tmp_path / "msd", cache_msd)):
        before = _entry(cache_path(d, "c0"))
        (again,) = find_cases(root)  # the same case, found anew
        path, rebuilt = cached_preprocess(again, PreprocessSettings(), d)
        assert not rebuilt and _entry(path) == before


def test_cache_rebuilds_when_the_label_convention_changes(cached_case, monkeypatch):
    import dataclasses

    from tumorseg import labels

    case, _, cache, _ = cached_case
    path = cache_path(cache, "c0")
    first = load_preprocessed(path)
    # Same files read as brats2013 (values 0, 1, 2, 4 are valid there too): a new key.
    before = _entry(path)
    as2013 = dataclasses.replace(case, convention="brats2013")
    assert cached_preprocess(as2013, PreprocessSettings(), cache)[1] and _entry(path) != before
    assert not cached_preprocess(as2013, PreprocessSettings(), cache)[1]
    # Same name, corrected table (oedema read as class 3): rebuilt, with the new labels.
    assert cached_preprocess(case, PreprocessSettings(), cache)[1]
    conv = labels.CONVENTIONS["brats2017"]
    monkeypatch.setitem(labels.CONVENTIONS, "brats2017", dataclasses.replace(
        conv, to_canonical={**conv.to_canonical, 2: 3}))
    assert cached_preprocess(case, PreprocessSettings(), cache)[1]
    relabelled = load_preprocessed(path).label
    np.testing.assert_array_equal(relabelled, np.where(first.label == 2, 3, first.label))
    assert (first.label == 2).any()


def test_cache_rebuilds_when_the_modality_map_changes(cached_case):
    import dataclasses

    from tumorseg.datasets import MODALITIES

    case, msd, cache, cache_msd = cached_case
    t1, t2 = MODALITIES.index("t1"), MODALITIES.index("t2")
    for c, d, field in ((case, cache, "images"), (msd, cache_msd, "channels")):
        path = cache_path(d, "c0")
        first = load_preprocessed(path)
        mapping = dict(getattr(c, field))
        mapping["t1"], mapping["t2"] = mapping["t2"], mapping["t1"]  # same files, swapped roles
        swapped = dataclasses.replace(c, **{field: mapping})
        before = _entry(path)
        assert cached_preprocess(swapped, PreprocessSettings(), d)[1] and _entry(path) != before
        again = load_preprocessed(path)  # each modality is normalised on its own: just swapped
        np.testing.assert_array_equal(again.image[t1], first.image[t2])
        np.testing.assert_array_equal(again.image[t2], first.image[t1])


def test_cache_rebuilds_when_the_code_version_changes(cached_case, monkeypatch):
    from tumorseg import preprocess

    case, _, cache, _ = cached_case
    before = _entry(cache_path(cache, "c0"))
    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", preprocess.PREPROCESS_VERSION + 1)
    path, rebuilt = cached_preprocess(case, PreprocessSettings(), cache)
    assert rebuilt and _entry(path) != before
    assert not cached_preprocess(case, PreprocessSettings(), cache)[1]


def test_cache_entry_of_an_older_version_is_rebuilt(cached_case):
    """An entry written with version 1's key (settings + sources only), as in existing
    ~/runs/*/cache folders: rebuilt, no error."""
    from tumorseg.preprocess import _sources, save_preprocessed

    case, _, cache, _ = cached_case
    path = cache_path(cache, "c0")
    old = load_preprocessed(path)
    save_preprocessed(old, path, {"version": 1, "case_id": "c0",
                                  "settings": PreprocessSettings().to_dict(),
                                  "sources": _sources(case)})
    before = _entry(path)
    assert cached_preprocess(case, PreprocessSettings(), cache)[1] and _entry(path) != before
    np.testing.assert_array_equal(load_preprocessed(path).image, old.image)


def test_n4_corrects_exactly_the_modalities_named():
    """A bias field on FLAIR only: with n4_modalities = ("flair",) the other channels equal the
    uncorrected pipeline's bit for bit and FLAIR's bias shrinks; unknown names are refused."""
    shape = (40, 40, 28)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = x**2 + y**2 + (z * 1.2) ** 2 < 0.8
    rng = np.random.default_rng(1)
    image = np.where(mask, 400.0 + rng.normal(0, 4, (4,) + shape), 0).astype(np.float32)
    image[3] *= np.exp(0.3 * x + 0.2 * y).astype(np.float32)
    plain = preprocess_arrays(image, None, PreprocessSettings(margin=2))
    fixed = preprocess_arrays(image, None, PreprocessSettings(
        n4=True, n4_shrink=2, n4_modalities=("flair",), margin=2))
    np.testing.assert_array_equal(fixed.image[:3], plain.image[:3])
    np.testing.assert_array_equal(fixed.mask, plain.mask)
    # Uniform tissue + noise: after correction FLAIR's left-right trend (z-score units) is gone.
    left, right = (x < -0.3)[plain.crop.slices], (x > 0.3)[plain.crop.slices]
    gap = [pre.image[3][pre.mask & right].mean() - pre.image[3][pre.mask & left].mean()
           for pre in (plain, fixed)]
    assert gap[0] > 1.0 and abs(gap[1]) < 0.5 * gap[0], gap
    with pytest.raises(ValueError, match="n4_modalities"):
        PreprocessSettings(n4=True, n4_modalities=("t1ce",))
    with pytest.raises(ValueError, match="n4_modalities"):
        PreprocessSettings(n4=True, n4_modalities=("t1", "t1"))


def test_cache_key_holds_n4_modalities_only_with_n4(cached_case):
    """Without N4 the modalities change nothing, so the entry is reused (and entries written
    before the setting existed stay valid); with N4 another choice rebuilds it."""
    from tumorseg.preprocess import _read_meta

    case, _, cache, _ = cached_case
    path = cache_path(cache, "c0")
    assert "n4_modalities" not in _read_meta(path)["settings"]  # the key written before it existed
    assert not cached_preprocess(case, PreprocessSettings(n4_modalities=("flair",)), cache)[1]
    assert cached_preprocess(case, PreprocessSettings(n4=True, n4_shrink=2), cache)[1]
    path, rebuilt = cached_preprocess(
        case, PreprocessSettings(n4=True, n4_shrink=2, n4_modalities=("flair",)), cache)
    assert rebuilt and load_preprocessed(path).settings.n4_modalities == ("flair",)


def test_preprocess_cli_n4_modalities(tmp_path, capsys):
    from tumorseg.cli import main

    write_phantom(make_phantom((32, 40, 24), seed=3, case_id="c0"), tmp_path / "data", "brats2017")
    for name, extra in (("plain", []), ("n4", ["--n4", "--n4-modalities", "flair"])):
        assert main(["preprocess", "-i", str(tmp_path / "data"), "-o", str(tmp_path / name),
                     "--workers", "1", "--no-progress", *extra]) == 0
    plain, n4 = (load_preprocessed(cache_path(tmp_path / n, "c0")) for n in ("plain", "n4"))
    assert n4.settings.n4 and n4.settings.n4_modalities == ("flair",)
    np.testing.assert_array_equal(n4.image[:3], plain.image[:3])
    assert not np.array_equal(n4.image[3], plain.image[3])
    for bad in (["--n4", "--n4-modalities", "t1ce"], ["--n4", "--n4-modalities", "t1", "t1"],
                ["--n4-modalities", "flair"]):
        assert main(["preprocess", "-i", str(tmp_path / "data"), "-o", str(tmp_path / "x"),
                     "--no-progress", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [
        "tumorseg: error: --n4-modalities: n4_modalities must be distinct names among ('t1', "
        "'t1c', 't2', 'flair'), got ('t1', 't1')",
        "tumorseg: error: --n4-modalities: names what --n4 corrects: add --n4"], err


def test_n4_fits_on_the_brains_box(monkeypatch):
    """N4 sees the cropped box (every voxel it corrects), not the whole volume."""
    from tumorseg import preprocess

    seen = []

    def spy(vol, mask, shrink, iterations):
        seen.append((vol.shape, mask.copy()))
        return vol

    monkeypatch.setattr(preprocess, "n4_correct", spy)
    ph = make_phantom((32, 40, 24), seed=0)
    image = np.stack([ph.images[m] for m in ("t1", "t1c", "t2", "flair")])
    pre = preprocess_arrays(image, None, PreprocessSettings(n4=True, margin=2))
    assert len(seen) == 2  # T1 and T1c
    for shape, mask in seen:
        assert shape == pre.mask.shape and shape != image.shape[1:]
        np.testing.assert_array_equal(mask, pre.mask)
