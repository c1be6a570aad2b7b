"""Havaei preprocessing: brain mask, crop, N4 (optional), percentile clipping, z-score.

The order, and why:
1. brain mask = voxels that are non-zero in any modality (BraTS volumes are skull-stripped,
   background is exactly 0);
2. crop to the mask's bounding box plus a margin (the CropRecord undoes it exactly): every
   later step needs only the brain, and N4 fits a smaller image;
3. N4 bias correction (optional; the paper corrects T1 and T1c, `n4_modalities` chooses): the
   bias is multiplicative on raw intensities, so it is removed before anything rescales them;
4. clip each modality at its 1st and 99th percentile inside the mask, so that a few extreme
   voxels (e.g. saturated scanners) do not dominate the statistics of step 5;
5. z-score each modality inside the mask, background set to 0 (the padding value the network
   sees outside the volume).

Results are cached as .npz files, written atomically. An entry's key (`_meta`, stored in it)
holds everything that changes its arrays: PREPROCESS_VERSION (bumped with the code), the
settings, the label convention and its table to canonical classes, the modality -> file and
-> channel maps, and each source file's path, size and mtime. An entry whose key differs, or
that cannot be read (e.g. written by an older version, or truncated), is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.datasets import MODALITIES
from tumorseg.errors import TumorsegInputError, one_line
from tumorseg.geometry import MODEL_SPACE, to_model_space
from tumorseg.io import atomic_write
from tumorseg.labels import get_convention

# Bump when a code change alters what preprocessing (or load_case) computes for the same inputs:
# every cache entry is then rebuilt. 2: the key gained the convention and the modality maps.
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class PreprocessSettings:
    """Settings stored with every cache entry and every trained checkpoint."""

    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    n4: bool = False
    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 50, 30, 20)
    n4_modalities: tuple[str, ...] = ("t1", "t1c")  # the paper's; with n4 only
    margin: int = 8  # voxels kept around the brain's bounding box

    def __post_init__(self) -> None:
        clip = tuple(self.clip_percentiles)
        if len(clip) != 2 or not 0 <= clip[0] < clip[1] <= 100:
            raise ValueError(f"clip_percentiles must be two percentiles 0 <= low < high <= 100, "
                             f"got {self.clip_percentiles!r}")
        if self.margin < 0 or self.n4_shrink < 1 or not self.n4_iterations \
                or min(self.n4_iterations) < 1:
            raise ValueError(f"need margin >= 0, n4_shrink >= 1 and n4_iterations >= 1 each, got "
                             f"margin={self.margin}, n4_shrink={self.n4_shrink}, "
                             f"n4_iterations={self.n4_iterations!r}")
        bad = [m for m in self.n4_modalities if m not in MODALITIES]
        if bad or len(set(self.n4_modalities)) != len(self.n4_modalities):
            raise ValueError(f"n4_modalities must be distinct names among {MODALITIES}, "
                             f"got {self.n4_modalities!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSettings":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TumorsegInputError(None, f"unknown preprocessing setting(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class CropRecord:
    """A crop of the last three axes: original `shape`, kept box [start, stop)."""

    shape: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """[..., X, Y, Z] -> [..., x1-x0, y1-y0, z1-z0]."""
        return arr[(Ellipsis, *self.slices)]

    def uncrop(self, arr: np.ndarray, fill: float = 0) -> np.ndarray:
        """Inverse of `crop`: place `arr` back into an array of the original shape."""
        out = np.full(arr.shape[:-3] + tuple(self.shape), fill, dtype=arr.dtype)
        out[(Ellipsis, *self.slices)] = arr
        return out


@dataclass
class Preprocessed:
    """A preprocessed case, cropped to the brain.

    image: (4, X, Y, Z) float32, modalities in datasets.MODALITIES order, z-scored in the brain
    and 0 outside; mask: (X, Y, Z) bool brain; label: (X, Y, Z) uint8 canonical classes or None.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    label: np.ndarray | None
    crop: CropRecord
    spacing: tuple[float, float, float]
    settings: PreprocessSettings


