"""Evaluate a folder of predictions against a dataset's label maps (`tumorseg evaluate`)."""

from __future__ import annotations

from pathlib import Path

from tumorseg import metrics
from tumorseg.datasets import find_cases
from tumorseg.errors import TumorsegInputError
from tumorseg.labels import get_convention

PREDICTION_SUFFIXES = (".nii.gz", ".nii", ".mha")


def prediction_path(pred_dir: Path, case_id: str) -> Path | None:
    """`pred_dir/<case_id>.nii.gz` (or .nii, .mha) if it exists."""
    for suffix in PREDICTION_SUFFIXES:
        if (pred_dir / f"{case_id}{suffix}").is_file():
            return pred_dir / f"{case_id}{suffix}"
    return None


def evaluate_folder(pred_dir: str | Path, ref_root: str | Path, layout: str | None = None,
                    labels: str | None = None, lesionwise: bool = False
                    ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Metric rows (metrics.evaluate_cases) for every labelled case under `ref_root`.

    Predictions pair with references by case id. A missing or unreadable prediction counts as
    empty and is reported; one whose shape or affine differs from its reference is reported and
    not scored (and if no case is left, that is the error raised).
    Returns (rows, [(case_id, one-line problem)]).
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise TumorsegInputError(pred_dir, "prediction folder does not exist")
    errors: list = []
    cases = find_cases(ref_root, layout=layout, labels=labels, errors=errors)
    problems = [(str(cid), f"reference case skipped: {err}") for cid, err in errors]
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise TumorsegInputError(ref_root, "no reference label maps found: evaluate needs the "
                                           "ground truth (e.g. <id>_seg.nii.gz)")
    rows: list[dict] = []
    mismatches: list[metrics.GridMismatch] = []
    for case in labelled:
        conv = get_convention(case.convention)
        pred = prediction_path(pred_dir, case.case_id)
        if pred is None:
            problems.append((case.case_id, f"no prediction {pred_dir / case.case_id}.nii.gz "
                                           "(or .nii, .mha): counted as empty"))
        try:
            rows += metrics.evaluate_cases([(case.case_id, pred, case.label)], conv,
                                           lesionwise=lesionwise)
        except metrics.GridMismatch as exc:
            problems.append((case.case_id, f"{exc}: not scored"))
            mismatches.append(exc)
            continue
        except TumorsegInputError as exc:
            if pred is None or exc.where != str(pred):
                problems.append((case.case_id, f"reference case skipped: {exc}"))
                continue
            problems.append((case.case_id, f"{exc}: counted as empty"))
            rows += metrics.evaluate_cases([(case.case_id, None, case.label)], conv,
                                           lesionwise=lesionwise)
    if not rows and len(mismatches) == len(labelled):
        raise mismatches[0]  # e.g. the one case: its one-line reason, naming both files
    if not rows:
        raise TumorsegInputError(ref_root, "no case could be evaluated")
    return rows, problems
