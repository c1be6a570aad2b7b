"""k-fold cross-validation of a training recipe (`tumorseg crossval`).

Each fold trains the recipe on the other folds' cases, segments its own cases with the same
pipeline as `tumorseg segment` (files written, then read back), and scores them with
`tumorseg evaluate`'s metrics. Nothing of a fold's cases is seen by its model, so the pooled
figures are honest estimates for unseen cases of the same population, as long as nothing else
(epochs, thresholds) was chosen on the same numbers; docs/MODEL_CARD.md says what was.

Folds are stratified: cases of each stratum (e.g. grade, from the dataset's `cases.csv`) are
dealt round-robin, rarest stratum first, so every fold gets its share of LGG cases.
Every fold's run folder holds a resumable training run; a killed cross-validation continues
where it stopped when run again with the same arguments.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from tumorseg.errors import TumorsegInputError
from tumorseg.io import atomic_write
from tumorseg.labels import CANONICAL_REGIONS

if TYPE_CHECKING:
    from tumorseg.segment import SegmentOptions

REGIONS = tuple(CANONICAL_REGIONS)


def assign_folds(case_ids: list[str], k: int, strata: dict[str, str] | None = None,
                 seed: int = 0) -> list[list[str]]:
    """Split `case_ids` into `k` folds whose sizes differ by at most one.

    strata: case id -> group (missing ids form one group). Each group, rarest first, is dealt
    round-robin in a seeded random order, continuing from the fold where the last group stopped.
    """
    if not 2 <= k <= len(case_ids):
        raise TumorsegInputError("--folds", f"need 2 <= folds <= {len(case_ids)} cases, got {k}")
    groups: dict[str, list[str]] = {}
    for cid in sorted(case_ids):
        groups.setdefault((strata or {}).get(cid, ""), []).append(cid)
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    i = 0
    for key in sorted(groups, key=lambda g: (len(groups[g]), g)):
        for j in rng.permutation(len(groups[key])):
            folds[i % k].append(groups[key][j])
            i += 1
    return [sorted(f) for f in folds]


def read_strata(data_root: str | Path, column: str = "grade") -> dict[str, str]:
    """case id -> `column` from `data_root/cases.csv` if it exists (as in ../shared), else {}."""
    path = Path(data_root) / "cases.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["case_id"]: row.get(column, "") for row in csv.DictReader(fh)}


def summarize_folds(rows: list[dict], folds: list[list[str]]) -> dict:
    """Per-fold and pooled means of Dice and HD95 per region (rows: metrics.evaluate_cases rows,
    region names as in the convention). HD95 means skip infinite values; "mean_dice" is the
    mean of the three regions' Dice."""
    def stats(sel: list[dict]) -> dict:
        out = {}
        for region in REGIONS:
            rs = [r for r in sel if r["region"] == region]
            out[f"dice_{region}"] = float(np.mean([r["dice"] for r in rs])) if rs else float("nan")
            hd = [r["hd95"] for r in rs if np.isfinite(r["hd95"])]
            out[f"hd95_{region}"] = float(np.mean(hd)) if hd else float("nan")
        out["mean_dice"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
        out["cases"] = len({r["case_id"] for r in sel})
        return out

    per_fold = [stats([r for r in rows if r["case_id"] in set(f)]) for f in folds]
    return {"pooled": stats(rows), "per_fold": per_fold}


def _check_finished_fold(run_dir: Path, fold_cfg) -> None:
    """Refuse to reuse a finished fold trained with another recipe: its scores would be reported
    as this config's. Where the preprocessing cache lives, the thread and worker counts do not
    change what a fold learns, so they may differ."""
    from tumorseg.config import to_dict
    from tumorseg.train import same_config

    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TumorsegInputError(path, "a finished fold needs its config.json (missing or "
                                       "unreadable): use a new output folder") from None
    ignored = {"threads": fold_cfg.threads, "workers": fold_cfg.workers}
    if isinstance(saved, dict):
        saved = {**saved, **ignored}
        if isinstance(saved.get("data"), dict):
            saved["data"] = {**saved["data"], "cache_dir": fold_cfg.data.cache_dir}
    if not same_config(saved, to_dict(fold_cfg)):
        raise TumorsegInputError(path, "this finished fold was trained with another config than "
                                       "--config and its overrides give: use a new output folder")


@dataclasses.dataclass(frozen=True)
class CrossvalOptions:
    """How `run_crossval` splits and runs: `k` folds dealt with `seed`; `only`: run these folds
    now (0-based; the tables cover the folds finished so far); `segment`: a
    segment.SegmentOptions for the fold's label maps (None: the defaults, without progress
    bars); `progress`: training progress bars."""

    k: int = 4
    seed: int = 0
    only: tuple[int, ...] | None = None
    segment: SegmentOptions | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [i for i in (self.only or ()) if not 0 <= i < self.k]
        if bad:
            raise TumorsegInputError("--fold", f"fold {bad[0]} does not exist: folds are "
                                               f"numbered 0 to {self.k - 1}")

    def output_tag(self) -> str:
        """The suffix of the label-map folders and tables: TTA and multi-view outputs sit
        beside the plain ones ("", "_tta", "_views3", "_tta_views3")."""
        opts = self.segment_options()
        return ("_tta" if opts.tta else "") + (f"_views{opts.views}" if opts.views != 1 else "")

    def segment_options(self) -> SegmentOptions:
        from tumorseg.segment import SegmentOptions

        return self.segment or SegmentOptions(progress=False)


def _write_folds(out_dir: Path, folds: list[list[str]], options: CrossvalOptions) -> None:
    """out_dir/folds.json, refusing a folder whose folds differ (another split's runs)."""
    path = out_dir / "folds.json"
    if path.exists() and json.loads(path.read_text())["folds"] != folds:
        raise TumorsegInputError(path, "holds other folds than these arguments give: "
                                       "use a new output folder")
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"k": options.k, "seed": options.seed, "folds": folds},
                                  indent=2))


