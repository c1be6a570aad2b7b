"""Segmenting cases: from the files of a case to a label map in the input's own space.

`segment_case` runs one case through the whole pipeline with a loaded model:

    datasets.load_case -> geometry.to_model_space (reorient to the model's axes, resample to
       its spacing; identity on BraTS) -> preprocess.preprocess_case (the settings stored in
       the model file)
    -> infer.predict_labels (dense inference on each axial slice's brain box, in bounded
       batches; zero padding by the receptive field; a cascade runs its first CNN densely too;
       layers computed as models.fastconv chose)
    -> voxels outside the brain set to 0 -> postprocess.postprocess -> CropRecord.uncrop
    -> Transform.to_input (back onto the input's grid) -> labels.get_convention(output
       convention).decode -> io.write_volume (input's header)

`segment_cases` runs a batch: resolves the model once, splits the cases between processes
(`num_parts` / `part_id`, nnU-Net style), skips finished cases (`continue_`), reports a bad case
and goes on with the rest, and writes the ITK-SNAP / Slicer colour tables once per folder.

Outputs of a case in `out_dir`:

    <case_id>.nii.gz                 uint8 labels in the output convention, same shape, affine
                                     and header as the input's first modality (T1; the 4-D image
                                     for MSD); <case_id>.mha for .mha input or output_format="mha"
    <case_id>_probabilities.nii.gz   with probabilities=True: (x, y, z, 5) softmax of the
                                     canonical classes (0 other, 1 necrosis, 2 oedema,
                                     3 non-enhancing, 4 enhancing), before post-processing;
                                     (1, 0, 0, 0, 0) outside the brain. Values are rounded to
                                     float16 but stored as float32: NIfTI-1 has no float16 type
    <case_id>.png                    with overlay=True: report.overlay_png of the slice with the
                                     most tumour (prediction beside the ground truth if known)

and once per folder: labels.txt / labels.ctbl (colour tables) and volumes.csv (one row per case:
whole / core / enhancing volume in mL and voxels per label value, from the input's voxel
spacing; updated as each case finishes, atomically and under a lock shared by --num-parts
processes; a case skipped by --continue keeps its row, or gets one from its label map).

Crash safety: every file is written under a hidden temporary name and renamed into place
(io.atomic_write), and the label map is written last. So a file under a final name is always
complete, and an existing label map (with the other requested outputs) means the case is done:
`continue_` skips exactly those cases. Temporary files a killed run left behind are removed when
their case is segmented again.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from tumorseg import io, report
from tumorseg.datasets import (Case, LoadedCase, files_case,  # noqa: F401 (re-exported)
                               input_warnings, load_case)
from tumorseg.errors import TumorsegInputError, one_line
from tumorseg.geometry import PLANES, ModelSpace, Transform, to_model_space
from tumorseg.infer import BATCH_SIZE, InferOptions, predict_labels, resolve_device
from tumorseg.labels import CLASS_NAMES, get_convention
from tumorseg.metrics import label_volumes
from tumorseg import postprocess as pp
from tumorseg.postprocess import PostprocessConfig
from tumorseg.models import fastconv
from tumorseg.models.fastconv import EngineOptions
from tumorseg.preprocess import Preprocessed, PreprocessSettings, preprocess_case

OUTPUT_FORMATS = ("nii.gz", "mha")
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"

def output_format_of(case: Case, output_format: str | None = None) -> str:
    """'nii.gz' or 'mha': `output_format` if given, else 'mha' for .mha/.mhd input."""
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise TumorsegInputError("--output-format", f"unknown output format "
                                     f"{output_format!r}; valid: {', '.join(OUTPUT_FORMATS)}")
        return output_format
    first = next(iter(case.images.values()))
    return "mha" if io.volume_suffix(first) in io.MHA_SUFFIXES else "nii.gz"


def output_paths(case: Case, out_dir: str | Path, output_format: str | None = None,
                 probabilities: bool = False, overlay: bool = False) -> dict[str, Path]:
    """The files `segment_case` writes for `case`: {"labels", ["probabilities"], ["overlay"]}."""
    out_dir = Path(out_dir)
    paths = {"labels": out_dir / f"{case.case_id}.{output_format_of(case, output_format)}"}
    if probabilities:
        paths["probabilities"] = out_dir / f"{case.case_id}{PROBABILITIES_SUFFIX}"
    if overlay:
        paths["overlay"] = out_dir / f"{case.case_id}.png"
    return paths


def is_complete(case: Case, out_dir: str | Path, **outputs) -> bool:
    """True if every output `segment_case` would write for `case` exists (label map last)."""
    return all(p.is_file() for p in output_paths(case, out_dir, **outputs).values())


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files that a killed run left for these outputs (io.atomic_write names
    them '.<final name>.<random>.tmp<suffix>')."""
    for path in paths.values():
        for tmp in path.parent.glob(f".{path.name}.*.tmp*"):
            tmp.unlink(missing_ok=True)


