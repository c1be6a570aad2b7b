"""The segmentation pipeline end to end, on phantoms written in every layout.

An oracle model that is correct by construction (it answers each slice with the ground truth of
the preprocessed case) must give back the reference label file exactly: values, dtype, shape,
header geometry and label convention. A tiny real model checks crash safety in a subprocess.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SMALL_SHAPE, make_bad_dataset

from tumorseg import checkpoint, weights
from tumorseg.cli import main
from tumorseg.datasets import find_cases, load_case
from tumorseg.errors import TumorsegInputError
from tumorseg.labels import CLASS_NAMES, N_CLASSES, get_convention
from tumorseg.models import build_model, dense_padding
from tumorseg.phantom import make_phantom, write_phantom
from tumorseg.postprocess import PostprocessConfig
from tumorseg.preprocess import PreprocessSettings, preprocess_case
from tumorseg.segment import (SegmentOptions, files_case, segment_case, segment_cases,
                              select_part)

# Phantom tumours are ~2500 voxels with ~200 enhancing: thresholds that keep a correct answer.
SMALL_POST = PostprocessConfig(min_component_mm3=100, min_enhancing_mm3=20)
SMALL_POST_ARGS = ["--min-component", "100", "--min-enhancing", "20"]
SETTINGS = PreprocessSettings()


class OracleModel(torch.nn.Module):
    """Answers each zero-padded window with large one-hot logits of its ground truth.

    It knows the preprocessed image and canonical labels of some cases and recognises a window
    (inference runs each slice's brain box) by exact equality of its unpadded centre with a
    region of one of their axial slices.
    """

    receptive_field = patch_size = 33

    def __init__(self, cases):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that .to() and .eval() work
        self.known = []
        for case in cases:
            pre = preprocess_case(load_case(case), SETTINGS)
            for z in range(pre.image.shape[-1]):
                self.known.append((torch.from_numpy(np.ascontiguousarray(pre.image[..., z])),
                                   torch.from_numpy(pre.label[..., z].astype(np.int64))))
        self.calls = 0

    def _find(self, window: torch.Tensor) -> torch.Tensor:
        sx, sy = window.shape[-2:]
        for img, lab in self.known:
            for x0, y0 in torch.nonzero(img[0] == window[0, 0, 0]).tolist():
                if torch.equal(img[:, x0:x0 + sx, y0:y0 + sy], window):
                    return lab[x0:x0 + sx, y0:y0 + sy]
        raise AssertionError("oracle: window not found among the known cases")

    def forward(self, x):
        before, after = dense_padding(self.receptive_field)
        centre = x[:, :, before:x.shape[2] - after, before:x.shape[3] - after]
        out = [torch.nn.functional.one_hot(self._find(w), N_CLASSES).permute(2, 0, 1) * 50.0
               for w in centre]
        self.calls += 1
        return torch.stack(out).float()


def oracle(cases) -> tuple[torch.nn.Module, dict]:
    meta = {"format": checkpoint.FORMAT, "model": "oracle", "preprocess": SETTINGS.to_dict(),
            "convention": "brats2017", "receptive_field": 33}
    return OracleModel(cases), meta


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """A tiny real two_path model file in the format checkpoint.load_model reads."""
    torch.manual_seed(seed)
    options = {"local_maps": (4, 4), "global_maps": 6, "dropout": 0.0, "init": "default"}
    model = build_model("two_path", **options)
    payload = {**checkpoint.describe(model, "two_path", options), "preprocess": SETTINGS.to_dict(),
               "convention": "brats2017", "state_dict": model.state_dict()}
    return checkpoint.save(path, payload)


@pytest.fixture(scope="module")
def phantom_small():
    return make_phantom(SMALL_SHAPE, seed=0, case_id="ph_000")


# -- end to end, every layout --------------------------------------------------------------------

LAYOUT_FORMATS = [("brats2017", "nii.gz"), ("brats2023", "nii.gz"), ("msd", "nii.gz"),
                  ("brats2013", "mha")]


def _assert_same_file(out: Path, ref: Path) -> None:
    if out.name.endswith(".mha"):
        a, b = sitk.ReadImage(str(out)), sitk.ReadImage(str(ref))
        assert a.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSize() == b.GetSize()
        assert a.GetOrigin() == b.GetOrigin()
        assert a.GetSpacing() == b.GetSpacing()
        assert a.GetDirection() == b.GetDirection()
        return
    a, b = nib.load(str(out)), nib.load(str(ref))
    assert a.get_data_dtype() == np.uint8
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.header.get_zooms() == b.header.get_zooms()


@pytest.mark.parametrize("layout, fmt", LAYOUT_FORMATS)
def test_oracle_output_equals_reference_and_dice_is_one(tmp_path, phantom_small, capsys, layout,
                                                        fmt):
    root = tmp_path / "data"
    write_phantom(phantom_small, root, layout)
    (case,) = find_cases(root)
    out = tmp_path / "out"
    results, failures = segment_cases(oracle([case]), [case], out, SegmentOptions(postprocess=SMALL_POST))
    assert failures == []
    (res,) = results
    label_path = Path(res["labels"])
    assert label_path == out / f"ph_000.{fmt}"
    _assert_same_file(label_path, case.label)
    assert res["convention"] == layout and res["postprocess_changed"] == 0
    counts = np.bincount(load_case(case).label.ravel(), minlength=N_CLASSES)  # canonical
    assert res["voxels"] == dict(zip(CLASS_NAMES, counts.tolist()))
    assert (out / "labels.txt").is_file() and (out / "labels.ctbl").is_file()

    csv_path, json_path = tmp_path / "metrics.csv", tmp_path / "summary.json"
    rc = main(["evaluate", "--pred", str(out), "--ref", str(root), "-o", str(csv_path),
               "--json", str(json_path)])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["region"] for r in rows] == ["whole", "core", "enhancing"]
    assert all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 for r in rows)
    summary = json.loads(json_path.read_text())
    assert {region: summary[region]["dice"]["mean"] for region in summary} == {
        "whole": 1.0, "core": 1.0, "enhancing": 1.0}


def test_output_convention_and_format_can_be_chosen(tmp_path, phantom_small):
    root = tmp_path / "data"
    write_phantom(phantom_small, root, "brats2017")
    (case,) = find_cases(root)
    (res,), _ = segment_cases(oracle([case]), [case], tmp_path / "out", SegmentOptions(
        convention="brats2023", output_format="mha", postprocess=SMALL_POST))
    img = sitk.ReadImage(res["labels"])
    data = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    np.testing.assert_array_equal(data, get_convention("brats2023").decode(phantom_small.label))
    assert res["labels"].endswith("ph_000.mha") and res["convention"] == "brats2023"
    assert "ET" in (tmp_path / "out" / "labels.txt").read_text()


def test_probabilities_and_overlay(tmp_path, phantom_small):
    root = tmp_path / "data"
    write_phantom(phantom_small, root, "brats2017")
    (case,) = find_cases(root)
    res = segment_case(*oracle([case]), case, tmp_path / "out", SegmentOptions(
        probabilities=True, overlay=True, postprocess=PostprocessConfig(enabled=False)))
    img = nib.load(res["probabilities"])
    probs = np.asarray(img.dataobj)
    assert probs.shape == SMALL_SHAPE + (N_CLASSES,) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, probs.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(probs.argmax(-1), load_case(case).label)
    outside = phantom_small.images["t1"] == 0
    assert np.all(probs[outside] == (1, 0, 0, 0, 0))
    np.testing.assert_array_equal(img.affine, nib.load(str(case.images["t1"])).affine)
    png = Path(res["overlay"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_outside_brain_forced_to_background_and_postprocess_applied(tmp_path, phantom_small):
    """A model that says 'oedema' everywhere: outside the brain stays 0; inside, the one
    big component survives and no enhancing appears."""
    root = tmp_path / "data"
    write_phantom(phantom_small, root, "brats2017")
    (case,) = find_cases(root)

    class Oedema(torch.nn.Module):
        receptive_field = patch_size = 33

        def forward(self, x):
            logits = torch.zeros(x.shape[0], N_CLASSES, x.shape[2] - 32, x.shape[3] - 32)
            logits[:, 2] = 10.0
            return logits

    meta = {"preprocess": SETTINGS.to_dict()}
    res = segment_case(Oedema(), meta, case, tmp_path / "out")
    out = np.asarray(nib.load(res["labels"]).dataobj)
    brain = phantom_small.images["t1"] > 0
    np.testing.assert_array_equal(out, np.where(brain, 2, 0))


# -- batches --------------------------------------------------------------------------------------

def _phantom_root(tmp_path: Path, ids, layout="brats2017", shape=SMALL_SHAPE) -> Path:
    root = tmp_path / "data"
    for i, cid in enumerate(ids):
        write_phantom(make_phantom(shape, seed=i, case_id=cid), root, layout)
    return root


def test_batch_with_a_bad_case_reports_it_and_writes_the_good_one(tmp_path, monkeypatch, capsys):
    root = make_bad_dataset(tmp_path, "nan")
    write_phantom(make_phantom(SMALL_SHAPE, seed=3, case_id="good_001"), root, "brats2017")
    good = [c for c in find_cases(root) if c.case_id == "good_001"]
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": oracle(good))
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(root), "-o", str(out), "--no-progress", *SMALL_POST_ARGS])
    err = capsys.readouterr().err
    assert rc == 1
    assert (out / "good_001.nii.gz").is_file() and not (out / "bad_001.nii.gz").exists()
    (line,) = err.strip().splitlines()
    assert "bad_001" in line and "NaN" in line and "Traceback" not in err
    _assert_same_file(out / "good_001.nii.gz", good[0].label)


def test_num_parts_split_by_sorted_case_id(tmp_path, monkeypatch):
    root = _phantom_root(tmp_path, ["c_b", "c_a", "c_c"])
    cases = find_cases(root)
    assert [c.case_id for c in select_part(cases, 2, 0)] == ["c_a", "c_c"]
    assert [c.case_id for c in select_part(cases, 2, 1)] == ["c_b"]
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": oracle(cases))
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(root), "-o", str(out), "--num-parts", "2", "--part-id", "1",
               "--no-progress", *SMALL_POST_ARGS])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c_b.nii.gz"]
    assert main(["segment", "-i", str(root), "-o", str(out), "--num-parts", "2",
                 "--part-id", "2"]) == 2


def test_continue_skips_complete_cases_only(tmp_path):
    root = _phantom_root(tmp_path, ["c_a", "c_b"])
    cases = find_cases(root)
    model, meta = oracle(cases)
    out = tmp_path / "out"
    segment_cases((model, meta), cases[:1], out, SegmentOptions(postprocess=SMALL_POST))
    calls = model.calls
    logged = []
    results, _ = segment_cases((model, meta), cases, out, SegmentOptions(postprocess=SMALL_POST),
                               continue_=True, log=logged.append)
    assert [r["case_id"] for r in results] == ["c_b"]
    assert [line.split(":")[0] for line in logged] == ["case c_a", "case c_b"]
    assert "skipped" in logged[0]
    assert model.calls > calls
    # Asking for a further output makes a case incomplete again.
    results, _ = segment_cases((model, meta), cases, out, SegmentOptions(
        overlay=True, postprocess=SMALL_POST), continue_=True)
    assert [r["case_id"] for r in results] == ["c_a", "c_b"]


def test_explicit_files_case_id_and_run(tmp_path, phantom_small):
    folder = write_phantom(phantom_small, tmp_path / "data", "brats2017")
    files = {m: folder / f"ph_000_{t}.nii.gz" for m, t in
             (("t1", "t1"), ("t1c", "t1ce"), ("t2", "t2"), ("flair", "flair"))}
    case = files_case(**files)
    assert (case.case_id, case.layout, case.convention, case.label) == (
        "ph_000", "files", "brats2017", None)
    assert files_case("a/x-t1n.nii", "a/x-t1c.nii", "a/x-t2w.nii", "a/x-t2f.nii").case_id == "x"
    assert files_case("a/t1.mha", "b/c.mha", "d.mha", "e.mha").case_id == "t1"
    (ref_case,) = find_cases(folder)
    (res,), _ = segment_cases(oracle([ref_case]), [case], tmp_path / "out",
                              SegmentOptions(postprocess=SMALL_POST))
    _assert_same_file(Path(res["labels"]), ref_case.label)


# -- inference ------------------------------------------------------------------------------------

def test_predict_labels_matches_predict_volume_and_skips_empty_slices(tmp_path):
    from tumorseg.infer import predict_labels, predict_volume

    model, _ = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt")))
    image = np.random.default_rng(0).standard_normal((4, 20, 24, 6)).astype(np.float32)
    mask = np.ones((20, 24, 6), bool)
    mask[..., [0, 4]] = False  # two slices without brain
    labels, probs = predict_labels(model, image, mask, batch_size=3, probabilities=True)
    dense = predict_volume(model, image, batch_size=2)
    keep = [1, 2, 3, 5]
    np.testing.assert_array_equal(labels[..., keep], dense[..., keep].argmax(0))
    np.testing.assert_allclose(probs[..., keep, :], np.moveaxis(dense[..., keep], 0, -1),
                               atol=1e-3)
    assert labels.dtype == np.uint8 and probs.dtype == np.float16
    assert np.all(labels[..., [0, 4]] == 0) and np.all(probs[:, :, [0, 4]] == (1, 0, 0, 0, 0))
    labels_all, none = predict_labels(model, image, batch_size=4)
    assert none is None
    np.testing.assert_array_equal(labels_all, dense.argmax(0))


def test_class_weights_and_mirror_tta_match_an_independent_computation(tmp_path):
    from tumorseg.infer import predict_labels, predict_volume

    model, _ = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt", seed=3)))
    image = np.random.default_rng(1).standard_normal((4, 20, 24, 5)).astype(np.float32)
    mask = np.zeros((20, 24, 5), bool)
    mask[3:15, 5:21] = True  # boxes off-centre in x: the mirror is not the box's own mirror
    dense = predict_volume(model, image)
    mirrored = predict_volume(model, image[:, ::-1].copy())[:, ::-1]
    w = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    inside = mask
    labels, _ = predict_labels(model, image, mask, class_weights=w)
    expected = (dense * w[:, None, None, None]).argmax(0)
    np.testing.assert_array_equal(labels[inside], expected[inside])
    assert np.any(expected[inside] != dense.argmax(0)[inside])  # the weights changed something
    labels_tta, probs = predict_labels(model, image, mask, tta=True, probabilities=True)
    both = 0.5 * (dense + mirrored)
    np.testing.assert_array_equal(labels_tta[inside], both.argmax(0)[inside])
    np.testing.assert_allclose(probs[inside], np.moveaxis(both, 0, -1)[inside], atol=1e-3)


def test_three_views_average_whole_slice_inference_in_each_plane(tmp_path):
    """--views 3: the mean of the dense (whole-slice) probabilities of axial slices (z), coronal
    slices (y) and sagittal slices (x), each computed here on an explicitly transposed copy."""
    from tumorseg.infer import predict_labels, predict_volume

    model, _ = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt", seed=5)))
    image = np.random.default_rng(2).standard_normal((4, 14, 12, 10)).astype(np.float32)
    mask = np.zeros((14, 12, 10), bool)
    mask[2:12, 3:11, 1:9] = True
    axial = predict_volume(model, image)  # [5, X, Y, Z]
    coronal = predict_volume(model, image.transpose(0, 1, 3, 2).copy()).transpose(0, 1, 3, 2)
    sagittal = predict_volume(model, image.transpose(0, 2, 3, 1).copy()).transpose(0, 3, 1, 2)
    mean = (axial + coronal + sagittal) / 3
    assert np.any(mean.argmax(0)[mask] != axial.argmax(0)[mask])  # the views disagree somewhere
    labels, probs = predict_labels(model, image, mask, probabilities=True,
                                   planes=("axial", "coronal", "sagittal"))
    np.testing.assert_allclose(probs[mask], np.moveaxis(mean, 0, -1)[mask], atol=2e-3)
    close = np.sort(mean, 0)[-1] - np.sort(mean, 0)[-2] < 2e-3  # float16 ties may go either way
    np.testing.assert_array_equal(labels[mask & ~close], mean.argmax(0)[mask & ~close])
    assert labels.dtype == np.uint8 and probs.dtype == np.float16 and probs.shape == (14, 12, 10, 5)
    with pytest.raises(TumorsegInputError, match="planes"):
        predict_labels(model, image, mask, planes=("axial", "oblique"))
    with pytest.raises(TumorsegInputError, match="--views"):
        SegmentOptions(views=2)


@pytest.mark.parametrize("name", ["input_cascade", "local_cascade", "mf_cascade"])
def test_cascades_run_stage_by_stage_with_the_joint_forwards_result(name):
    """predict_labels runs a cascade's first CNN over every box, then its second: labels equal
    the joint dense forward's (predict_volume), and with --tta the mean of both mirrors'."""
    from tumorseg.infer import predict_labels, predict_volume

    torch.manual_seed(0)
    model = build_model(name, local_maps=(4, 4), global_maps=6, dropout=0.0, init="default").eval()
    image = np.random.default_rng(2).standard_normal((4, 22, 26, 5)).astype(np.float32)
    mask = np.zeros((22, 26, 5), bool)
    mask[4:17, 3:20, :4] = True
    labels, probs = predict_labels(model, image, mask, batch_size=2, probabilities=True)
    dense = predict_volume(model, image)
    np.testing.assert_array_equal(labels[mask], dense.argmax(0)[mask])
    np.testing.assert_allclose(probs[mask], np.moveaxis(dense, 0, -1)[mask], atol=1e-3)
    assert np.all(labels[..., 4] == 0)
    if name == "local_cascade":  # even receptive field: no mirror TTA
        with pytest.raises(TumorsegInputError, match="--tta"):
            predict_labels(model, image, mask, tta=True)
        return
    labels_tta, _ = predict_labels(model, image, mask, tta=True)
    mirrored = predict_volume(model, image[:, ::-1].copy())[:, ::-1]
    np.testing.assert_array_equal(labels_tta[mask], (dense + mirrored).argmax(0)[mask])


def test_validation_scores_what_segment_writes(tmp_path, phantom_small):
    """train.validate_cases (whole volumes) gives the Dice of segment's output files."""
    from tumorseg import metrics
    from tumorseg.segment import prepare_case
    from tumorseg.train import validate_cases

    case = find_cases(write_phantom(phantom_small, tmp_path / "data", "brats2017"))[0]
    model, meta = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt", seed=1)))
    post = PostprocessConfig()
    res = segment_case(model, meta, case, tmp_path / "out", SegmentOptions(postprocess=post))
    rows = metrics.evaluate_cases([(case.case_id, res["labels"], case.label)],
                                  get_convention("brats2017"))
    pre = prepare_case(case, meta).pre
    (scores,) = validate_cases(model, [pre], 0, "cpu")
    for row in rows:
        assert scores[row["region"]] == pytest.approx(row["dice"], abs=1e-12)
    assert scores["mean"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    assert 0 < scores["whole"] < 1  # an untrained model: a real, imperfect score


# -- model resolution -----------------------------------------------------------------------------

def test_resolve_model_paths_and_released_weights(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "tiny.pt")
    model, meta = weights.resolve_model(str(path))
    assert meta["model"] == "two_path" and meta["path"] == str(path) and not model.training

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    with pytest.raises(TumorsegInputError, match=r"not installed.*--model PATH"):
        weights.resolve_model(None)  # the default released model is absent
    with pytest.raises(TumorsegInputError, match="neither a released model"):
        weights.resolve_model("two_pth")

    released = tmp_path / "weights" / "two_path.pt"
    released.write_bytes(path.read_bytes())
    with pytest.raises(TumorsegInputError, match="no sha256"):
        weights.resolve_model("two_path")
    index = tmp_path / "weights" / "index.json"
    index.write_text(json.dumps({"two_path": {"file": "two_path.pt", "sha256": "0" * 64}}))
    with pytest.raises(TumorsegInputError, match="does not match"):
        weights.resolve_model("two_path")
    digest = hashlib.sha256(released.read_bytes()).hexdigest()
    index.write_text(json.dumps({"two_path": {"file": "two_path.pt", "sha256": digest}}))
    model, meta = weights.resolve_model("two_path")
    assert meta["released"] == "two_path"


# -- crash safety ---------------------------------------------------------------------------------

def _run(args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, "-m", "tumorseg.cli", "segment", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_sigkill_then_continue_equals_uninterrupted_run(tmp_path):
    ids = [f"k_{i}" for i in range(3)]
    root = _phantom_root(tmp_path, ids, shape=(40, 44, 24))
    model = write_tiny_model(tmp_path / "tiny.pt")
    common = ["-i", str(root), "--model", str(model), "--probabilities", "--overlay",
              "--no-progress", "--device", "cpu"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    proc = _run([*common, "-o", str(killed)])
    first = killed / f"{ids[0]}.nii.gz"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert first.exists(), "the run never finished its first case"
    done = [cid for cid in ids if (killed / f"{cid}.nii.gz").exists()]
    assert done != ids, "the run finished before it was killed: nothing was tested"
    for path in killed.glob("*.nii.gz"):  # nothing partial under a final name
        np.asarray(nib.load(str(path)).dataobj)
    for cid in done:  # the label map comes last: a finished case has every output
        assert (killed / f"{cid}_probabilities.nii.gz").exists()
        assert (killed / f"{cid}.png").exists()

    resumed = _run([*common, "-o", str(killed), "--continue"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert out.decode().count("skipped (--continue)") == len(done)
    full = _run([*common, "-o", str(reference)])
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err.decode()

    got, want = _files(killed), _files(reference)
    assert sorted(got) == sorted(want)
    # labels, probabilities, png per case; colour tables; volumes.csv
    assert len(want) == 3 * len(ids) + 3
    assert [n for n in got if got[n] != want[n]] == []
    assert [p.name for p in killed.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_model_files_postprocessing_is_the_default(tmp_path, phantom_small):
    """SegmentOptions(postprocess=None) uses the model file's own settings; explicit ones win."""
    case = find_cases(write_phantom(phantom_small, tmp_path / "data", "brats2017"))[0]
    model, meta = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt", seed=1)))
    off = PostprocessConfig(enabled=False)
    runs = {}
    for name, stored, given in (("stored_off", off, None), ("given_off", None, off),
                                ("default", None, None), ("given_on", off, PostprocessConfig())):
        m = dict(meta)
        m.pop("postprocess", None)
        if stored is not None:
            m["postprocess"] = stored.to_dict()
        res = segment_case(model, m, case, tmp_path / name, SegmentOptions(postprocess=given))
        runs[name] = (np.asarray(nib.load(res["labels"]).dataobj), res["postprocess_changed"])
    assert runs["default"][1] > 0  # the defaults change this untrained model's labels
    np.testing.assert_array_equal(runs["stored_off"][0], runs["given_off"][0])
    assert runs["stored_off"][1] == runs["given_off"][1] == 0
    np.testing.assert_array_equal(runs["given_on"][0], runs["default"][0])


def test_cli_postprocessing_flags_replace_the_models_fields(tmp_path, phantom_small):
    """--min-enhancing alone keeps the model file's component threshold."""
    from tumorseg.segment import _postprocess_config

    meta = {"postprocess": PostprocessConfig(min_component_mm3=7.0, min_enhancing_mm3=3.0).to_dict()}
    got = _postprocess_config(SegmentOptions(postprocess={"min_enhancing_mm3": 9.0}), meta)
    assert got == PostprocessConfig(min_component_mm3=7.0, min_enhancing_mm3=9.0)
    assert _postprocess_config(SegmentOptions(postprocess={"enabled": False}), {}) == \
        PostprocessConfig(enabled=False)


def test_cli_max_oedema_distance_removes_far_oedema(tmp_path, phantom_small, monkeypatch):
    """--max-oedema-distance reaches post-processing: the oracle's written oedema is kept exactly
    where a brute-force nearest-core distance (KD-tree, mm) is within the limit."""
    from scipy.spatial import cKDTree

    root = tmp_path / "data"
    write_phantom(phantom_small, root, "brats2017")
    (case,) = find_cases(root)
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": oracle([case]))
    img = nib.load(str(case.label))
    ref = np.asarray(img.dataobj).astype(np.uint8)  # brats2017: 1 NCR/NET, 2 ED, 4 ET
    mm = np.stack(np.nonzero(np.ones(ref.shape, bool)), 1) * np.asarray(img.header.get_zooms()[:3])
    dist = cKDTree(mm[np.isin(ref, (1, 4)).ravel()]).query(mm)[0].reshape(ref.shape)
    steps = np.unique(dist[ref == 2])
    limit = float(steps[len(steps) // 2:][:2].mean())  # between two distances: no ties
    expect = np.where((ref == 2) & (dist > limit), 0, ref)
    assert 0 < np.count_nonzero(expect != ref) < np.count_nonzero(ref == 2)
    out = tmp_path / "out"
    assert main(["segment", "-i", str(root), "-o", str(out), "--no-progress", *SMALL_POST_ARGS,
                 "--max-oedema-distance", f"{limit:.6f}"]) == 0
    got = np.asarray(nib.load(str(out / "ph_000.nii.gz")).dataobj)
    np.testing.assert_array_equal(got, expect)


def test_volumes_csv_counts_continue_and_parts(tmp_path):
    """volumes.csv: mL from an independent voxel count on an anisotropic grid; rows kept across
    --continue and --num-parts runs; a missing row is rebuilt from the label map."""
    root = tmp_path / "data"
    for seed in (0, 1, 2):
        write_phantom(make_phantom((40, 44, 28), spacing=(1.0, 1.5, 2.0), seed=seed), root,
                      "brats2017", case_id=f"case_{seed}")
    cases = find_cases(root)
    model, meta = weights.resolve_model(str(write_tiny_model(tmp_path / "tiny.pt", seed=1)))
    out = tmp_path / "out"
    opts = SegmentOptions(postprocess=SMALL_POST)
    for part in (0, 1):
        segment_cases((model, meta), cases, out, opts, num_parts=2, part_id=part)

    def table():
        with open(out / "volumes.csv", newline="") as fh:
            return {r["case_id"]: r for r in csv.DictReader(fh)}

    rows = table()
    assert sorted(rows) == ["case_0", "case_1", "case_2"]
    for cid, row in rows.items():
        labels = np.asarray(nib.load(str(out / f"{cid}.nii.gz")).dataobj)
        mm3 = 1.0 * 1.5 * 2.0
        for region, values in (("whole", (1, 2, 4)), ("core", (1, 4)), ("enhancing", (4,))):
            expect = np.isin(labels, values).sum() * mm3 / 1000
            assert float(row[f"{region}_ml"]) == pytest.approx(expect, abs=1e-6)
        for value in (1, 2, 4):
            assert int(row[f"voxels_{value}"]) == int((labels == value).sum())
        assert row["convention"] == "brats2017"
    # Drop a row: --continue skips the case but writes its row again from the label map.
    kept = {k: v for k, v in rows.items() if k != "case_1"}
    with open(out / "volumes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows["case_0"]))
        w.writeheader()
        w.writerows(kept.values())
    stale = out / ".volumes.csv.x1y2z3.tmp.csv"  # as a run killed inside atomic_write leaves it
    stale.write_text("case_id\ntrunc")
    results, _ = segment_cases((model, meta), cases, out, opts, continue_=True)
    assert results == [] and table() == rows
    assert not stale.exists()

    # A hand-edited table with a stray column: that column is dropped, the rows are kept.
    with open(out / "volumes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows["case_0"]) + ["voxels_x"])
        w.writeheader()
        w.writerows({**r, "voxels_x": "?"} for r in rows.values())
    (out / "case_2.nii.gz").unlink()
    results, failures = segment_cases((model, meta), cases, out, opts, continue_=True)
    assert [r["case_id"] for r in results] == ["case_2"] and not failures
    assert table() == rows
    # A table that cannot be written: the case is still segmented, with a warning.
    (out / "volumes.csv").unlink()
    (out / "volumes.csv").mkdir()
    (out / "case_2.nii.gz").unlink()
    results, failures = segment_cases((model, meta), cases, out, opts, continue_=True)
    assert not failures and (out / "case_2.nii.gz").is_file()
    assert any("volumes.csv not updated" in w for w in results[0]["warnings"])


def test_evaluate_rows_carry_region_volumes(tmp_path):
    from tumorseg import metrics
    from tumorseg.labels import get_convention

    rng = np.random.default_rng(0)
    ref = rng.choice([0, 1, 2, 4], size=(12, 10, 8)).astype(np.uint8)
    pred = np.where(rng.random(ref.shape) < 0.3, 0, ref).astype(np.uint8)
    aff = np.diag([0.5, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(ref, aff), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(pred, aff), str(tmp_path / "pred.nii.gz"))
    rows = metrics.evaluate_cases([("c", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")],
                                  get_convention("brats2017"))
    for row in rows:
        values = {"whole": (1, 2, 4), "core": (1, 4), "enhancing": (4,)}[row["region"]]
        assert row["pred_ml"] == pytest.approx(np.isin(pred, values).sum() * 3.0 / 1000)
        assert row["ref_ml"] == pytest.approx(np.isin(ref, values).sum() * 3.0 / 1000)
