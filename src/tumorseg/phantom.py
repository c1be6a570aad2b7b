"""Synthetic BraTS-like cases, deterministic by seed, for the demo and tests.

A phantom is a skull-stripped head-shaped brain (white matter inside, a grey-matter shell, CSF in
the ventricles and a thin outer layer) with one glioma: a necrotic core inside an enhancing rim,
a non-enhancing part attached on one side, all surrounded by oedema. Intensities follow real MR
contrast per sequence, with Rician noise and a smooth multiplicative bias field, in raw
scanner-like units (0..~1200), so the same preprocessing applies as to real data.

`write_phantom` writes a phantom in any supported dataset layout (see `tumorseg.datasets`).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from tumorseg.datasets import MODALITIES
from tumorseg.errors import TumorsegInputError
from tumorseg.io import Volume, atomic_write, write_volume
from tumorseg.labels import CONVENTIONS

TISSUE_NAMES = ("background", "csf", "grey matter", "white matter")

# Mean signal per class in raw units. Columns: background, CSF, GM, WM, then canonical tumour
# classes necrosis, oedema, non-enhancing, enhancing. T1: WM > GM > CSF, necrosis dark;
# T1c: as T1 plus a bright enhancing rim; T2: CSF > GM > WM, fluid and oedema bright;
# FLAIR: CSF suppressed (dark), oedema brightest.
_SIGNAL = {
    "t1": (0.0, 180.0, 420.0, 560.0, 150.0, 330.0, 300.0, 450.0),
    "t1c": (0.0, 200.0, 440.0, 580.0, 170.0, 350.0, 320.0, 950.0),
    "t2": (0.0, 950.0, 520.0, 380.0, 820.0, 780.0, 700.0, 620.0),
    "flair": (0.0, 110.0, 480.0, 380.0, 450.0, 860.0, 720.0, 640.0),
}
_NOISE_SIGMA = 15.0  # raw units; SNR ~ 35 in white matter
_BIAS_AMPLITUDE = 0.2  # multiplicative bias field spans 1 +- 20%


@dataclass
class Phantom:
    """One synthetic case.

    images: modality ('t1', 't1c', 't2', 'flair') -> (x, y, z) float32, raw units, background
        exactly 0 and brain > 0.
    label: (x, y, z) uint8 canonical classes (0 other, 1 necrosis, 2 oedema, 3 non-enhancing,
        4 enhancing).
    affine: 4x4 voxel (x, y, z) -> RAS+ mm, diag(-sx, -sy, sz) with a non-zero origin.
    spacing: voxel size in mm (x, y, z).
    tissue: (x, y, z) uint8 healthy tissue under the tumour too (indices into TISSUE_NAMES).
    """

    case_id: str
    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    tissue: np.ndarray


def _smooth_field(shape: tuple[int, int, int], nodes: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field in [-1, 1]: Gaussian-interpolated noise on a coarse grid.

    Separable interpolation (one small matrix per axis) costs a few ms, unlike ndimage.zoom.
    """
    weights = []
    for n in shape:
        t = (np.arange(n) + 0.5) / n
        s = np.linspace(-0.1, 1.1, nodes)
        w = np.exp(-0.5 * ((t[:, None] - s[None, :]) / (s[1] - s[0])) ** 2)
        weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    wx, wy, wz = weights
    coarse = rng.standard_normal((nodes,) * 3).astype(np.float32)
    field = (wx @ coarse.reshape(nodes, -1)).reshape(shape[0], nodes, nodes)  # (X, n, n)
    field = np.matmul(wy, field) @ wz.T  # (X, Y, n) -> (X, Y, Z)
    return field / max(float(np.abs(field).max()), 1e-6)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def make_phantom(
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    case_id: str = "phantom_000",
) -> Phantom:
    """Make a deterministic synthetic case of `shape` voxels (x, y, z); see `Phantom`.

    Anatomy scales with `shape` (not with `spacing`, which only sets the affine), so every
    tumour class is present at any reasonable size (>= ~32 voxels per axis).
    """
    if len(shape) != 3 or min(shape) < 16:
        raise TumorsegInputError("shape", f"phantom shape must be 3 sizes >= 16, got {shape}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]

    # Brain-normalised coordinates: the brain is roughly the unit ball in (ux, uy, uz).
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * np.array(shape)
    radii = np.array([0.40, 0.44, 0.42]) * np.array(shape)
    ux, uy, uz = (
        ((np.arange(n) - c) / r).astype(np.float32).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, c, r) in enumerate(zip(shape, centre, radii))
    )
    uz_head = uz * np.where(uz < 0, 1.2, 1.0).astype(np.float32)  # flatter, smaller base
    rho = np.sqrt(ux**2 + uy**2 + uz_head**2)
    rho_brain = rho / (1.0 + 0.06 * _smooth_field(shape, 5, rng))
    brain = rho_brain < 1.0

    # Healthy tissue: thin CSF rim, cortical shell with a gyrus-like wavy inner border, WM core.
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 3
    gm_border = 0.76 + 0.05 * _smooth_field(shape, 9, rng)
    tissue[brain & (rho_brain >= gm_border)] = 2
    tissue[brain & (rho_brain >= 0.93)] = 1
    for side in (-1.0, 1.0):  # lateral ventricles, elongated front to back
        v = ((ux - side * 0.13) / 0.08) ** 2 + ((uy - 0.05) / 0.32) ** 2 + ((uz - 0.1) / 0.12) ** 2
        tissue[brain & (v < 1.0)] = 1

    # Tumour in tumour-normalised coordinates (unit = `scale` brain radii).
    direction = _unit(rng)
    t_centre = direction * rng.uniform(0.1, 0.35)
    t_centre[2] = abs(t_centre[2])  # keep away from the flattened base
    scale = rng.uniform(0.28, 0.33)
    vx, vy, vz = (ux - t_centre[0]) / scale, (uy - t_centre[1]) / scale, (uz - t_centre[2]) / scale
    d = np.sqrt(vx**2 + vy**2 + vz**2)
    d_core = d * (1.0 + 0.2 * _smooth_field(shape, 10, rng))
    side = _unit(rng) * 0.85  # where the non-enhancing part sticks out of the core
    d_side = np.sqrt((vx - side[0]) ** 2 + (vy - side[1]) ** 2 + (vz - side[2]) ** 2)
    d_side = d_side * (1.0 + 0.2 * _smooth_field(shape, 10, rng))
    d_oedema = d * (1.0 + 0.3 * _smooth_field(shape, 8, rng))

    label = np.zeros(shape, np.uint8)
    label[(d_oedema < 1.5) | (d_side < 1.1)] = 2
    label[d_side < 0.55] = 3
    label[d_core < 0.75] = 4
    label[d_core < 0.5] = 1
    label[~brain] = 0

    # Per-voxel class: 0..3 tissue, 4..7 canonical tumour classes 1..4.
    klass = np.where(label > 0, label + 3, tissue)
    images = {}
    for modality in MODALITIES:
        signal = np.asarray(_SIGNAL[modality], np.float32)[klass]
        signal = ndimage.gaussian_filter(signal, 0.6, truncate=3.0)  # partial-volume edges
        signal *= 1.0 + _BIAS_AMPLITUDE * _smooth_field(shape, 3, rng)
        n1 = rng.standard_normal(shape, dtype=np.float32) * _NOISE_SIGMA
        n2 = rng.standard_normal(shape, dtype=np.float32) * _NOISE_SIGMA
        img = np.sqrt((signal + n1) ** 2 + n2**2)  # Rician magnitude noise
        images[modality] = np.where(brain, np.maximum(img, 1.0), 0.0).astype(np.float32)

    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    # An off-centre origin catches code that assumes an identity or centred affine.
    affine[:3, 3] = [
        sx * (shape[0] - 1) / 2 + 3.0,
        sy * (shape[1] - 1) / 2 - 5.0,
        -sz * shape[2] / 2 + 7.0,
    ]
    return Phantom(case_id, images, label, affine, (sx, sy, sz), tissue)


