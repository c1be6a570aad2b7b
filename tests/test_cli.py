"""The `tumorseg` command: exit codes and messages, in-process via cli.main (one subprocess test
proves that no traceback reaches the terminal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD_CASE, BAD_EXPECT, BAD_KINDS, SMALL_SHAPE, make_bad_dataset
from test_segment import SMALL_POST_ARGS, oracle, write_tiny_model

from tumorseg import weights
from tumorseg.cli import main
from tumorseg.datasets import find_cases
from tumorseg.phantom import make_phantom, write_phantom

# Kinds whose four image files exist, so that they can be passed as --t1 --t1c --t2 --flair.
FILE_KINDS = ["shape_mismatch", "affine_mismatch", "image_2d", "image_5d", "nan", "inf",
              "all_zero", "truncated_gzip", "corrupt_gzip"]
BRATS2017_FILES = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
# Kinds whose only fault is the ground truth: segment does not need it (see below).
LABEL_KINDS = ["label_out_of_range", "label_non_integer"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tumorseg: error: ")
    return lines[0]


def _file_args(root: Path) -> list[str]:
    folder = root / BAD_CASE
    args = []
    for m, token in BRATS2017_FILES.items():
        args += [f"--{m}", str(folder / f"{BAD_CASE}_{token}.nii.gz")]
    return args


def _single_input(root: Path, kind: str) -> list[str]:
    """-i for a case folder (brats2017 kinds) or the dataset root (msd, empty, missing)."""
    if kind in ("msd_3_channels", "empty_folder", "missing_folder"):
        return ["-i", str(root)]
    return ["-i", str(root / BAD_CASE)]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_preprocess_reports_a_bad_case(tmp_path, capsys, kind):
    root = make_bad_dataset(tmp_path, kind)
    rc = main(["preprocess", "-i", str(root), "-o", str(tmp_path / "cache"), "--workers", "1",
               "--no-progress"])
    err = capsys.readouterr().err
    name, rule = BAD_EXPECT[kind]
    whole_input_bad = kind in ("empty_folder", "missing_folder")
    assert rc == (2 if whole_input_bad else 1)
    line = _one_error_line(err)
    assert name in line and rule in line


@pytest.mark.parametrize("kind", [k for k in BAD_KINDS if k not in LABEL_KINDS])
def test_segment_single_bad_case_folder_exits_2(tmp_path, capsys, tiny_model, kind):
    root = make_bad_dataset(tmp_path, kind)
    out = tmp_path / "out"
    rc = main(["segment", *_single_input(root, kind), "-o", str(out), "--model", str(tiny_model),
               "--no-progress"])
    name, rule = BAD_EXPECT[kind]
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert name in line and rule in line
    assert not out.exists() or not list(out.glob("*.nii.gz"))


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_segment_single_case_with_a_bad_ground_truth_is_segmented(tmp_path, capsys, tiny_model,
                                                                  kind):
    """The ground truth is only drawn in the overlay: a bad one is a warning there, never an
    error that stops the case."""
    root = make_bad_dataset(tmp_path, kind)
    name, rule = BAD_EXPECT[kind]
    for extra in ([], ["--overlay"]):
        out = tmp_path / f"out{len(extra)}"
        rc = main(["segment", *_single_input(root, kind), "-o", str(out), "--model",
                   str(tiny_model), "--no-progress", *extra])
        stdout, err = capsys.readouterr()
        assert rc == 0 and err == "", err
        assert (out / f"{BAD_CASE}.nii.gz").is_file()
        warnings = [line for line in stdout.splitlines() if "warning" in line]
        if extra:
            (line,) = warnings
            assert name in line and rule in line and "no ground truth" in line
            assert (out / f"{BAD_CASE}.png").is_file()
        else:
            assert warnings == []


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_segment_bad_explicit_files_exit_2(tmp_path, capsys, tiny_model, kind):
    root = make_bad_dataset(tmp_path, kind)
    rc = main(["segment", *_file_args(root), "-o", str(tmp_path / "out"), "--model",
               str(tiny_model), "--no-progress"])
    name, rule = BAD_EXPECT[kind]
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert name in line and rule in line


def test_segment_argument_errors_exit_2(tmp_path, capsys, tiny_model):
    folder = write_phantom(make_phantom((32, 32, 24), seed=1), tmp_path / "data", "brats2017")
    out = str(tmp_path / "out")
    cases = [
        (["--model", "two_pth"], "neither a released model (input_cascade, two_path)"),
        (["--model", str(tiny_model), "--labels", "brats2099"], "invalid choice"),
        (["--model", str(tiny_model), "--batch-size", "0"], "expected an integer >= 1"),
        (["--model", str(tiny_model), "--min-component", "-3"], "expected a number >= 0"),
        (["--model", str(tiny_model), "--min-enhancing", "nan"], "expected a number >= 0"),
        (["--model", str(tiny_model), "--max-oedema-distance", "-3"], "expected a number >= 0"),
        (["--model", str(tiny_model), "--num-parts", "2", "--part-id", "5"], "--part-id"),
        (["--model", str(tiny_model), "--t1", str(folder / "phantom_000_t1.nii.gz")],
         "not both"),
    ]
    for extra, message in cases:
        rc = main(["segment", "-i", str(folder), "-o", out, *extra])
        err = capsys.readouterr().err
        assert rc == 2, extra
        assert message in err and "Traceback" not in err, err
    rc = main(["segment", "-o", out, "--t1", "a.nii.gz"])
    assert rc == 2 and "missing --t1c --t2 --flair" in capsys.readouterr().err
    rc = main(["segment", "-o", out])
    assert rc == 2 and "give -i INPUT" in capsys.readouterr().err


def test_segment_defaults_match_the_api():
    from tumorseg.cli import build_parser
    from tumorseg.infer import BATCH_SIZE
    from tumorseg.postprocess import PostprocessConfig

    args = build_parser().parse_args(["segment", "-i", "x", "-o", "y"])
    assert args.batch_size == BATCH_SIZE and args.model is None and args.device == "auto"
    # Post-processing: the model file's own unless given (PostprocessConfig.from_meta).
    assert (args.min_component, args.min_enhancing, args.max_oedema_distance,
            args.no_postprocess) == (None, None, None, False)
    assert PostprocessConfig.from_meta({}) == PostprocessConfig()


def test_models_json_keys(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:3] == ["local_path", "global_path", "two_path"]
    for row in rows:
        assert sorted(row) == ["name", "params_paper", "params_total", "patch_size",
                               "receptive_field"]


def test_segment_explicit_files_and_evaluate_missing_prediction(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    for i, cid in enumerate(["e_a", "e_b"]):
        write_phantom(make_phantom(SMALL_SHAPE, seed=i, case_id=cid), root, "brats2017")
    cases = find_cases(root)
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": oracle(cases))
    folder = root / "e_a"
    files = []
    for m, token in BRATS2017_FILES.items():
        files += [f"--{m}", str(folder / f"e_a_{token}.nii.gz")]
    pred = tmp_path / "pred"
    rc = main(["segment", *files, "-o", str(pred), "--no-progress", *SMALL_POST_ARGS])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in pred.iterdir()) == ["e_a.nii.gz", "labels.ctbl", "labels.txt",
                                                      "volumes.csv"]
    capsys.readouterr()

    csv_path = tmp_path / "m.csv"
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(root), "-o", str(csv_path),
               "--lesionwise"])
    out, err = capsys.readouterr()
    assert rc == 1  # a prediction is missing
    line = _one_error_line(err)
    assert "e_b" in line and "counted as empty" in line
    assert "evaluated 2 case(s)" in out and "lesion_dice" in out
    rows = [r.split(",") for r in csv_path.read_text().splitlines()]
    assert rows[0] == ["case_id", "region", "dice", "hd95", "sensitivity", "specificity", "ppv",
                       "pred_ml", "ref_ml", "lesion_rules", "lesion_dice", "lesion_hd95",
                       "lesion_tp", "lesion_fp", "lesion_fn"]
    assert {r[9] for r in rows[1:]} == {"brats2023"}  # the bare flag's rules
    dice = {(r[0], r[1]): float(r[2]) for r in rows[1:]}
    assert dice[("e_a", "whole")] == 1.0 and dice[("e_b", "whole")] == 0.0
    assert float(np.mean([dice[("e_a", "core")], dice[("e_b", "core")]])) == 0.5

    rc = main(["evaluate", "--pred", str(tmp_path / "nope"), "--ref", str(root)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    for flag in ("-o", "--json"):  # an output that is a folder: refused before any work
        rc = main(["evaluate", "--pred", str(pred), "--ref", str(root), flag, str(tmp_path)])
        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        assert f"{tmp_path}: {flag} names a folder" in _one_error_line(err)


def test_unwritable_or_unreadable_paths_are_one_line_errors(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path), "--data", str(tmp_path), "--out",
               str(tmp_path / "run")])
    assert rc == 2 and f"{tmp_path}: is a folder, not a TOML config file" in \
        _one_error_line(capsys.readouterr().err)
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["demo", "--out", str(blocker / "demo"), "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(blocker) in line


def test_no_traceback_reaches_the_terminal(tmp_path, tiny_model):
    root = make_bad_dataset(tmp_path, "truncated_gzip")
    proc = subprocess.run(
        [sys.executable, "-m", "tumorseg.cli", "segment", *_file_args(root), "-o",
         str(tmp_path / "out"), "--model", str(tiny_model), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"{BAD_CASE}_t1.nii.gz" in line and "truncated" in line


def test_output_labels_sets_only_the_written_convention(tmp_path, monkeypatch, capsys):
    """--output-labels brats2023 writes the BraTS 2023 values of what the default run writes in
    the input's BraTS 2017 convention (4 ET -> 3), and says so in labels.txt and volumes.csv."""
    import nibabel as nib

    root = tmp_path / "data"
    write_phantom(make_phantom(SMALL_SHAPE, seed=0, case_id="o_a"), root, "brats2017")
    cases = find_cases(root)
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": oracle(cases))
    maps = {}
    for name, extra in (("own", []), ("2023", ["--output-labels", "brats2023"])):
        out = tmp_path / name
        assert main(["segment", "-i", str(root), "-o", str(out), "--no-progress",
                     *SMALL_POST_ARGS, *extra]) == 0, capsys.readouterr().err
        maps[name] = np.asarray(nib.load(out / "o_a.nii.gz").dataobj)
    own = maps["own"]
    assert set(np.unique(own)) == {0, 1, 2, 4}
    expected = np.where(own == 4, 3, own)
    np.testing.assert_array_equal(maps["2023"], expected)
    assert "brats2023" in (tmp_path / "2023" / "volumes.csv").read_text()