VIEWS = {1: ("axial",), 3: tuple(PLANES)}  # --views: the slicing planes (geometry.PLANES)


@dataclass(frozen=True)
class SegmentOptions:
    """How cases are segmented and what is written (the CLI's `segment` options).

    convention: label convention of the output files; None = each case's own.
    batch_size: axial slice boxes per forward pass (bounds memory; see tumorseg.infer).
    precision: "fp32" (default) or "bf16" (opt-in bfloat16 convolutions; docs/PERFORMANCE.md).
    engine: "auto" (fastest layer implementations, measured; models.fastconv) or "plain"
        (direct fp32 convolutions: the reference).
    prefetch: read and preprocess the next case in a background thread during inference.
    crop_slices: run each slice's brain box only (False: whole slices, the control of
        benchmarks/segment_case.py; same labels, slower).
    tta: mirror test-time augmentation (infer.predict_labels): twice the inference time.
    views: 1 = axial slices (the paper); 3 = the mean of the probabilities from axial, coronal
        and sagittal slicing (infer.predict_labels' planes), three times the inference time.
    postprocess: None = the model file's own settings (PostprocessConfig.from_meta); a dict =
        those with these fields replaced (the CLI's --min-component etc.).
    """

    convention: str | None = None
    postprocess: PostprocessConfig | dict | None = None
    probabilities: bool = False
    overlay: bool = False
    output_format: str | None = None
    batch_size: int = BATCH_SIZE
    device: str = "cpu"
    precision: str = "fp32"
    engine: str = "auto"
    progress: bool = False
    prefetch: bool = True
    crop_slices: bool = True
    tta: bool = False
    views: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TumorsegInputError("--batch-size", f"must be >= 1, got {self.batch_size}")
        if self.views not in VIEWS:
            raise TumorsegInputError("--views", f"must be one of {sorted(VIEWS)}, got {self.views}")
        try:
            self.engine_options()
        except ValueError as exc:
            raise TumorsegInputError("--precision/--engine", str(exc)) from None

    def infer_options(self, desc: str = "slices",
                      class_weights: Sequence[float] | None = None) -> InferOptions:
        """What infer.predict_labels needs of these options."""
        return InferOptions(batch_size=self.batch_size, device=self.device,
                            probabilities=self.probabilities, progress=self.progress, desc=desc,
                            crop_slices=self.crop_slices, class_weights=class_weights,
                            tta=self.tta, planes=VIEWS[self.views])

    def engine_options(self) -> EngineOptions:
        return EngineOptions(mode=self.engine, precision=self.precision)

    def outputs(self) -> dict:
        return {"output_format": self.output_format, "probabilities": self.probabilities,
                "overlay": self.overlay}


@dataclass
class Prepared:
    """A case read and preprocessed, ready for inference (`prepare_case`)."""

    case: Case
    loaded: LoadedCase  # without its raw image
    pre: Preprocessed  # in the model's space
    transform: Transform  # the input's grid -> the model's space
    seconds: dict  # {"read": s, "preprocess": s}
    warnings: list[str]  # datasets.input_warnings: reasons to doubt the input is BraTS-like