# Files per layout: package modality -> file-name part. The datasets module parses these names.
_BRATS2017_NAMES = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2"}
_BRATS2023_NAMES = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
_NIFTI_CASE_LAYOUTS = {"brats2017": (_BRATS2017_NAMES, "_"), "brats2023": (_BRATS2023_NAMES, "-")}
_BRATS2013_NAMES = {"flair": "MR_Flair", "t1": "MR_T1", "t1c": "MR_T1c", "t2": "MR_T2"}
_MSD_ORDER = ("flair", "t1", "t1c", "t2")  # MSD Task01 / nnU-Net Dataset001 channel order
_MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
_NNUNET_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
_MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


def write_phantom(
    ph: Phantom,
    root: str | Path,
    layout: str,
    case_id: str | None = None,
    dtype: type = np.int16,
) -> Path:
    """Write `ph` under `root` in `layout` and return the case folder (dataset root for msd/nnunet).

    Images are rounded to `dtype`; labels are decoded to the layout's convention (uint8).
    Layouts: brats2013 (.mha tree), brats2017, brats2023, msd (4-D), nnunet (_0000 files).
    """
    root = Path(root)
    cid = case_id or ph.case_id
    ref = Volume(ph.label, ph.affine, ph.spacing, root)
    images = {m: np.round(ph.images[m]).astype(dtype) for m in MODALITIES}

    def labels(convention: str) -> np.ndarray:
        return CONVENTIONS[convention].decode(ph.label)

    if layout in _NIFTI_CASE_LAYOUTS:  # one folder per case, <id><sep><part>.nii.gz
        names, sep = _NIFTI_CASE_LAYOUTS[layout]
        folder = root / cid
        for m, part in names.items():
            write_volume(folder / f"{cid}{sep}{part}.nii.gz", images[m], ref)
        write_volume(folder / f"{cid}{sep}seg.nii.gz", labels(layout), ref)
        return folder
    if layout == "brats2013":
        folder = root / cid
        base = 10000 + zlib.crc32(cid.encode()) % 80000  # distinct file numbers, as in BRATS
        parts = _BRATS2013_NAMES.values()
        names = [f"VSD.Brain.XX.O.{part}.{base + i}" for i, part in enumerate(parts)]
        names.append(f"VSD.Brain_3more.XX.O.OT.{base + 4}")
        for name, data in zip(names, [images[m] for m in _BRATS2013_NAMES] + [labels("brats2013")]):
            write_volume(folder / name / f"{name}.mha", data, ref)
        return folder
    if layout == "msd":
        stacked = np.stack([images[m] for m in _MSD_ORDER], axis=-1)  # (x, y, z, 4)
        write_volume(root / "imagesTr" / f"{cid}.nii.gz", stacked, ref)
        write_volume(root / "labelsTr" / f"{cid}.nii.gz", labels("msd"), ref)
        _write_dataset_json(root, cid, {"modality": _MSD_MODALITY, "labels": _MSD_LABELS,
                                        "tensorImageSize": "4D"})
        return root
    if layout == "nnunet":
        for i, m in enumerate(_MSD_ORDER):
            write_volume(root / "imagesTr" / f"{cid}_{i:04d}.nii.gz", images[m], ref)
        write_volume(root / "labelsTr" / f"{cid}.nii.gz", labels("msd"), ref)
        nn_labels = {v: int(k) for k, v in _MSD_LABELS.items()}
        _write_dataset_json(root, cid, {"channel_names": _NNUNET_CHANNELS, "labels": nn_labels,
                                        "file_ending": ".nii.gz"})
        return root
    raise TumorsegInputError("layout", f"unknown layout {layout!r}; valid: brats2013, brats2017, "
                             "brats2023, msd, nnunet")


def _write_dataset_json(root: Path, case_id: str, fields: dict) -> None:
    """Create or extend root/dataset.json so that it lists every case written so far."""
    path = root / "dataset.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    entry = {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
    training = [t for t in meta.get("training", []) if t.get("label") != entry["label"]]
    training.append(entry)
    training.sort(key=lambda t: t["label"])
    meta.update({"name": "BRATS", "description": "tumorseg synthetic phantom", **fields,
                 "numTraining": len(training), "numTest": 0, "training": training, "test": []})
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