def brain_mask(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> (X, Y, Z) bool: non-zero in any modality."""
    return np.any(image != 0, axis=0)


def clip_percentiles(vol: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip voxels inside `mask` to the [lo, hi] percentiles of the values inside it; 0 outside.
    (X, Y, Z) -> (X, Y, Z) float32."""
    out = np.zeros(vol.shape, np.float32)
    out[mask] = _clip_inside(vol[mask], lo, hi)
    return out


def zscore(vol: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(vol - mean) / std inside `mask` (population std), 0 outside. -> float32."""
    out = np.zeros(vol.shape, np.float32)
    out[mask] = _zscore_inside(vol[mask])
    return out


# The two steps on the brain's voxels only (a 1-D array): a sixth of the volume's voxels on
# BraTS, and the same arithmetic, so the same bits, as on the whole volume.
def _clip_inside(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    p_lo, p_hi = np.percentile(values, (lo, hi))
    return np.clip(values, p_lo, p_hi).astype(np.float32)


def _zscore_inside(values: np.ndarray) -> np.ndarray:
    inside = values.astype(np.float64)
    std = inside.std()
    return ((values - inside.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def n4_correct(vol: np.ndarray, mask: np.ndarray, shrink: int = 4,
               iterations: tuple[int, ...] = (50, 50, 30, 20)) -> np.ndarray:
    """N4 bias correction (SimpleITK): fit on an image shrunk by `shrink`, divide the original by
    the full-resolution bias field. (X, Y, Z) float -> (X, Y, Z) float32."""
    import SimpleITK as sitk

    # SimpleITK wants (z, y, x); only the field matters here, so geometry stays unit.
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)).astype(np.float32))
    msk = sitk.GetImageFromArray(np.transpose(mask, (2, 1, 0)).astype(np.uint8))
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(msk, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img))
    field = np.exp(np.transpose(log_field, (2, 1, 0)))
    return np.where(mask, vol / field, 0).astype(np.float32)


def bounding_box(mask: np.ndarray, margin: int) -> CropRecord:
    """The box around `mask`'s non-zero voxels plus `margin`, clipped to the volume."""
    if not mask.any():
        raise ValueError("empty brain mask")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        start.append(max(int(idx[0]) - margin, 0))
        stop.append(min(int(idx[-1]) + 1 + margin, mask.shape[axis]))
    return CropRecord(tuple(mask.shape), tuple(start), tuple(stop))  # type: ignore[arg-type]


def preprocess_arrays(image: np.ndarray, label: np.ndarray | None, settings: PreprocessSettings,
                      case_id: str = "", spacing=(1.0, 1.0, 1.0)) -> Preprocessed:
    """Preprocess one case: image (4, X, Y, Z) raw, label (X, Y, Z) canonical or None."""
    mask = brain_mask(image)
    crop = bounding_box(mask, settings.margin)
    inside = np.ascontiguousarray(crop.crop(mask))
    out = np.zeros((image.shape[0],) + inside.shape, dtype=np.float32)
    n4_channels = {MODALITIES.index(m) for m in settings.n4_modalities} if settings.n4 else set()
    for c in range(image.shape[0]):
        vol = crop.crop(image[c]).astype(np.float32, copy=False)
        if c in n4_channels:
            vol = n4_correct(vol, inside, settings.n4_shrink, settings.n4_iterations)
        values = vol[inside]  # the brain's voxels, in C order as image[c][mask]
        out[c][inside] = _zscore_inside(_clip_inside(values, *settings.clip_percentiles))
    return Preprocessed(case_id, out, inside,
                        None if label is None else np.ascontiguousarray(crop.crop(label)),
                        crop, tuple(float(s) for s in spacing), settings)  # type: ignore[arg-type]


def preprocess_case(loaded, settings: PreprocessSettings) -> Preprocessed:
    """Preprocess a datasets.LoadedCase."""
    return preprocess_arrays(loaded.image, loaded.label, settings, loaded.case.case_id, loaded.spacing)


# -- cache -------------------------------------------------------------------------------------

def _sources(case) -> list[list]:
    files = sorted({str(p) for p in case.images.values()} | ({str(case.label)} if case.label else set()))
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _meta(case, settings: PreprocessSettings) -> dict:
    """The cache key of `case` (a datasets.Case) preprocessed with `settings`: everything the
    cached arrays depend on, in the form it takes on disk."""
    conv = get_convention(case.convention)
    key = settings.to_dict()
    # n4_modalities changes nothing without N4, so entries older than it stay valid; with N4 it
    # is in the key, so N4 entries from before it (fitted on the whole volume) are rebuilt.
    if not settings.n4:
        del key["n4_modalities"]
    meta = {"version": PREPROCESS_VERSION, "case_id": case.case_id, "settings": key,
            # the table, not only the name: a corrected table must rebuild the labels
            "convention": [case.convention, sorted(conv.to_canonical.items())],
            # which file (and channel of a 4-D file) each modality is read from
            "images": sorted((m, str(p)) for m, p in case.images.items()),
            "channels": sorted(case.channels.items()),
            "label": None if case.label is None else str(case.label),
            # the grid training sees (geometry.to_model_space): a new one rebuilds the arrays
            "space": MODEL_SPACE.to_dict(),
            "sources": _sources(case)}
    return json.loads(json.dumps(meta))  # the form it takes on disk (tuples become lists)


def cache_path(cache_dir: str | Path, case_id: str) -> Path:
    return Path(cache_dir) / f"{case_id}.npz"


def save_preprocessed(pre: Preprocessed, path: Path, meta: dict) -> None:
    """Write a cache entry atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, image=pre.image, mask=pre.mask,
                     label=pre.label if pre.label is not None else np.zeros(0, np.uint8),
                     has_label=np.array(pre.label is not None),
                     crop=np.array([pre.crop.shape, pre.crop.start, pre.crop.stop]),
                     spacing=np.array(pre.spacing), meta=np.array(json.dumps(meta)))


def load_preprocessed(path: str | Path) -> Preprocessed:
    """Read a cache entry written by `save_preprocessed`."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        shape, start, stop = (tuple(int(v) for v in row) for row in z["crop"])
        return Preprocessed(meta["case_id"], z["image"], z["mask"],
                            z["label"] if bool(z["has_label"]) else None,
                            CropRecord(shape, start, stop), tuple(float(s) for s in z["spacing"]),
                            PreprocessSettings.from_dict(meta["settings"]))  # type: ignore[arg-type]


def _read_meta(path: Path) -> dict | None:
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))
    except Exception:  # unreadable entry: rebuild it
        return None


