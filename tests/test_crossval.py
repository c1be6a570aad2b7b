"""k-fold cross-validation (tumorseg.crossval): stratified folds, and the pooled tables equal an
independent scoring of the label maps each fold wrote."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import main
from tumorseg.crossval import assign_folds, read_strata
from tumorseg.phantom import make_phantom, write_phantom


def test_folds_are_disjoint_balanced_and_stratified():
    ids = [f"c{i:02d}" for i in range(24)]
    strata = {cid: ("LGG" if cid in ("c05", "c17", "c20") else "HGG") for cid in ids}
    folds = assign_folds(ids, 4, strata, seed=0)
    assert sorted(c for f in folds for c in f) == ids
    assert [len(f) for f in folds] == [6, 6, 6, 6]
    assert sorted(sum(strata[c] == "LGG" for c in f) for f in folds) == [0, 1, 1, 1]
    assert assign_folds(ids, 4, strata, seed=0) == folds  # seeded
    assert assign_folds(ids, 4, strata, seed=1) != folds
    assert [len(f) for f in assign_folds(ids[:7], 3)] == [3, 2, 2]


def test_read_strata_of_the_shared_cases(shared_data):
    strata = read_strata(shared_data)
    assert len(strata) == 24
    assert sorted(c for c, g in strata.items() if g == "LGG") == ["Brats18_TCIA10_628_1",
                                                                  "Brats18_TCIA10_639_1"]


@pytest.mark.parametrize("k", [1, 5])
def test_impossible_fold_counts_are_refused(k):
    from tumorseg.errors import TumorsegInputError

    with pytest.raises(TumorsegInputError, match="folds"):
        assign_folds(["a", "b", "c", "d"], k)


@pytest.mark.parametrize("fold", ["4", "-1"])
def test_a_fold_number_out_of_range_is_a_one_line_error(tmp_path, capsys, fold):
    root = tmp_path / "data"
    for i in range(4):
        write_phantom(make_phantom((32, 32, 16), seed=i, case_id=f"ph{i}"), root, "brats2017")
    code = main(["crossval", "--config", "configs/tiny.toml", "--data", str(root),
                 "--out", str(tmp_path / "cv"), "--folds", "4", "--fold", fold])
    err = capsys.readouterr().err
    assert code == 2 and f"--fold: fold {fold} does not exist: folds are numbered 0 to 3" in err
    assert "Traceback" not in err and not (tmp_path / "cv" / "fold0").exists()


def test_crossval_end_to_end_on_phantoms(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(4):
        write_phantom(make_phantom((40, 44, 20), seed=i, case_id=f"ph{i}"), root, "brats2017")
    out = tmp_path / "cv"
    args = ["crossval", "--config", "configs/tiny.toml", "--data", str(root), "--out", str(out),
            "--folds", "2", "--no-progress", "threads=1", "phase1.epochs=1",
            "phase1.steps_per_epoch=4", "phase1.tile=8", "phase2.steps_per_epoch=2", "phase2.tile=8",
            "augment.mirror=true"]
    assert main(args) == 0
    folds = json.loads((out / "folds.json").read_text())["folds"]
    assert sorted(c for f in folds for c in f) == ["ph0", "ph1", "ph2", "ph3"]
    for i, fold in enumerate(folds):  # each fold's model never saw its own cases
        summary = json.loads((out / f"fold{i}" / "summary.json").read_text())
        assert summary["val_cases"] == fold and not set(summary["train_cases"]) & set(fold)

    with open(out / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3
    # independent scoring of each written label map against its reference (BraTS 2017 labels)
    regions = {"whole": (1, 2, 4), "core": (1, 4), "enhancing": (4,)}
    dice = {}
    for i, fold in enumerate(folds):
        for cid in fold:
            pred = np.asarray(nib.load(out / f"fold{i}" / "seg" / f"{cid}.nii.gz").dataobj)
            ref = np.asarray(nib.load(root / cid / f"{cid}_seg.nii.gz").dataobj)
            for region, labels in regions.items():
                p, r = np.isin(pred, labels), np.isin(ref, labels)
                dice[cid, region] = 1.0 if not (p.any() or r.any()) else 2 * (p & r).sum() / (p.sum() + r.sum())
    for row in rows:
        assert float(row["dice"]) == pytest.approx(dice[row["case_id"], row["region"]])
        assert int(row["fold"]) == next(i for i, f in enumerate(folds) if row["case_id"] in f)
    summary = json.loads((out / "crossval.json").read_text())
    for region in regions:
        assert summary["pooled"][f"dice_{region}"] == pytest.approx(
            np.mean([dice[c, region] for f in folds for c in f]))
        assert summary["per_fold"][0][f"dice_{region}"] == pytest.approx(
            np.mean([dice[c, region] for c in folds[0]]))
    assert "pooled over 4 cases" in capsys.readouterr().out

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("fold*/model.pt")}
    assert main(args) == 0  # run again: finished folds are not retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold*/model.pt")} == mtimes
    assert main(args + ["--tta"]) == 0  # the same fold models, mirrored test-time augmentation
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold*/model.pt")} == mtimes
    tta = json.loads((out / "crossval_tta.json").read_text())
    assert tta["pooled"]["cases"] == 4 and (out / "fold0" / "seg_tta").is_dir()
    assert json.loads((out / "crossval.json").read_text()) == summary  # plain tables untouched
    # Finished folds of another recipe are refused, not reported as this one's; a thread count
    # or cache folder that differs does not change the recipe.
    assert main(args + ["augment.mirror=false"]) == 2
    assert "trained with another config" in capsys.readouterr().err
    assert main(args + ["threads=2", f'data.cache_dir="{tmp_path / "cache2"}"']) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold*/model.pt")} == mtimes
    assert main(args + ["--views", "3"]) == 0  # the same fold models, three slicing planes
    assert {p: p.stat().st_mtime_ns for p in out.glob("fold*/model.pt")} == mtimes
    views = json.loads((out / "crossval_views3.json").read_text())
    assert views["pooled"]["cases"] == 4 and (out / "fold1" / "seg_views3").is_dir()
    assert json.loads((out / "crossval.json").read_text()) == summary

    # A cascade cross-validated on these fold models: "{fold}" in first_stage names each fold's
    # own TwoPathCNN, so no fold's first stage saw that fold's cases.
    from tumorseg import checkpoint as ckpt
    cascade = tmp_path / "cv_cascade"
    cargs = [a if a != str(out) else str(cascade) for a in args]
    assert main(cargs + ["model=input_cascade", f"first_stage={out}/fold{{fold}}/model.pt"]) == 0
    for i in range(2):
        _, meta = ckpt.load_model(cascade / f"fold{i}" / "model.pt")
        assert meta["first_stage"] == str(out / f"fold{i}" / "model.pt")
        assert not (cascade / f"fold{i}" / "first_stage").exists()


def _load_report_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "crossval_report.py"
    spec = importlib.util.spec_from_file_location("crossval_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_cases_csv(folder, dice_by_case):
    folder.mkdir()
    with open(folder / "cases.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fold", "grade", "case_id", "region", "dice", "hd95"])
        for cid, (fold, dice) in dice_by_case.items():
            for region, d in zip(("whole", "core", "enhancing"), dice):
                writer.writerow([fold, "HGG", cid, region, d, 1.0])


def test_report_script_compares_two_crossvals_case_by_case(tmp_path):
    script = _load_report_script()
    base = {"a": (0, (0.5, 0.5, 0.5)), "b": (0, (0.9, 0.6, 0.3)), "e": (1, (0.3, 0.3, 0.3)),
            "c": (1, (0.8, 0.8, 0.8))}
    new = {"a": (0, (0.8, 0.5, 0.5)), "b": (0, (0.9, 0.3, 0.3)), "e": (1, (0.3, 0.3, 0.9)),
           "d": (1, (1.0, 1.0, 1.0))}
    _write_cases_csv(tmp_path / "base", base)
    _write_cases_csv(tmp_path / "new", new)
    text = script.compare(tmp_path / "new", tmp_path / "base")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| case") and "---" not in line}
    assert rows.keys() == {"a", "b", "e"}  # only the cases both scored
    assert rows["a"].endswith("| +0.100 |") and rows["b"].endswith("| -0.100 |")
    assert rows["e"].endswith("| +0.200 |")
    # means over a, b, e: base (0.567, 0.467, 0.367), new (0.667, 0.367, 0.567); changes
    # +0.1, -0.1, +0.2: median +0.1 (the mean would be +0.067)
    assert text.splitlines()[-1] == (
        "3 cases: base 0.567 / 0.467 / 0.367 (mean 0.467) -> new 0.667 / 0.367 / 0.567 "
        "(mean 0.533); 2 of 3 cases gain, median change +0.100")


def test_report_script_refuses_other_folds(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _write_cases_csv(tmp_path / "base", {"a": (0, (0.5, 0.5, 0.5))})
    _write_cases_csv(tmp_path / "new", {"a": (1, (0.5, 0.5, 0.5))})
    _write_cases_csv(tmp_path / "other", {"z": (0, (0.5, 0.5, 0.5))})
    script = Path(__file__).resolve().parents[1] / "scripts" / "crossval_report.py"
    for new, rule in (("new", "a paired comparison needs the same folds"),
                      ("other", "no case scored here is scored in")):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / new), "--against",
                               str(tmp_path / "base")], capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and rule in done.stderr, done.stderr


def _write_oof(path, probs, ref, fold):
    np.savez(path, probs=probs.astype(np.float16), label=ref, mask=np.ones(ref.shape, bool),
             spacing=np.ones(3, np.float32), fold=fold)


def test_ensemble_script_averages_runs_and_scores_each(tmp_path):
    """Two runs each right on one half of the lesion and unsure on the other: their mean is the
    reference. Dice counted here by sets, not by the script's histogram."""
    import subprocess
    import sys
    from pathlib import Path

    ref = np.zeros((30, 30, 30), np.uint8)
    ref[2:26, 2:26, 2:26] = 2
    ref[5:23, 5:23, 5:23] = 1
    ref[8:20, 8:20, 8:20] = 4  # 1,728 voxels: above the 500 mm^3 enhancing rule in either half
    onehot = np.eye(5, dtype=np.float32)[ref]
    unsure = onehot * 0.45
    unsure[..., 0] += 0.55 * (ref > 0)  # tumour read as background, 0.55 against 0.45
    unsure[ref == 0] = onehot[ref == 0]
    left = np.arange(30)[:, None, None] < 15
    runs = {"a": np.where(left[..., None], onehot, unsure),
            "b": np.where(left[..., None], unsure, onehot)}
    for name, probs in runs.items():
        (tmp_path / name).mkdir()
        _write_oof(tmp_path / name / "case1.npz", probs, ref, fold=1)
    _write_oof(tmp_path / "a" / "only_a.npz", onehot, ref, fold=0)  # not in b: not scored
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensemble_oof.py"
    done = subprocess.run([sys.executable, str(script), "--oof", str(tmp_path / "a"), "--oof",
                           str(tmp_path / "b"), "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert list(out["cases"]) == ["case1"]

    def dice(pred, classes):
        p, r = np.isin(pred, classes), np.isin(ref, classes)
        return 2 * (p & r).sum() / (p.sum() + r.sum())

    regions = ((1, 2, 4), (1, 4), (4,))
    for i, half in enumerate((left, ~left)):
        alone = np.where(half, ref, 0)
        expect = [dice(alone, c) for c in regions]
        assert out["cases"]["case1"]["runs"][i] == pytest.approx(expect, abs=1e-12)
        assert expect[0] < 0.75  # each alone misses about half the tumour
    assert out["cases"]["case1"]["ensemble"] == [1.0, 1.0, 1.0]
    assert out["pooled_ensemble"]["mean"] == 1.0 and out["cases"]["case1"]["fold"] == 1


def test_ensemble_script_refuses_runs_on_other_grids(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    for name, n in (("a", 8), ("b", 9)):
        (tmp_path / name).mkdir()
        ref = np.zeros((n, n, n), np.uint8)
        _write_oof(tmp_path / name / "case1.npz", np.eye(5, dtype=np.float32)[ref], ref, fold=0)
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensemble_oof.py"
    done = subprocess.run([sys.executable, str(script), "--oof", str(tmp_path / "a"), "--oof",
                           str(tmp_path / "b")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "not on the grid of" in done.stderr, done.stderr