def prepare_case(case: Case, meta: dict) -> Prepared:
    """Read a case, bring it into the model's space (geometry) and preprocess it with the
    settings stored in the model file.

    meta: as tumorseg.checkpoint.load_model returns it. Raises TumorsegInputError for a bad
    case or a model file without preprocessing settings.
    """
    if "preprocess" not in meta:
        raise TumorsegInputError(meta.get("path"), "the model file holds no preprocessing "
                                 "settings: was it written by tumorseg train?")
    settings = PreprocessSettings.from_dict(meta["preprocess"])
    t0 = time.perf_counter()
    loaded = load_case(case)
    warnings = input_warnings(loaded)
    t1 = time.perf_counter()
    model_loaded, transform = to_model_space(loaded, ModelSpace.from_meta(meta))
    pre = preprocess_case(model_loaded, settings)
    # The raw (4, x, y, z) float32 image is not needed now: ~140 MB on BraTS.
    loaded.image = model_loaded.image = None
    t2 = time.perf_counter()
    return Prepared(case, loaded, pre, transform, {"read": t1 - t0, "preprocess": t2 - t1},
                    warnings)


def _postprocess_config(options: SegmentOptions, meta: dict) -> PostprocessConfig:
    """options.postprocess resolved against the model file's own settings."""
    if isinstance(options.postprocess, PostprocessConfig):
        return options.postprocess
    return dataclasses.replace(PostprocessConfig.from_meta(meta), **(options.postprocess or {}))


def label_case(model: torch.nn.Module, pre: Preprocessed, options: SegmentOptions,
               class_weights: Sequence[float] | None = None, desc: str = "slices"
               ) -> tuple[np.ndarray, np.ndarray | None, dict, int]:
    """The labels `segment` writes for a preprocessed case, on its cropped grid: the model's
    dense inference (infer.predict_labels with options' batch size, device, TTA...), voxels
    outside the brain set to 0, post-processing. Training's validation calls it too, so it
    scores exactly this. The caller chooses the engine (fastconv.options).

    Returns (labels (X, Y, Z) uint8 canonical classes, probabilities (X, Y, Z, 5) float16 or
    None, {"infer": s, "postprocess": s}, voxels post-processing changed).
    """
    t0 = time.perf_counter()
    labels, probs = predict_labels(model, pre.image, pre.mask,
                                   options.infer_options(desc, class_weights))
    t1 = time.perf_counter()
    labels[~pre.mask] = 0
    final = pp.postprocess(labels, _postprocess_config(options, {}), pre.spacing)
    changed = int(np.count_nonzero(final != labels))
    return final, probs, {"infer": t1 - t0, "postprocess": time.perf_counter() - t1}, changed


@dataclass
class CaseOutput:
    """One case segmented, in memory (`compute_case`).

    labels: (x, y, z) uint8 canonical classes on the input's grid (post-processed).
    probabilities: (x, y, z, 5) float32 softmax of the canonical classes on the input's grid,
        before post-processing, (1, 0, 0, 0, 0) outside the brain; None unless requested.
    prepared: the case as the model saw it (model space, cropped), and `final` its labels
        there: what overlays show.
    """

    prepared: Prepared
    labels: np.ndarray
    probabilities: np.ndarray | None
    final: np.ndarray
    stages: dict
    postprocess_changed: int


def compute_case(model: torch.nn.Module, meta: dict, case: Case | Prepared,
                 options: SegmentOptions = SegmentOptions()) -> CaseOutput:
    """Segment one case in memory (no file written): read and preprocess (unless `case` is
    Prepared), infer, post-process, map back onto the input's grid. See `segment_case`."""
    prepared = case if isinstance(case, Prepared) else prepare_case(case, meta)
    pre, transform = prepared.pre, prepared.transform
    stages = dict(prepared.seconds)
    options = dataclasses.replace(options, postprocess=_postprocess_config(options, meta))
    # Reading and preprocessing freed ~200 MB that reuse_freed_memory keeps in the heap;
    # inference would not reuse all of it (fragments), so it would add to the peak.
    fastconv.release_freed_memory()
    with fastconv.options(options.engine_options()):
        final, probs, seconds, changed = label_case(model, pre, options,
                                                    desc=prepared.case.case_id)
    stages.update(seconds)
    full = None
    if probs is not None:
        probs[~pre.mask] = (1, 0, 0, 0, 0)
        full = np.zeros(tuple(pre.crop.shape) + (probs.shape[-1],), np.float32)
        full[..., 0] = 1.0
        full[pre.crop.slices] = probs
        del probs
        full = transform.to_input(full)
    labels = transform.to_input(pre.crop.uncrop(final, fill=0))
    return CaseOutput(prepared, labels, full, final, stages, changed)


