"""Label conventions: one meaning per canonical class, exact round trips, regions kept.

The expectations come from how each challenge relabelled the previous one's tissue classes
(written here from the challenges' documentation, not from tumorseg.labels' tables): a tissue
map in BRATS 2012-2015 terms is written in each convention, and whatever the convention, the
same tissue must come back as the same canonical class, in the same regions.
"""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.errors import TumorsegInputError
from tumorseg.labels import CANONICAL_REGIONS, CONVENTIONS, REGION_NAMES

# Tissue in BRATS 2012-2015 terms: 0 other, 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing.
NECROSIS, OEDEMA, NON_ENHANCING, ENHANCING = 1, 2, 3, 4
# Tissue -> file value, as each challenge relabelled it. BraTS 2017 merged necrosis and
# non-enhancing tumour into label 1 (NCR/NET); MSD Task01 relabelled BraTS 2016/2017 as
# ED -> 1, NCR/NET -> 2, ET -> 3; BraTS 2023 renamed NCR/NET -> NETC 1, ED -> SNFH 2, ET -> 3.
WRITTEN_AS = {
    "brats2013": {0: 0, NECROSIS: 1, OEDEMA: 2, NON_ENHANCING: 3, ENHANCING: 4},
    "brats2017": {0: 0, NECROSIS: 1, OEDEMA: 2, NON_ENHANCING: 1, ENHANCING: 4},
    "brats2023": {0: 0, NECROSIS: 1, OEDEMA: 2, NON_ENHANCING: 1, ENHANCING: 3},
    "msd": {0: 0, NECROSIS: 2, OEDEMA: 1, NON_ENHANCING: 2, ENHANCING: 3},
}
MERGED = {"brats2017", "brats2023", "msd"}  # necrosis and non-enhancing share one label
# Regions by meaning: whole = any tumour tissue, core = tumour without oedema.
TISSUE_REGIONS = {"whole": (NECROSIS, OEDEMA, NON_ENHANCING, ENHANCING),
                  "core": (NECROSIS, NON_ENHANCING, ENHANCING), "enhancing": (ENHANCING,)}


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """(6, 5, 4) tissue map holding every class, each several times."""
    return (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 7 % 5).astype(np.uint8)


def written(tissue: np.ndarray, name: str) -> np.ndarray:
    table = WRITTEN_AS[name]
    return np.vectorize(table.__getitem__, otypes=[np.uint8])(tissue)


def test_every_convention_has_a_relabelling_rule_here():
    assert sorted(CONVENTIONS) == sorted(WRITTEN_AS), "add the new convention to WRITTEN_AS"


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_same_tissue_same_canonical_class(tissue, name):
    """Every convention encodes a tissue to the same class: the merged NCR/NET label (BraTS
    2017 1, BraTS 2023 1, MSD 2) is canonical 1; only BRATS 2012-2015 can say 3."""
    conv = CONVENTIONS[name]
    expected = np.where(tissue == NON_ENHANCING, NECROSIS, tissue) if name in MERGED else tissue
    np.testing.assert_array_equal(conv.encode(written(tissue, name)), expected)
    assert set(np.unique(written(tissue, name)).tolist()) == set(conv.values)  # all values used


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_file_canonical_file_is_exact(tissue, name):
    conv = CONVENTIONS[name]
    labels = written(tissue, name)
    out = conv.decode(conv.encode(labels))
    assert out.dtype == np.uint8 and out.shape == labels.shape
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_decode_writes_what_the_convention_can_express(tissue, name):
    """canonical -> file is the challenge's own relabelling: classes a convention cannot hold
    (3 in the merged ones) go to the label that holds them; back to canonical folds 3 into 1."""
    conv = CONVENTIONS[name]
    np.testing.assert_array_equal(conv.decode(tissue), written(tissue, name))
    folded = np.where(tissue == NON_ENHANCING, NECROSIS, tissue) if name in MERGED else tissue
    np.testing.assert_array_equal(conv.encode(conv.decode(tissue)), folded)


@pytest.mark.parametrize("region", REGION_NAMES)
@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_regions_are_kept_by_encode_and_decode(tissue, name, region):
    conv = CONVENTIONS[name]
    truth = np.isin(tissue, TISSUE_REGIONS[region])
    labels = written(tissue, name)
    np.testing.assert_array_equal(conv.region_mask(labels, region), truth)  # file values
    np.testing.assert_array_equal(np.isin(conv.encode(labels), CANONICAL_REGIONS[region]), truth)
    np.testing.assert_array_equal(conv.region_mask(conv.decode(tissue), region), truth)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_values_outside_the_convention_are_refused(name):
    conv = CONVENTIONS[name]
    bad = next(v for v in range(6) if v not in conv.values)  # 3 (brats2017) or 4 or 5
    with pytest.raises(TumorsegInputError, match=rf"seg.nii.gz: label values \[{bad}\] are outside"):
        conv.encode(np.array([0, 1, bad], np.uint8), where="seg.nii.gz")
