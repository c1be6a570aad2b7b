"""Post-processing of a predicted label map in canonical classes (see tumorseg.labels).

Three rules, applied in this order. Havaei et al. (2017) clean their predictions with connected
components but give no threshold and no enhancing-tumour rule; both rules below are common
BraTS practice, and their thresholds are parameters:

0. Oedema far from the core. With `max_oedema_distance_mm` > 0, oedema voxels (class 2)
   farther than that (Euclidean, mm) from every predicted core voxel (classes 1, 3, 4) become 0;
   a prediction without core is left as it is (a low-grade glioma whose core the model calls
   oedema must not lose its whole tumour).
   Why: the commonest failure on unseen cases (../shared/notes/accuracy-diagnosis.md) is
   oedema over-segmented far from the tumour, often joined to it, so that rule 1 cannot
   remove it. Default 0 (off): on the out-of-fold probabilities of the 24 shared cases it
   changed nothing at 30-45 mm and removed true oedema at 20 mm (docs/MODEL_CARD.md).

1. Small whole-tumour components are removed. The whole-tumour mask (classes 1-4) is split into
   3-D connected components with 26-connectivity (cc3d); every component smaller than
   `min_component_mm3` (mm^3) is set to 0 (other). With `keep_largest` (the default) the
   largest component is always kept, even below the threshold.
   Why: the CNN labels each voxel independently from an axial window, so its commonest error is
   small clusters of false positives scattered through healthy tissue (Pereira et al. 2016
   remove clusters below a volume threshold for the same reason). Every BraTS case holds a
   tumour, and an empty prediction scores Dice 0 and HD95 373 mm on every region, hence
   `keep_largest`.
   Default 10000 mm^3 (10 cm^3), chosen on the 5 validation cases of the
   released models (scripts/tune_postprocess.py over 0-50000 on raw two_path predictions: the
   mean of whole/core/enhancing Dice rose from 0.515 with no clean-up to 0.571 at 10000 and
   stayed there above it; docs/MODEL_CARD.md).

2. Enhancing-tumour consistency. If, after rule 1, the prediction holds fewer than
   `min_enhancing_mm3` of enhancing tumour (class 4) in total, all of them become necrosis
   (class 1).
   Why: many lower-grade gliomas have no enhancing tumour; BraTS then scores the enhancing
   region Dice 1 for an empty prediction and 0 for any non-empty one, so a few spurious
   enhancing voxels cost a whole Dice point (Isensee et al., BraTS 2018 "No New-Net", tune such
   a threshold on training data). Necrosis and enhancing tumour both belong to the tumour core
   and the whole tumour, so the rule changes only the enhancing region: core and whole are
   untouched. Default 500 mm^3 (0.5 cm^3): on the validation cases 0-500 scored the same and
   1000 lowered the enhancing Dice, so 500 keeps the guard at no cost.

Thresholds are volumes in mm^3, turned into voxel counts with the spacing of the grid the rules
run on (segment runs them in the model's space, 1 mm isotropic for the released models: see
tumorseg.geometry), so a threshold means the same tissue volume on any scan. A model file may
carry its own (meta["postprocess"]); `segment` uses those unless the user gives others.
`enabled=False` returns the prediction unchanged (the CLI's `--no-postprocess`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tumorseg.labels import CANONICAL_REGIONS

NECROSIS, OEDEMA, ENHANCING = 1, 2, 4


@dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing settings; see the module docstring for the rules and their defaults."""

    enabled: bool = True
    min_component_mm3: float = 10000.0  # rule 1; 0 keeps every component
    keep_largest: bool = True  # rule 1 never removes the largest component
    min_enhancing_mm3: float = 500.0  # rule 2; 0 turns it off
    max_oedema_distance_mm: float = 0.0  # rule 0; 0 turns it off

    def __post_init__(self) -> None:
        for name, what in (("min_component_mm3", "a volume >= 0 in mm^3"),
                           ("min_enhancing_mm3", "a volume >= 0 in mm^3"),
                           ("max_oedema_distance_mm", "a distance >= 0 in mm")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be {what}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostprocessConfig":
        """The settings a model file stores; unknown keys and wrong types are refused."""
        from tumorseg.config import from_dict

        return from_dict(cls, d, where="post-processing settings")

    @classmethod
    def from_meta(cls, meta: dict) -> "PostprocessConfig":
        """A model file's post-processing (meta["postprocess"]), else the defaults."""
        return cls.from_dict(meta["postprocess"]) if meta.get("postprocess") else cls()


def voxels(mm3: float, spacing: Sequence[float]) -> int:
    """The voxel count of a volume of `mm3` mm^3 on a grid of `spacing` (mm), rounded up:
    a component of that many voxels holds at least `mm3`."""
    return int(math.ceil(mm3 / float(np.prod(spacing)) - 1e-9))


def remove_small_components(mask: np.ndarray, min_voxels: int, keep_largest: bool = True
                            ) -> np.ndarray:
    """(X, Y, Z) bool -> bool: drop 26-connected components with fewer than `min_voxels` voxels
    (the largest one stays if `keep_largest`)."""
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    if min_voxels <= 0 or not mask.any():
        return mask.copy()
    components, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26,
                                              return_N=True)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0  # background
    keep = sizes >= min_voxels
    if keep_largest:
        keep[int(np.argmax(sizes))] = True  # the lowest label on ties: deterministic
    keep[0] = False
    return keep[components]


def distance_to_core(labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                     ) -> np.ndarray | None:
    """(X, Y, Z) canonical classes -> (X, Y, Z) float distance (mm) of each voxel to the nearest
    core voxel (classes 1, 3, 4), computed inside the whole tumour's bounding box only (every
    core voxel lies in it; voxels outside get inf); None if there is no core."""
    from scipy.ndimage import distance_transform_edt

    core = np.isin(labels, CANONICAL_REGIONS["core"])
    if not core.any():
        return None
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(labels))
    out = np.full(labels.shape, np.inf)
    out[box] = distance_transform_edt(~core[box], sampling=tuple(float(s) for s in spacing))
    return out


def postprocess(pred: np.ndarray, cfg: PostprocessConfig = PostprocessConfig(),
                spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Apply rules 0, 1 and 2 (module docstring) to (X, Y, Z) canonical classes on a grid of
    `spacing` mm; returns a new (X, Y, Z) uint8 array."""
    out = np.array(pred, dtype=np.uint8, copy=True)
    if not cfg.enabled:
        return out
    if cfg.max_oedema_distance_mm > 0:
        dist = distance_to_core(out, spacing)
        if dist is not None:
            out[(out == OEDEMA) & (dist > cfg.max_oedema_distance_mm)] = 0
    whole = np.isin(out, CANONICAL_REGIONS["whole"])
    kept = remove_small_components(whole, voxels(cfg.min_component_mm3, spacing),
                                   cfg.keep_largest)
    out[whole & ~kept] = 0
    enhancing = out == ENHANCING
    if 0 < np.count_nonzero(enhancing) < voxels(cfg.min_enhancing_mm3, spacing):
        out[enhancing] = NECROSIS
    return out