def segment_case(model: torch.nn.Module, meta: dict, case: Case | Prepared, out_dir: str | Path,
                 options: SegmentOptions = SegmentOptions()) -> dict:
    """Segment one case and write its outputs (see the module docstring) into `out_dir`.

    model, meta: as tumorseg.checkpoint.load_model returns them; meta["preprocess"] holds the
        preprocessing settings the model was trained with.
    case: a Case, or a Prepared one (`prepare_case`, e.g. from a background thread).
    Returns {"case_id", "labels", "probabilities", "overlay" (paths as str, or None),
    "convention", "seconds", "stages" (seconds of read, preprocess, infer, postprocess,
    write), "voxels" ({canonical class name: count} over the whole output volume),
    "postprocess_changed" (voxels post-processing changed), "warnings" (one-line doubts about
    the input: datasets.input_warnings), "volumes" (metrics.label_volumes: mL per region and
    voxels per label value, from the input's voxel spacing)}.
    Raises TumorsegInputError for a bad case (one line, naming the file).
    """
    the_case = case.case if isinstance(case, Prepared) else case
    get_convention(options.convention or the_case.convention)  # validated before any work
    output_paths(the_case, out_dir, **options.outputs())
    return write_case(meta, compute_case(model, meta, case, options), out_dir, options)


def write_case(meta: dict, output: CaseOutput, out_dir: str | Path,
               options: SegmentOptions = SegmentOptions()) -> dict:
    """Write a computed case's outputs (`compute_case`) into `out_dir`; returns what
    `segment_case` returns."""
    the_case = output.prepared.case
    conv = get_convention(options.convention or the_case.convention)
    paths = output_paths(the_case, out_dir, **options.outputs())
    t0 = time.perf_counter()
    _remove_stale_temporaries(paths)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    prepared = output.prepared
    reference = prepared.loaded.reference
    if output.probabilities is not None:
        io.write_volume(paths["probabilities"], output.probabilities, reference)
    if options.overlay:
        report.overlay_png(paths["overlay"], prepared.pre.image, output.final, the_case.case_id,
                           reference=prepared.pre.label,
                           affine=reference.affine if prepared.transform.identity
                           else ModelSpace.from_meta(meta).affine(),
                           title=f"model {meta.get('released') or meta.get('model', '?')}")
    counts = np.bincount(output.labels.ravel(), minlength=len(CLASS_NAMES))
    decoded = conv.decode(output.labels)
    # Last: the label map's existence marks the case done (--continue).
    io.write_volume(paths["labels"], decoded, reference)
    stages = {**output.stages, "write": time.perf_counter() - t0}
    return {
        "case_id": the_case.case_id,
        "labels": str(paths["labels"]),
        "probabilities": str(paths["probabilities"]) if options.probabilities else None,
        "overlay": str(paths["overlay"]) if options.overlay else None,
        "convention": conv.name,
        "seconds": round(sum(stages.values()), 3),
        "stages": {k: round(v, 3) for k, v in stages.items()},
        "voxels": {name: int(n) for name, n in zip(CLASS_NAMES, counts)},
        "postprocess_changed": output.postprocess_changed,
        "warnings": list(prepared.warnings),
        "volumes": label_volumes(decoded, conv, reference.spacing),
    }


def _load(model_spec, device: str) -> tuple[torch.nn.Module, dict]:
    if isinstance(model_spec, tuple):
        model, meta = model_spec
        return model.to(device).eval(), meta
    from tumorseg import weights

    return weights.resolve_model(model_spec, device=device)


