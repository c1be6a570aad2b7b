"""find_cases / load_case over every layout: exact round trips of a phantom, and real data."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from tumorseg.datasets import DEFAULT_CONVENTION, LAYOUTS, MODALITIES, find_cases, load_case
from tumorseg.errors import TumorsegInputError
from tumorseg.io import read_volume, write_volume
from tumorseg.labels import CONVENTIONS
from tumorseg.phantom import make_phantom, write_phantom

SHAPE = (48, 56, 32)


def _rounded(ph) -> np.ndarray:
    """The phantom's images as written (int16) and read back: (4, x, y, z) float32."""
    stacked = np.stack([np.round(ph.images[m]).astype(np.int16) for m in MODALITIES])
    return stacked.astype(np.float32)


def _expected_label(ph, convention: str) -> np.ndarray:
    conv = CONVENTIONS[convention]
    return conv.encode(conv.decode(ph.label))  # merged classes (1 and 3) come back as 1


@pytest.fixture(scope="module")
def ph():
    return make_phantom(SHAPE, seed=0)


@pytest.fixture(scope="module")
def written(ph, tmp_path_factory):
    """layout -> dataset root holding the phantom as case 'phantom_000'."""
    base = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        write_phantom(ph, base / layout, layout)
    return {layout: base / layout for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(ph, written, layout):
    (case,) = find_cases(written[layout])
    assert case.case_id == "phantom_000"
    assert case.layout == layout
    assert case.convention == DEFAULT_CONVENTION[layout]
    loaded = load_case(case)
    assert loaded.image.dtype == np.float32 and loaded.image.shape == (4, *SHAPE)
    np.testing.assert_array_equal(loaded.image, _rounded(ph))
    assert loaded.label.dtype == np.uint8
    np.testing.assert_array_equal(loaded.label, _expected_label(ph, case.convention))
    assert np.allclose(loaded.reference.affine, ph.affine, atol=1e-5)
    assert loaded.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_brats2013_keeps_all_five_classes(ph, written):
    (case,) = find_cases(written["brats2013"])
    np.testing.assert_array_equal(load_case(case).label, ph.label)  # no merged labels


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_written_against_reference_is_3d_in_input_space(ph, written, layout, tmp_path):
    loaded = load_case(find_cases(written[layout])[0])
    out = tmp_path / ("pred.mha" if layout == "brats2013" else "pred.nii.gz")
    write_volume(out, loaded.label, loaded.reference)  # 3-D data, maybe a 4-D reference
    back = read_volume(out)
    assert back.data.shape == SHAPE
    np.testing.assert_array_equal(back.data, loaded.label)
    assert np.allclose(back.affine, ph.affine, atol=1e-5)


def test_file_names_per_layout(written):
    names = {}
    for lay in LAYOUTS:
        names[lay] = {m: p.name for m, p in find_cases(written[lay])[0].images.items()}
    assert names["brats2017"] == {
        "t1": "phantom_000_t1.nii.gz", "t1c": "phantom_000_t1ce.nii.gz",
        "t2": "phantom_000_t2.nii.gz", "flair": "phantom_000_flair.nii.gz",
    }  # fmt: skip
    assert names["brats2023"] == {
        "t1": "phantom_000-t1n.nii.gz", "t1c": "phantom_000-t1c.nii.gz",
        "t2": "phantom_000-t2w.nii.gz", "flair": "phantom_000-t2f.nii.gz",
    }  # fmt: skip
    assert names["nnunet"] == {
        "flair": "phantom_000_0000.nii.gz", "t1": "phantom_000_0001.nii.gz",
        "t1c": "phantom_000_0002.nii.gz", "t2": "phantom_000_0003.nii.gz",
    }  # fmt: skip
    msd = find_cases(written["msd"])[0]
    assert set(names["msd"].values()) == {"phantom_000.nii.gz"}
    assert msd.channels == {"flair": 0, "t1": 1, "t1c": 2, "t2": 3}
    assert nib.load(str(msd.images["t1"])).shape == (*SHAPE, 4)


def test_brats2013_tokens_are_matched_exactly(written, tmp_path):
    (case,) = find_cases(written["brats2013"])
    assert ".MR_T1." in case.images["t1"].name and ".MR_T1c." in case.images["t1c"].name
    assert ".OT." in case.label.name and "3more" in case.label.name
    # Without MR_T1, MR_T1c must not be taken for it (a substring match would).
    root = shutil.copytree(written["brats2013"], tmp_path / "no_t1")
    shutil.rmtree(root / "phantom_000" / case.images["t1"].parent.name)
    with pytest.raises(TumorsegInputError, match=r"missing modality t1: no file .*\.MR_T1\.<n>"):
        find_cases(root)


def test_brats2013_repeated_folder_names_get_qualified_ids(ph, tmp_path):
    for grade in ("HG", "LG"):
        write_phantom(ph, tmp_path / grade, "brats2013", case_id="0001")
    assert [c.case_id for c in find_cases(tmp_path)] == ["HG_0001", "LG_0001"]


def test_nested_hgg_lgg_tree_sorted_and_hidden_files_ignored(ph, tmp_path):
    for grade, cid in [("HGG", "Brats18_B_1"), ("HGG", "Brats18_A_1"), ("LGG", "Brats18_C_1")]:
        write_phantom(ph, tmp_path / "train" / grade, "brats2017", case_id=cid)
    (tmp_path / "train" / "HGG" / "Brats18_A_1" / "._Brats18_A_1_t1.nii.gz").write_bytes(b"mac")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Brats18_A_1", "Brats18_B_1", "Brats18_C_1"]
    assert cases[2].images["flair"] == tmp_path / "train/LGG/Brats18_C_1/Brats18_C_1_flair.nii.gz"
    assert all(c.layout == "brats2017" and c.label is not None for c in cases)


@pytest.mark.parametrize("layout", ["brats2013", "brats2017", "brats2023"])
def test_single_case_folder_as_root(ph, written, layout):
    (case,) = find_cases(written[layout] / "phantom_000")
    assert case.case_id == "phantom_000" and case.layout == layout


def test_uncompressed_nii_and_missing_label(ph, tmp_path):
    case_dir = tmp_path / "c1"
    case_dir.mkdir()
    for m, tok in {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}.items():
        nib.save(nib.Nifti1Image(ph.images[m], ph.affine), str(case_dir / f"c1_{tok}.nii"))
    (case,) = find_cases(tmp_path)
    assert case.label is None and case.images["t1c"].name == "c1_t1ce.nii"
    loaded = load_case(case)
    assert loaded.label is None
    np.testing.assert_array_equal(loaded.image[3], ph.images["flair"])


def test_ambiguous_layout_asks_for_layout(ph, tmp_path):
    write_phantom(ph, tmp_path, "brats2017", case_id="a")
    write_phantom(ph, tmp_path, "brats2023", case_id="b")
    with pytest.raises(TumorsegInputError, match="ambiguous layout.*--layout"):
        find_cases(tmp_path)
    (case,) = find_cases(tmp_path, layout="brats2023")
    assert (case.case_id, case.layout, case.convention) == ("b", "brats2023", "brats2023")


def test_layout_and_labels_overrides(written):
    (case,) = find_cases(written["brats2017"], layout="brats2017", labels="brats2013")
    assert case.convention == "brats2013"  # the file values {0,1,2,4} are valid brats2013 too
    with pytest.raises(TumorsegInputError, match="no cases found.*msd"):
        find_cases(written["brats2017"], layout="msd")
    with pytest.raises(TumorsegInputError, match="unknown layout 'brats2099'"):
        find_cases(written["brats2017"], layout="brats2099")
    with pytest.raises(TumorsegInputError, match="unknown label convention 'brats'"):
        find_cases(written["brats2017"], labels="brats")


def test_nnunet_channel_order_from_dataset_json(ph, written, tmp_path):
    root = shutil.copytree(written["nnunet"], tmp_path / "nn")
    images = root / "imagesTr"
    # Reorder the files to T1, T1c, T2, FLAIR and say so in dataset.json.
    old = {"flair": 0, "t1": 1, "t1c": 2, "t2": 3}
    new = {"t1": 0, "t1c": 1, "t2": 2, "flair": 3}
    for m in MODALITIES:
        (images / f"phantom_000_{old[m]:04d}.nii.gz").rename(images / f"x_{m}")
    for m in MODALITIES:
        (images / f"x_{m}").rename(images / f"phantom_000_{new[m]:04d}.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T1ce", "2": "t2w", "3": "Flair"}
    (root / "dataset.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_case(find_cases(root)[0]).image, _rounded(ph))
    # Without dataset.json the documented default order applies: 0000 is FLAIR.
    (root / "dataset.json").unlink()
    assert find_cases(root)[0].images["flair"].name == "phantom_000_0000.nii.gz"


def test_msd_channel_order_from_dataset_json(written, tmp_path):
    root = shutil.copytree(written["msd"], tmp_path / "msd")
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2w", "1": "T1w", "2": "t1gd", "3": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert find_cases(root)[0].channels == {"t2": 0, "t1": 1, "t1c": 2, "flair": 3}
    meta["modality"] = {"0": "T2w", "1": "T1w", "2": "DWI", "3": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(TumorsegInputError, match="dataset.json: channel names"):
        find_cases(root)


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_msd_and_nnunet_without_labels(written, tmp_path, layout):
    root = shutil.copytree(written[layout], tmp_path / layout)
    shutil.rmtree(root / "labelsTr")
    (case,) = find_cases(root)
    assert case.label is None and load_case(case).label is None


def test_images_folder_as_root(written):
    (case,) = find_cases(written["msd"] / "imagesTr")
    assert case.label == written["msd"] / "labelsTr" / "phantom_000.nii.gz"


# --- real data -------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.slow
def test_real_brats2018_cases(shared_data):
    with open(shared_data / "cases.csv", newline="") as fh:
        table = {row["case_id"]: row for row in csv.DictReader(fh)}
    cases = find_cases(shared_data)
    assert len(cases) == 24
    assert [c.case_id for c in cases] == sorted(table)
    for case in cases:
        assert (case.layout, case.convention) == ("brats2017", "brats2017")
        seg = nib.load(str(case.label))  # labels only: loading 4 modalities x 24 is slow
        assert seg.shape == (240, 240, 155)
        counts = np.bincount(np.asarray(seg.dataobj).astype(np.int64).ravel(), minlength=5)
        assert counts[3] == 0 and set(np.flatnonzero(counts)) == {0, 1, 2, 4}, case.case_id
        row = table[case.case_id]
        assert counts[1] == int(row["voxels_label1_ncr_net"]), case.case_id
        assert counts[2] == int(row["voxels_label2_edema"]), case.case_id
        assert counts[4] == int(row["voxels_label4_enhancing"]), case.case_id
    loaded = load_case(cases[0])
    assert loaded.image.shape == (4, 240, 240, 155)
    assert loaded.spacing == (1.0, 1.0, 1.0)
    assert set(np.unique(loaded.label)) == {0, 1, 2, 4}
    expected = int(table[cases[0].case_id]["voxels_label1_ncr_net"])
    assert np.count_nonzero(loaded.label == 1) == expected


# -- dataset.json labels (nnU-Net / MSD) -----------------------------------------------------------

def _relabel_dataset(root, labels: dict, convention: str, phantom) -> None:
    """Rewrite dataset.json's labels and every label map in `convention`'s file values."""
    import json

    from tumorseg.io import Volume, write_volume
    from tumorseg.labels import CONVENTIONS

    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(meta))
    ref = Volume(phantom.label, phantom.affine, phantom.spacing, root)
    for path in (root / "labelsTr").glob("*.nii.gz"):
        write_volume(path, CONVENTIONS[convention].decode(phantom.label), ref)


@pytest.mark.parametrize("labels, convention", [
    ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, "brats2023"),
    ({"background": 0, "NCR": 1, "ED": 2, "ET": 4}, "brats2017"),
    ({"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, "msd"),
])
def test_nnunet_labels_come_from_dataset_json(tmp_path, labels, convention):
    from tumorseg.phantom import make_phantom, write_phantom

    ph = make_phantom((32, 32, 16), seed=0, case_id="c0")
    root = write_phantom(ph, tmp_path, "nnunet")
    _relabel_dataset(root, labels, convention, ph)
    from tumorseg.labels import CONVENTIONS

    (case,) = find_cases(root)
    assert case.convention == convention
    conv = CONVENTIONS[convention]  # canonical classes back, as the convention can hold them
    np.testing.assert_array_equal(load_case(case).label, conv.encode(conv.decode(ph.label)))


def test_unknown_dataset_json_labels_are_refused(tmp_path):
    from tumorseg.phantom import make_phantom, write_phantom

    ph = make_phantom((32, 32, 16), seed=0, case_id="c0")
    root = write_phantom(ph, tmp_path, "nnunet")
    _relabel_dataset(root, {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                            "enhancing tumor": 3}, "msd", ph)
    with pytest.raises(TumorsegInputError, match="dataset.json.*region lists"):
        find_cases(root)
    _relabel_dataset(root, {"background": 0, "tumour": 1, "cyst": 2, "bleed": 3}, "msd", ph)
    with pytest.raises(TumorsegInputError, match="no known convention"):
        find_cases(root)
    (case,) = find_cases(root, labels="msd")  # --labels overrides dataset.json
    assert case.convention == "msd"


def _loaded_phantom(tmp_path, edit=None):
    from tumorseg.datasets import load_case
    from tumorseg.phantom import make_phantom, write_phantom

    ph = make_phantom((48, 56, 32), seed=0)
    if edit is not None:
        edit(ph)
    return load_case(find_cases(write_phantom(ph, tmp_path / "d", "brats2017"))[0])


def test_input_warnings_quiet_on_brats_like_input(tmp_path, shared_data):
    from tumorseg.datasets import input_warnings, load_case

    assert input_warnings(_loaded_phantom(tmp_path)) == []
    real = [c for c in find_cases(shared_data) if c.case_id == "Brats18_CBICA_ALU_1"]
    assert input_warnings(load_case(real[0])) == []


def test_input_warnings_name_unstripped_and_misregistered_input(tmp_path):
    from tumorseg.datasets import input_warnings

    def noisy_background(ph):  # an unstripped scan: noise everywhere outside the head
        rng = np.random.default_rng(0)
        for m, img in ph.images.items():
            ph.images[m] = np.where(img == 0, rng.integers(1, 20, img.shape), img)

    (msg,) = input_warnings(_loaded_phantom(tmp_path / "a", noisy_background))
    assert "does not look skull-stripped" in msg and "100% of the border" in msg

    def shifted_flair(ph):  # FLAIR moved by 12 voxels: not co-registered
        ph.images["flair"] = np.roll(ph.images["flair"], 12, axis=0)

    (msg,) = input_warnings(_loaded_phantom(tmp_path / "b", shifted_flair))
    assert "flair overlaps T1's poorly" in msg


def test_read_ahead_is_claimed_once_with_huge_pages_off_and_can_be_discarded(written, monkeypatch):
    """load_case takes the background read of an equal case (one read, the same arrays); a
    discarded or claimed read-ahead is not reused; numpy's huge pages are off before it reads."""
    import threading

    import tumorseg.datasets as ds

    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        from numpy.core.multiarray import _set_madvise_hugepage
    before = _set_madvise_hugepage(True)
    reads = []
    real = ds._load_case
    monkeypatch.setattr(ds, "_load_case", lambda case: reads.append(case.case_id) or real(case))
    try:
        (case,) = find_cases(written["brats2017"])
        ds.read_ahead(case)
        assert _set_madvise_hugepage(True) is False  # read_ahead switched them off
        first = ds.load_case(case)
        second = ds.load_case(case)  # claimed already: read again
        assert reads == [case.case_id, case.case_id]
        np.testing.assert_array_equal(first.image, second.image)
        ds.read_ahead(case)
        ds.discard_read_ahead()
        ds.load_case(case)
        for thread in threading.enumerate():
            if thread.name.startswith("tumorseg-read-ahead"):
                thread.join()
        assert len(reads) == 4  # the discarded read ran, and load_case read anew
    finally:
        _set_madvise_hugepage(before)
        ds.discard_read_ahead()