@dataclasses.dataclass
class _Split:
    """What every fold of one cross-validation shares: the recipe, the data, the folds."""

    cfg: object  # train.TrainConfig, its data.cache_dir set
    data_root: Path
    out_dir: Path
    folds: list[list[str]]
    by_id: dict  # case id -> datasets.Case
    strata: dict[str, str]
    options: CrossvalOptions

    def run_fold(self, i: int, log: Callable[[str], object]) -> None:
        """Train fold i (or reuse it if finished with the same recipe) and segment its cases."""
        from tumorseg import checkpoint as ckpt
        from tumorseg.segment import segment_cases
        from tumorseg.train import train

        cfg, folds = self.cfg, self.folds
        run_dir = self.out_dir / f"fold{i}"
        train_ids = [c for f in folds[:i] + folds[i + 1:] for c in f]
        # A cascade's first_stage may name each fold's own TwoPathCNN ("{fold}" -> i), e.g. a
        # two_path cross-validation's fold models, so that no fold sees its cases through it.
        fold_cfg = dataclasses.replace(
            cfg, first_stage=cfg.first_stage.replace("{fold}", str(i)),
            data=dataclasses.replace(cfg.data, train=train_ids, val=list(folds[i])))
        if (run_dir / "summary.json").exists():
            _check_finished_fold(run_dir, fold_cfg)
        else:
            log(f"fold {i}: training on {len(train_ids)} cases, validating on {folds[i]}")
            train(fold_cfg, self.data_root, run_dir, resume=(run_dir / "checkpoint.pt").exists(),
                  progress=self.options.progress, log=log)
        model, meta = ckpt.load_model(run_dir / "model.pt")
        _, failures = segment_cases((model, meta), [self.by_id[c] for c in folds[i]],
                                    run_dir / f"seg{self.options.output_tag()}",
                                    self.options.segment_options(), continue_=True)
        for failure in failures:
            log(f"fold {i}: case {failure.case_id} failed: {failure.reason}")

    def score(self) -> dict:
        """Evaluate every fold's label maps written so far; write cases<tag>.csv and
        crossval<tag>.json; return the latter's content."""
        from tumorseg import metrics
        from tumorseg.labels import get_convention
        from tumorseg.segment import output_paths

        tag, fmt = self.options.output_tag(), self.options.segment_options().output_format
        rows = []
        for i, fold in enumerate(self.folds):
            seg_dir = self.out_dir / f"fold{i}" / f"seg{tag}"
            for cid in fold:
                case = self.by_id[cid]
                pred = output_paths(case, seg_dir, fmt)["labels"]
                if pred.exists():
                    for row in metrics.evaluate_cases([(cid, pred, case.label)],
                                                      get_convention(case.convention)):
                        rows.append({"fold": i, "grade": self.strata.get(cid, ""), **row})
        summary = {"k": self.options.k, "seed": self.options.seed, "folds": self.folds,
                   **summarize_folds(rows, self.folds)}
        if rows:
            metrics.write_csv(rows, self.out_dir / f"cases{tag}.csv", leading=("fold", "grade"))
        metrics.write_json(summary, self.out_dir / f"crossval{tag}.json")
        return summary


def run_crossval(cfg, data_root: str | Path, out_dir: str | Path,
                 options: CrossvalOptions = CrossvalOptions(),
                 log: Callable[[str], object] = print) -> dict:
    """Cross-validate TrainConfig `cfg` over the labelled cases under `data_root`.

    Writes out_dir/folds.json, out_dir/fold<i>/ (a training run, plus seg/ with the fold's
    label maps), out_dir/cases.csv (one row per case and region: fold, grade, Dice, HD95, ...)
    and out_dir/crossval.json (per-fold and pooled means). With TTA the label maps go to
    seg_tta/ and the tables to cases_tta.csv and crossval_tta.json (views=3: seg_views3/,
    cases_views3.csv, crossval_views3.json); see CrossvalOptions. Returns the crossval.json
    content.
    """
    from tumorseg.datasets import find_cases

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [c for c in find_cases(data_root, layout=cfg.data.layout or None,
                                   labels=cfg.data.labels or None) if c.label is not None]
    by_id = {c.case_id: c for c in cases}
    strata = read_strata(data_root)
    folds = assign_folds(sorted(by_id), options.k, strata, options.seed)
    _write_folds(out_dir, folds, options)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, cache_dir=cfg.data.cache_dir or str(out_dir / "cache")))
    split = _Split(cfg, Path(data_root), out_dir, folds, by_id, strata, options)
    for i in (range(options.k) if options.only is None else options.only):
        split.run_fold(i, log)
    return split.score()