def select_part(cases: Sequence[Case], num_parts: int = 1, part_id: int = 0) -> list[Case]:
    """The cases of part `part_id` of `num_parts`: every num_parts-th case by sorted case id,
    starting at part_id (nnU-Net's split), so parts are disjoint and together cover all."""
    if num_parts < 1:
        raise TumorsegInputError("--num-parts", f"must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise TumorsegInputError("--part-id", f"must be in 0..{num_parts - 1}, got {part_id}")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


class CaseFailure(NamedTuple):
    """A case of a batch that failed: its id, the one-line reason, and whether the reason is
    bad input (a TumorsegInputError) rather than, e.g., running out of memory."""

    case_id: str
    reason: str
    bad_input: bool = True


def _reference_error(exc: BaseException, case: Case) -> bool:
    """Whether `exc` is about the case's ground-truth file (unreadable, off the grid, values
    outside the convention), which segmentation does not need."""
    return (isinstance(exc, TumorsegInputError) and case.label is not None
            and exc.where == str(case.label))


VOLUMES_CSV = "volumes.csv"


def record_volumes(out_dir: str | Path, rows: Sequence[dict]) -> Path:
    """Add or replace these cases' rows in out_dir/volumes.csv (one row per case: case_id,
    convention, whole_ml, core_ml, enhancing_ml, voxels_<label value>...), keeping the other
    cases' rows, sorted by case id. Atomic, and under a lock: the processes of a
    --num-parts split share the file."""
    path = Path(out_dir) / VOLUMES_CSV
    with io.file_lock(Path(out_dir)):
        # Only a lock holder writes the table, so a temporary found now is a killed run's.
        _remove_stale_temporaries({"volumes": path})
        table: dict[str, dict] = {}
        if path.is_file():
            with open(path, newline="") as fh:
                table = {r["case_id"]: r for r in csv.DictReader(fh)}
        for row in rows:
            table[str(row["case_id"])] = row
        lead = ["case_id", "convention", "whole_ml", "core_ml", "enhancing_ml"]
        # Columns of another shape (a hand-edited file) are dropped, not fatal.
        voxel_cols = sorted({k for r in table.values() for k in r
                             if k and re.fullmatch(r"voxels_\d+", k)},
                            key=lambda k: int(k.removeprefix("voxels_")))
        with io.atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, lead + voxel_cols, restval="", extrasaction="ignore")
            writer.writeheader()
            for cid in sorted(table):
                writer.writerow(table[cid])
    return path


def _volume_row(case: Case, out_dir: Path, options: SegmentOptions, result: dict | None) -> dict:
    """The volumes.csv row of a case segmented now (`result`) or earlier (its label map)."""
    conv = get_convention(options.convention or case.convention)
    if result is not None:
        volumes = result["volumes"]
    else:
        vol = io.read_volume(output_paths(case, out_dir, **options.outputs())["labels"])
        volumes = label_volumes(vol.data, conv, vol.spacing)
    return {"case_id": case.case_id, "convention": conv.name, **volumes}


def _restore_volume_rows(skipped: Sequence[Case], out_dir: Path, options: SegmentOptions,
                         log) -> None:
    """Cases skipped by --continue keep their volumes.csv rows; a missing row is computed from
    the case's label map."""
    path = out_dir / VOLUMES_CSV
    have: set[str] = set()
    if path.is_file():
        try:
            with open(path, newline="") as fh:
                have = {r.get("case_id", "") for r in csv.DictReader(fh)}
        except (OSError, ValueError, csv.Error):
            pass  # unreadable: every skipped case's row is computed again
    rows = []
    for case in skipped:
        if case.case_id in have:
            continue
        try:
            rows.append(_volume_row(case, out_dir, options, None))
        except TumorsegInputError as exc:  # an unreadable earlier output: say so, go on
            if log:
                log(f"case {case.case_id}: warning: no volumes ({exc})")
    problem = _try_record_volumes(out_dir, rows) if rows else None
    if problem and log:
        log(f"warning: {problem}")


def _try_record_volumes(out_dir: str | Path, rows: Sequence[dict]) -> str | None:
    """record_volumes, or the one-line reason it failed: the label maps are written, so a
    volumes table that cannot be kept is a warning, never a failed case or batch."""
    try:
        record_volumes(out_dir, rows)
    except (OSError, ValueError, csv.Error) as exc:
        return f"{Path(out_dir) / VOLUMES_CSV} not updated: {one_line(exc)}"
    return None