def cached_preprocess(case, settings: PreprocessSettings, cache_dir: str | Path) -> tuple[Path, bool]:
    """Ensure a valid cache entry for `case` (a datasets.Case) in `cache_dir`: reuse the entry
    whose key (`_meta`) matches, else preprocess and write it. Returns (path, rebuilt)."""
    from tumorseg.datasets import load_case

    path = cache_path(cache_dir, case.case_id)
    meta = _meta(case, settings)
    if path.exists() and _read_meta(path) == meta:
        return path, False
    # Training sees what segment feeds the model: the case in the model's space.
    loaded, _ = to_model_space(load_case(case), MODEL_SPACE)
    save_preprocessed(preprocess_case(loaded, settings), path, meta)
    return path, True


def _worker(args):
    case, settings, cache_dir = args
    try:
        return case.case_id, cached_preprocess(case, settings, cache_dir), None
    except Exception as exc:  # bad input or not (out of memory...): this case only
        return case.case_id, None, one_line(exc)


def preprocess_dataset(cases, settings: PreprocessSettings, cache_dir: str | Path, workers: int = 1,
                       progress: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Preprocess `cases` into `cache_dir` with a process pool.

    Returns (cache paths of the cases that succeeded, [(case_id, one-line error)] of the rest):
    any exception in one case (not only bad input) fails that case only.
    """
    from tqdm import tqdm

    jobs = [(c, settings, cache_dir) for c in cases]
    done, failed = [], []
    if workers > 1:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_worker, jobs)
    else:
        pool, results = None, map(_worker, jobs)
    try:
        for case_id, res, err in tqdm(results, total=len(jobs), desc="preprocess", unit="case",
                                      disable=not progress):
            if err:
                failed.append((case_id, err))
            else:
                done.append(res[0])
    finally:
        if pool:
            pool.shutdown()
    return done, failed
