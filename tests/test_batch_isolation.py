"""Batch isolation (issue 12): whatever goes wrong in one case of `segment` or `evaluate`
(bad input, out of memory, a runtime error) is reported for that case on one line and the
others are done; the exit code says some failed; KeyboardInterrupt still stops the batch; a bad
ground-truth file never stops its case from being segmented."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from test_segment import OracleModel, _assert_same_file, _phantom_root, oracle

from tumorseg import datasets, metrics, segment, weights
from tumorseg.cli import main
from tumorseg.datasets import find_cases
from tumorseg.evaluation import evaluate_folder
from tumorseg.postprocess import PostprocessConfig
from tumorseg.segment import CaseFailure, SegmentOptions, segment_cases

IDS = ["c_a", "c_b", "c_c"]
SHAPE = (32, 32, 20)  # small phantoms: an oracle batch of three in a few seconds
# Without post-processing the oracle gives back each reference exactly, whatever its size.
OPTIONS = SegmentOptions(postprocess=PostprocessConfig(enabled=False))
CLI_OPTIONS = ["--no-progress", "--no-postprocess"]


def _root(tmp_path, ids=IDS):
    return _phantom_root(tmp_path, ids, shape=SHAPE)


class FailingOracle(OracleModel):
    """The oracle of the other cases; a forward pass over a slice of case `fail_id` raises
    `error` (inference itself fails, wherever in the pipeline it runs)."""

    def __init__(self, cases, fail_id: str, error: BaseException):
        super().__init__([c for c in cases if c.case_id != fail_id])
        self.failing = OracleModel([c for c in cases if c.case_id == fail_id])
        self.error = error

    def forward(self, x):
        try:
            return super().forward(x)
        except AssertionError:  # not a window of the other cases
            self.failing.forward(x)  # ... but of the failing case (else: a test bug)
            raise self.error from None


def failing_oracle(cases, fail_id: str, error: BaseException):
    _, meta = oracle([])
    return FailingOracle(cases, fail_id, error), meta


def _outputs(out) -> list[str]:
    return sorted(p.name for p in out.glob("*.nii.gz"))


# -- segment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, error, reason, prefetch", [
    ("infer", RuntimeError("CUDA error: an illegal memory access\nwas encountered"),
     "RuntimeError: CUDA error: an illegal memory access was encountered", True),
    ("infer", MemoryError(), "MemoryError", False),
    ("read", MemoryError(), "MemoryError", True),  # raised in the prefetch thread
    ("read", OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error", False),
])
def test_segment_a_failing_case_fails_alone(tmp_path, monkeypatch, stage, error, reason,
                                            prefetch):
    cases = find_cases(_root(tmp_path))
    if stage == "infer":
        model_spec = failing_oracle(cases, "c_b", error)
    else:  # reading and preprocessing (in the prefetch thread when prefetch is on)
        model_spec = oracle(cases)
        real = segment.prepare_case

        def prepare(case, meta):
            if case.case_id == "c_b":
                raise error
            return real(case, meta)

        monkeypatch.setattr(segment, "prepare_case", prepare)
    out = tmp_path / "out"
    results, failures = segment_cases(model_spec, cases, out,
                                      dataclasses.replace(OPTIONS, prefetch=prefetch))
    assert failures == [CaseFailure("c_b", reason, bad_input=False)]
    assert [r["case_id"] for r in results] == ["c_a", "c_c"]
    assert _outputs(out) == ["c_a.nii.gz", "c_c.nii.gz"]
    for case in cases:
        if case.case_id != "c_b":
            _assert_same_file(out / f"{case.case_id}.nii.gz", case.label)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_segment_cli_reports_the_failed_case_and_exits_1(tmp_path, monkeypatch, capsys):
    root = _root(tmp_path)
    cases = find_cases(root)
    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": failing_oracle(
        cases, "c_b", RuntimeError("boom")))
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(root), "-o", str(out), *CLI_OPTIONS])
    stdout, err = capsys.readouterr()
    assert rc == 1
    assert err.splitlines() == ["tumorseg: error: case c_b failed: RuntimeError: boom"]
    assert "segmented 2 case(s)" in stdout and "1 failed" in stdout
    assert _outputs(out) == ["c_a.nii.gz", "c_c.nii.gz"]

    # The one case given: a failure that is not bad input is 1 (bad input stays 2), one line.
    rc = main(["segment", "-i", str(root / "c_b"), "-o", str(tmp_path / "one"), "--no-progress",
               *CLI_OPTIONS])
    assert rc == 1
    assert capsys.readouterr().err.splitlines() == ["tumorseg: error: RuntimeError: boom"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_segment_keyboard_interrupt_stops_the_batch(tmp_path, monkeypatch, capsys, prefetch):
    root = _root(tmp_path)
    cases = find_cases(root)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_cases(failing_oracle(cases, "c_b", KeyboardInterrupt()), cases, out,
                      dataclasses.replace(OPTIONS, prefetch=prefetch))
    assert _outputs(out) == ["c_a.nii.gz"]  # c_c is never started

    monkeypatch.setattr(weights, "resolve_model", lambda spec, device="cpu": failing_oracle(
        cases, "c_b", KeyboardInterrupt()))
    rc = main(["segment", "-i", str(root), "-o", str(tmp_path / "cli"), "--no-progress",
               *CLI_OPTIONS])
    assert rc == 130 and capsys.readouterr().err.splitlines() == ["tumorseg: error: interrupted"]
    assert _outputs(tmp_path / "cli") == ["c_a.nii.gz"]


@pytest.mark.parametrize("overlay", [False, True])
def test_segment_a_bad_ground_truth_never_stops_its_case(tmp_path, monkeypatch, overlay):
    cases = find_cases(_root(tmp_path, ["c_a", "c_b"]))
    model_spec = oracle(cases)  # it reads the ground truth while it is good
    bad = cases[1].label
    truth = shutil.copy(bad, tmp_path / "c_b_truth.nii.gz")
    bad.write_bytes(b"not a volume")
    read = []
    real = datasets.read_volume

    def spy(path, *args, **kwargs):
        read.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_volume", spy)
    out = tmp_path / "out"
    results, failures = segment_cases(model_spec, cases, out,
                                      dataclasses.replace(OPTIONS, overlay=overlay))
    assert failures == []
    assert [r["case_id"] for r in results] == ["c_a", "c_b"]
    _assert_same_file(out / "c_b.nii.gz", truth)
    _assert_same_file(out / "c_a.nii.gz", cases[0].label)
    if overlay:  # read for the overlay's reference panel, found bad: a warning, no panel
        (warning,) = results[1]["warnings"]
        assert warning.startswith(f"{bad}: cannot read volume") and "no ground truth" in warning
        assert results[0]["warnings"] == [] and (out / "c_b.png").is_file()
    else:  # segmentation does not need it: never read
        assert str(bad) not in read and str(cases[0].label) not in read
        assert results[1]["warnings"] == []


# -- evaluate --------------------------------------------------------------------------------

def _predictions(tmp_path, cases):
    """Each reference copied as its own prediction: every score is perfect."""
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in cases:
        shutil.copy(case.label, pred / f"{case.case_id}.nii.gz")
    return pred


def _failing_on(case_id: str, error: BaseException):
    real = metrics.evaluate_cases

    def evaluate_cases(pairs, convention, lesionwise=False):
        pairs = list(pairs)
        if any(cid == case_id for cid, _, _ in pairs):
            raise error
        return real(pairs, convention, lesionwise=lesionwise)

    return evaluate_cases


def test_evaluate_a_failing_case_fails_alone(tmp_path, monkeypatch, capsys):
    root = _root(tmp_path)
    pred = _predictions(tmp_path, find_cases(root))
    monkeypatch.setattr(metrics, "evaluate_cases", _failing_on("c_b", MemoryError()))
    rows, problems = evaluate_folder(pred, root)
    assert problems == [("c_b", "not scored: MemoryError")]
    assert sorted({r["case_id"] for r in rows}) == ["c_a", "c_c"]
    assert [r["dice"] for r in rows] == [1.0] * 6  # 2 cases x 3 regions, prediction = truth

    rc = main(["evaluate", "--pred", str(pred), "--ref", str(root), "-o",
               str(tmp_path / "m.csv")])
    stdout, err = capsys.readouterr()
    assert rc == 1
    assert err.splitlines() == ["tumorseg: error: case c_b: not scored: MemoryError"]
    assert "evaluated 2 case(s); 1 problem(s) reported" in stdout
    csv_ids = {line.split(",")[0] for line in (tmp_path / "m.csv").read_text().splitlines()[1:]}
    assert csv_ids == {"c_a", "c_c"}

    # Every case failing that way: reported, exit 1 (not 2: nothing was wrong with the input).
    monkeypatch.setattr(metrics, "evaluate_cases", _failing_on("c_a", RuntimeError("boom")))
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(root / "c_a")])
    assert rc == 1
    assert capsys.readouterr().err.splitlines() == [
        "tumorseg: error: case c_a: not scored: RuntimeError: boom"]


def test_evaluate_a_corrupt_reference_fails_its_case_alone(tmp_path, capsys):
    root = _root(tmp_path)
    cases = find_cases(root)
    pred = _predictions(tmp_path, cases)
    cases[1].label.write_bytes(b"\x1f\x8b not really gzip")
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(root)])
    stdout, err = capsys.readouterr()
    assert rc == 1
    (line,) = err.splitlines()
    assert line.startswith(f"tumorseg: error: case c_b: reference case skipped: {cases[1].label}: "
                           "cannot read volume")
    assert "evaluated 2 case(s)" in stdout
    # The one case given: exit 2 (bad input), and the line says why.
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(root / "c_b")])
    (line,) = capsys.readouterr().err.splitlines()
    assert rc == 2 and "no case could be evaluated: case c_b: reference case skipped" in line
    assert str(cases[1].label) in line and "cannot read volume" in line


def test_evaluate_keyboard_interrupt_stops(tmp_path, monkeypatch, capsys):
    root = _root(tmp_path)
    pred = _predictions(tmp_path, find_cases(root))
    monkeypatch.setattr(metrics, "evaluate_cases", _failing_on("c_b", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        evaluate_folder(pred, root)
    assert main(["evaluate", "--pred", str(pred), "--ref", str(root)]) == 130