def segment_cases(model_spec, cases: Sequence[Case], out_dir: str | Path,
                  options: SegmentOptions = SegmentOptions(), *, continue_: bool = False,
                  num_parts: int = 1, part_id: int = 0, log=None
                  ) -> tuple[list[dict], list[CaseFailure]]:
    """Segment a batch of cases into `out_dir`.

    model_spec: `--model` (a released name, a model file path, or None for the default; see
        tumorseg.weights.resolve_model) or a (model, meta) pair already loaded.
    cases: all cases; this process takes `select_part(cases, num_parts, part_id)`.
    continue_: skip cases whose outputs are complete (`is_complete`).
    log: optional callable(str) told about each case done (and its warnings) or skipped by
        `continue_`.
    With options.prefetch, the next case is read and preprocessed in a background thread while
    the current one is inferred (reading is I/O and zlib, which release the GIL), so a batch
    runs at inference speed.
    A case's ground truth is read only for the overlay (options.overlay), and a bad one there
    costs the overlay its reference panel (a warning), not the case.
    Returns (results of the cases segmented now, CaseFailure of each case that failed). Any
    exception while handling one case (bad input, out of memory, a runtime error) fails that
    case only and the batch goes on; KeyboardInterrupt stops it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise TumorsegInputError(out_dir, "output exists and is not a folder: -o names the "
                                          "folder the label maps go to")
    mine = select_part(cases, num_parts, part_id)
    for case in mine:  # validates the format and conventions before any work
        output_paths(case, out_dir, **options.outputs())
        get_convention(options.convention or case.convention)
    device = resolve_device(options.device)
    options = dataclasses.replace(options, device=device)
    fastconv.reuse_freed_memory()  # large tensors reused, not page-faulted anew per batch
    model, meta = _load(model_spec, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted({options.convention or c.convention for c in mine}):
        report.write_colour_tables(out_dir, name)

    todo, skipped = _split_done(mine, out_dir, options, continue_, log)
    _restore_volume_rows(skipped, out_dir, options, log)
    results: list[dict] = []
    failures: list[CaseFailure] = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="tumorseg-prefetch") if options.prefetch \
        else None
    try:
        for case, get in tqdm(_prefetched(todo, meta, pool), total=len(todo), desc="cases",
                              unit="case", disable=not options.progress):
            try:
                result = _segment_one(model, meta, case, get, out_dir, options)
            except Exception as exc:  # any failure is this case's only (KeyboardInterrupt is not)
                failures.append(CaseFailure(case.case_id, one_line(exc),
                                            isinstance(exc, TumorsegInputError)))
                continue
            finally:
                fastconv.release_freed_memory()  # one case's high-water mark stays its own
            results.append(result)
            problem = _try_record_volumes(out_dir, [_volume_row(case, out_dir, options, result)])
            if problem:
                result["warnings"].append(problem)
            if log:
                log(f"case {case.case_id}: {result['labels']} ({result['seconds']:.1f} s)")
                for warning in result["warnings"]:
                    log(f"case {case.case_id}: warning: {warning}")
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return results, failures


def _split_done(cases: Sequence[Case], out_dir: Path, options: SegmentOptions, continue_: bool,
                log) -> tuple[list[Case], list[Case]]:
    """(cases to segment, cases skipped because --continue found their outputs complete)."""
    todo, skipped = [], []
    for case in cases:
        if continue_ and is_complete(case, out_dir, **options.outputs()):
            if log:
                log(f"case {case.case_id}: output exists, skipped (--continue)")
            skipped.append(case)
        elif options.overlay:
            todo.append(case)
        else:  # the ground truth is only drawn in the overlay: not read, so it cannot fail
            todo.append(dataclasses.replace(case, label=None))
    return todo, skipped


def _prefetched(todo: Sequence[Case], meta: dict, pool):
    """Yield (case, get) in order; get() returns what segment_case takes: the case prepared
    ahead by `pool` (the next one is queued before this one is waited for), or the case itself
    without a pool. get() raises what preparing the case raised, so it fails that case only."""
    pending = pool.submit(prepare_case, todo[0], meta) if pool and todo else None
    for i, case in enumerate(todo):
        if pool is None:
            yield case, (lambda c=case: c)
            continue
        box = [pending]  # one-shot: once taken, nothing here keeps the prepared case alive
        pending = pool.submit(prepare_case, todo[i + 1], meta) if i + 1 < len(todo) else None
        yield case, (lambda box=box: box.pop().result())


def _segment_one(model, meta: dict, case: Case, get, out_dir: Path,
                 options: SegmentOptions) -> dict:
    """segment_case on get()'s input; a bad ground truth costs the overlay its reference panel
    (a warning), not the case."""
    try:
        return segment_case(model, meta, get(), out_dir, options)
    except TumorsegInputError as exc:
        if not _reference_error(exc, case):
            raise
        result = segment_case(model, meta, dataclasses.replace(case, label=None), out_dir,
                              options)
        result["warnings"].append(f"{exc}: the overlay shows no ground truth")
        return result
