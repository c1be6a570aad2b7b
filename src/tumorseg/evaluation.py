"""Evaluate a folder of predictions against a dataset's label maps (`tumorseg evaluate`)."""

from __future__ import annotations

from pathlib import Path

from tumorseg import metrics
from tumorseg.datasets import find_cases
from tumorseg.errors import TumorsegInputError, one_line
from tumorseg.labels import get_convention

PREDICTION_SUFFIXES = (".nii.gz", ".nii", ".mha")


def prediction_path(pred_dir: Path, case_id: str) -> Path | None:
    """`pred_dir/<case_id>.nii.gz` (or .nii, .mha) if it exists."""
    for suffix in PREDICTION_SUFFIXES:
        if (pred_dir / f"{case_id}{suffix}").is_file():
            return pred_dir / f"{case_id}{suffix}"
    return None


def evaluate_folder(pred_dir: str | Path, ref_root: str | Path, layout: str | None = None,
                    labels: str | None = None, lesionwise: str | None = None
                    ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Metric rows (metrics.evaluate_cases) for every labelled case under `ref_root`.

    Predictions pair with references by case id. lesionwise: None or a rule set of
    tumorseg.lesionwise.RULES ("brats2023", "panoptica") whose lesion-wise scores are added. A missing or unreadable prediction counts as
    empty and is reported; one whose shape or affine differs from its reference is reported and
    not scored; any other failure of a case (a corrupt reference, out of memory, a runtime
    error) is reported and that case not scored, and the others go on (KeyboardInterrupt
    stops). If no case is left: the grid mismatch of a single case, or a TumorsegInputError
    naming the first problem, is raised; but if some case failed with an error that is not bad
    input, the (empty) rows are returned with the problems.
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
    unexpected = 0  # failures that are not bad input
    for case in labelled:
        try:
            case_rows, case_problems = _score_case(case, pred_dir, lesionwise)
        except metrics.GridMismatch as exc:
            problems.append((case.case_id, f"{exc}: not scored"))
            mismatches.append(exc)
            continue
        except TumorsegInputError as exc:  # about the reference: the prediction's are handled
            problems.append((case.case_id, f"reference case skipped: {exc}"))
            continue
        except Exception as exc:  # out of memory, a bug: this case only, the batch goes on
            problems.append((case.case_id, f"not scored: {one_line(exc)}"))
            unexpected += 1
            continue
        rows += case_rows
        problems += case_problems
    if not rows and len(mismatches) == len(labelled):
        raise mismatches[0]  # e.g. the one case: its one-line reason, naming both files
    if not rows and not unexpected:
        cid, problem = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise TumorsegInputError(ref_root, f"no case could be evaluated: case {cid}: "
                                           f"{problem}{more}")
    return rows, problems


def _score_case(case, pred_dir: Path, lesionwise: str | None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows and problems of one case (a bad or missing prediction counts as empty); raises
    GridMismatch, a TumorsegInputError about the reference, or anything unexpected."""
    conv = get_convention(case.convention)
    pred = prediction_path(pred_dir, case.case_id)
    problems = []
    if pred is None:
        problems.append((case.case_id, f"no prediction {pred_dir / case.case_id}.nii.gz "
                                       "(or .nii, .mha): counted as empty"))
    try:
        return metrics.evaluate_cases([(case.case_id, pred, case.label)], conv,
                                      lesionwise=lesionwise), problems
    except metrics.GridMismatch:
        raise
    except TumorsegInputError as exc:
        if pred is None or exc.where != str(pred):
            raise  # about the reference
        problems.append((case.case_id, f"{exc}: counted as empty"))
    return metrics.evaluate_cases([(case.case_id, None, case.label)], conv,
                                  lesionwise=lesionwise), problems
