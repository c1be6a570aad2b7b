"""The Python API (tumorseg.api) against the CLI's pipeline, and the README's example."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import tumorseg
from tumorseg.phantom import make_phantom, write_phantom
from tumorseg.segment import SegmentOptions, segment_cases

ROOT = Path(__file__).parents[1]


@pytest.fixture
def tiny(tmp_path):
    from test_segment import write_tiny_model

    return tumorseg.load_model(write_tiny_model(tmp_path / "tiny.pt", seed=1))


def test_segment_case_equals_the_cli_pipeline(tmp_path, tiny):
    ph = make_phantom((40, 44, 28), spacing=(1.0, 1.0, 2.0), seed=3)
    folder = write_phantom(ph, tmp_path / "data", "brats2017")
    root = folder.parent
    seg = tumorseg.segment_case(folder, tiny)
    segment_cases((tiny.network, tiny.meta), tumorseg.find_cases(root), tmp_path / "cli",
                  SegmentOptions())
    written = nib.load(str(tmp_path / "cli" / f"{ph.case_id}.nii.gz"))
    np.testing.assert_array_equal(seg.labels, np.asarray(written.dataobj))
    np.testing.assert_allclose(seg.affine, written.affine)
    assert seg.labels.shape == ph.label.shape and seg.convention == "brats2017"
    # Volumes: an independent count at 2 mm^3 per voxel.
    assert seg.volumes["whole_ml"] == pytest.approx(np.count_nonzero(seg.labels) * 2 / 1000)
    assert seg.volumes["enhancing_ml"] == pytest.approx(np.count_nonzero(seg.labels == 4) * 0.002)
    assert seg.volumes["voxels_2"] == np.count_nonzero(seg.labels == 2)
    # out_dir: the same labels, written; the files are reported.
    seg2 = tumorseg.segment_case(folder, tiny, out_dir=tmp_path / "api",
                                 options=SegmentOptions(probabilities=True))
    np.testing.assert_array_equal(seg2.labels, seg.labels)
    assert Path(seg2.files["labels"]).is_file() and seg2.probabilities.shape == ph.label.shape + (5,)
    np.testing.assert_allclose(seg2.probabilities.sum(-1), 1.0, atol=2e-3)


def test_segment_case_from_explicit_files(tmp_path, tiny):
    ph = make_phantom((40, 44, 28), seed=4)
    folder = write_phantom(ph, tmp_path / "data", "brats2017")
    files = {m: next(folder.glob(f"*_{suffix}.nii.gz"))
             for m, suffix in (("t1", "t1"), ("t1c", "t1ce"), ("t2", "t2"), ("flair", "flair"))}
    a = tumorseg.segment_case(files, tiny)
    b = tumorseg.segment_case(folder, tiny)
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(tumorseg.TumorsegInputError, match="missing flair"):
        tumorseg.segment_case({k: v for k, v in files.items() if k != "flair"}, tiny)
    write_phantom(make_phantom((40, 44, 28), seed=5), tmp_path / "data", "brats2017",
                  case_id="second")
    with pytest.raises(tumorseg.TumorsegInputError, match="holds 2 cases"):
        tumorseg.segment_case(tmp_path / "data", tiny)


def test_evaluate_against_independent_dice(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.choice([0, 1, 2, 4], size=(20, 20, 10), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
    pred = ref.copy()
    pred[:5] = 0
    scores = tumorseg.evaluate(pred, ref)
    for region, values in (("whole", (1, 2, 4)), ("core", (1, 4)), ("enhancing", (4,))):
        p, r = np.isin(pred, values), np.isin(ref, values)
        assert scores[region]["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
    # Files: the reference header's spacing is used.
    nib.save(nib.Nifti1Image(ref, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "ref.nii.gz"))
    from_file = tumorseg.evaluate(pred, tmp_path / "ref.nii.gz")
    assert from_file["whole"]["hd95"] == pytest.approx(2 * scores["whole"]["hd95"])
    with pytest.raises(tumorseg.TumorsegInputError, match="outside"):
        tumorseg.evaluate(np.full_like(ref, 7), ref)


def test_readme_python_example_runs(shared_data, monkeypatch, capsys):
    """The README's Python block, run as written from the repository root."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"README-python-example.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(ROOT)
    if not (ROOT / "../shared/data/brats2018").is_dir():
        pytest.skip("the README's example reads ../shared/data/brats2018")
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "(240, 240, 155) brats2017"
    dice = eval(lines[2])
    assert set(dice) == {"whole", "core", "enhancing"} and dice["whole"] > 0.7
