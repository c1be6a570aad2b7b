"""Label conventions and tumour regions, as data.

Internally every label map uses one canonical scheme: the five classes of Havaei et al. (2017),
which are the BRATS 2012-2015 labels:

    0 other (healthy tissue and background), 1 necrosis, 2 oedema, 3 non-enhancing tumour,
    4 enhancing tumour.

Each convention is a table from its file values to canonical classes, and one back.

One meaning per canonical class. Since BraTS 2017 the challenges merge necrosis and
non-enhancing tumour into one label, and every later convention inherited that merged label:

    file value -> canonical class (and 0 background -> 0 in all):
    brats2013   1 necrosis -> 1, 2 oedema -> 2, 3 non-enhancing -> 3, 4 enhancing -> 4
    brats2017   1 NCR/NET -> 1, 2 ED (oedema) -> 2, 4 ET (enhancing) -> 4
    brats2023   1 NETC -> 1, 2 SNFH (oedema) -> 2, 3 ET -> 4
    msd         1 oedema -> 2, 2 "non-enhancing tumour" (NCR/NET) -> 1, 3 enhancing -> 4

MSD Task01 is BraTS 2016/2017 data relabelled (ED -> 1, NCR/NET -> 2, ET -> 3): its label 2,
although named "non-enhancing tumour", is the same merged NCR/NET tissue as BraTS 2017's
label 1. The rule: a merged necrosis/non-enhancing label encodes to canonical 1 in every
convention, so the same tissue is the same class whichever dataset it came from (a model
trained on MSD and one trained on BraTS 2017 learn one class for it). Canonical 3 comes only
from BRATS 2012-2015 labels (or a model trained on them).

Decoding back: a convention that cannot express a canonical class writes the label that holds
it. In brats2017, brats2023 and msd, canonical 1 (necrosis) and 3 (non-enhancing) both decode
to the merged label; every convention expresses 0, 2 and 4. So file -> canonical -> file is the
identity for every value a convention defines, canonical -> file -> canonical folds 3 into 1 in
the merged conventions, and both directions keep the regions (whole, core, enhancing): 1 and 3
are both tumour core and neither is enhancing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tumorseg.errors import TumorsegInputError

N_CLASSES = 5
CLASS_NAMES = ("other", "necrosis", "oedema", "non-enhancing", "enhancing")
REGION_NAMES = ("whole", "core", "enhancing")
# Regions in canonical classes (identical to the BRATS 2013 table).
CANONICAL_REGIONS = {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)}


@dataclass(frozen=True)
class Convention:
    """A label convention: file value -> (name, canonical class), and canonical -> file value."""

    name: str
    values: dict[int, str]  # file value -> label name as the challenge calls it
    to_canonical: dict[int, int]  # file value -> canonical class
    from_canonical: dict[int, int]  # canonical class -> file value
    regions: dict[str, tuple[int, ...]]  # region -> file values

    def encode(self, labels: np.ndarray, where: str | None = None) -> np.ndarray:
        """Map a label map in this convention to canonical classes (same shape, uint8)."""
        return _lookup(labels, self.to_canonical, f"{self.name} labels", where)

    def decode(self, canonical: np.ndarray) -> np.ndarray:
        """Map canonical classes back to this convention's file values (same shape, uint8)."""
        return _lookup(canonical, self.from_canonical, "canonical classes", None)

    def region_mask(self, labels: np.ndarray, region: str) -> np.ndarray:
        """Boolean mask of `region` ('whole', 'core', 'enhancing') in a map of file values."""
        return np.isin(labels, self.regions[region])


def _lookup(arr: np.ndarray, table: dict[int, int], what: str, where: str | None) -> np.ndarray:
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise TumorsegInputError(where, f"label map has non-integer values; {what} are integers")
    arr_i = arr if arr.dtype.kind in "iu" else arr.astype(np.int64)
    lo, hi = (int(arr_i.min()), int(arr_i.max())) if arr_i.size else (0, 0)
    if lo >= 0 and hi < 1 << 16:  # label maps: bincount is ~10x faster than np.unique
        present = np.flatnonzero(np.bincount(arr_i.ravel(), minlength=1))
    else:
        present = np.unique(arr_i)
    bad = [int(v) for v in present if int(v) not in table]
    if bad:
        raise TumorsegInputError(
            where, f"label values {bad} are outside {what} (allowed: {sorted(table)})"
        )
    lut = np.zeros(max(max(table), int(present.max(initial=0))) + 1, dtype=np.uint8)
    for k, v in table.items():
        lut[k] = v
    return lut[arr_i]


CONVENTIONS: dict[str, Convention] = {
    "brats2013": Convention(
        "brats2013",
        {0: "background", 1: "necrosis", 2: "oedema", 3: "non-enhancing", 4: "enhancing"},
        {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
        {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
        {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)},
    ),
    "brats2017": Convention(
        "brats2017",
        {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"},
        {0: 0, 1: 1, 2: 2, 4: 4},
        {0: 0, 1: 1, 2: 2, 3: 1, 4: 4},
        {"whole": (1, 2, 4), "core": (1, 4), "enhancing": (4,)},
    ),
    "brats2023": Convention(
        "brats2023",
        {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"},
        {0: 0, 1: 1, 2: 2, 3: 4},
        {0: 0, 1: 1, 2: 2, 3: 1, 4: 3},
        {"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,)},
    ),
    "msd": Convention(
        "msd",
        {0: "background", 1: "oedema", 2: "non-enhancing", 3: "enhancing"},
        {0: 0, 1: 2, 2: 1, 3: 4},  # 2 is NCR/NET: canonical 1, as in brats2017
        {0: 0, 1: 2, 2: 1, 3: 2, 4: 3},
        {"whole": (1, 2, 3), "core": (2, 3), "enhancing": (3,)},
    ),
}


def get_convention(name: str) -> Convention:
    """Look up a convention by name; an unknown name is an error listing the valid ones."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise TumorsegInputError(
            None, f"unknown label convention {name!r}; valid: {', '.join(CONVENTIONS)}"
        ) from None
