"""Files and safety (issue 12): untrusted model files, output permissions, the demo's folder,
symlinked datasets, and `-o` naming a file."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from tumorseg.cli import main
from tumorseg.datasets import find_cases
from tumorseg.io import atomic_write
from tumorseg.phantom import make_phantom, write_phantom


class _Exploit:
    """Unpickling this runs a shell command: what a malicious --model file would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capsys):
    import torch

    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "tumorseg-model-v1", "payload": _Exploit(target)}, evil)
    with open(tmp_path / "plain.pkl", "wb") as fh:  # the same object: plain pickle does run it
        pickle.dump(_Exploit(tmp_path / "control"), fh)
    with open(tmp_path / "plain.pkl", "rb") as fh:
        pickle.load(fh)
    assert (tmp_path / "control").exists()

    root = write_phantom(make_phantom((32, 32, 16), seed=0, case_id="c0"), tmp_path / "data",
                         "brats2017")
    code = main(["segment", "-i", str(root), "-o", str(tmp_path / "out"), "--model", str(evil),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(evil) in err[0] and "readable" in err[0]
    assert not target.exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        with atomic_write(tmp_path / "x.csv") as tmp:
            tmp.write_text("a\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.csv").stat().st_mode) == mode


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["demo", "--out", str(mine), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and ".tumorseg-demo" in err[0]
    assert (mine / "thesis.tex").read_text() == "years of work"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["demo", "--out", str(not_a_folder), "--no-progress"]) == 2


def test_dataset_of_symlinked_case_folders_is_found(tmp_path):
    real = tmp_path / "all"
    for i in range(3):
        write_phantom(make_phantom((32, 32, 16), seed=i, case_id=f"c{i}"), real, "brats2017")
    subset = tmp_path / "subset"
    subset.mkdir()
    for cid in ("c0", "c2"):
        (subset / cid).symlink_to(real / cid, target_is_directory=True)
    (real / "c0" / "back").symlink_to(subset, target_is_directory=True)  # a cycle
    try:
        found = find_cases(subset)
    finally:
        (real / "c0" / "back").unlink()
    assert sorted(c.case_id for c in found) == ["c0", "c2"]
    assert all(c.label is not None for c in found)


def test_segment_output_naming_a_file_is_exit_2(tmp_path, capsys):
    root = write_phantom(make_phantom((32, 32, 16), seed=0, case_id="c0"), tmp_path / "data",
                         "brats2017")
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"not a folder")
    assert main(["segment", "-i", str(root), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "not a folder" in err[0]
    assert out.read_bytes() == b"not a folder"


def test_demo_describes_each_picture_for_what_it_is():
    from pathlib import Path

    from tumorseg.demo import _how_to_open

    assert "training curves" in _how_to_open(Path("tumorseg_demo/run/curves.png"))
    assert "overlay" in _how_to_open(Path("tumorseg_demo/pred_released_two_path/demo_heldout.png"))


def test_demo_reports_a_failed_case_and_exits_1(tmp_path, monkeypatch, capsys):
    """A case the demo could not segment or score is named on a line of its own and the demo
    exits 1, instead of showing it as Dice 0 with exit 0. (Training is replaced by a tiny model
    file and the released models are left out, to keep this fast.)"""
    import tumorseg.demo as demo
    from test_segment import write_tiny_model

    monkeypatch.setattr(demo, "RELEASED", ())
    monkeypatch.setattr(demo, "train", lambda cfg, data, run, **kw: {
        "model_file": str(write_tiny_model(Path(run) / "model.pt"))})
    real = demo.evaluate_folder

    def evaluate_with_a_missing_case(pred_dir, ref):
        rows, problems = real(pred_dir, ref)
        return rows, problems + [("demo_lost", "no prediction: counted as empty")]
    monkeypatch.setattr(demo, "evaluate_folder", evaluate_with_a_missing_case)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "demo problem: demo_model: case demo_lost: no prediction: counted as empty" in out
