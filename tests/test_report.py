"""Colour tables (ITK-SNAP, Slicer) and overlay PNGs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tumorseg.datasets import MODALITIES
from tumorseg.labels import CONVENTIONS, N_CLASSES
from tumorseg.report import (OVERLAY_ALPHA, _display, most_tumour_slice, overlay_png,
                             write_colour_tables)

SNAP_ROW = re.compile(
    r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"$'
)
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
# file value -> colour, written out by hand from the class meanings.
EXPECTED_COLOURS = {
    "brats2013": {1: RED, 2: GREEN, 3: BLUE, 4: YELLOW},
    "brats2017": {1: RED, 2: GREEN, 4: YELLOW},
    "brats2023": {1: RED, 2: GREEN, 3: YELLOW},
    "msd": {1: GREEN, 2: RED, 3: YELLOW},  # 2 is NCR/NET, as brats2017 1
}


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_colour_tables_parse_and_cover_the_convention(tmp_path, name):
    snap, ctbl = write_colour_tables(tmp_path, name)
    assert (snap.name, ctbl.name) == ("labels.txt", "labels.ctbl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ctbl", "labels.txt"]
    values = CONVENTIONS[name].values

    snap_lines = snap.read_text().splitlines()
    assert snap_lines[0].startswith("#") and "IDX" in snap.read_text()
    rows = {}
    for line in snap_lines:
        if line.startswith("#"):
            continue
        m = SNAP_ROW.match(line)
        assert m, f"not an ITK-SNAP label row: {line!r}"
        idx, r, g, b = (int(v) for v in m.groups()[:4])
        rows[idx] = ((r, g, b), float(m.group(5)), int(m.group(6)), int(m.group(7)), m.group(8))
    assert sorted(rows) == sorted(values)
    assert rows[0] == ((0, 0, 0), 0.0, 0, 0, "Clear Label")
    for value, colour in EXPECTED_COLOURS[name].items():
        assert rows[value] == (colour, 1.0, 1, 1, values[value])

    ctbl_lines = ctbl.read_text().splitlines()
    assert ctbl_lines[0].startswith("# Color table file")
    entries = {}
    for line in ctbl_lines:
        if line.startswith("#"):
            continue
        value, token, *rgba = line.split()
        assert len(rgba) == 4, line
        entries[int(value)] = (token, tuple(int(v) for v in rgba))
    assert sorted(entries) == sorted(values)
    for value, colour in EXPECTED_COLOURS[name].items():
        token, rgba = entries[value]
        assert token == re.sub(r"[^0-9A-Za-z.-]", "_", values[value])
        assert rgba == colour + (255,)
    assert entries[0][1][3] == 0  # background transparent


def test_colour_table_exact_rows(tmp_path):
    snap, ctbl = write_colour_tables(tmp_path, "brats2017")
    assert '    1   255    0    0        1  1  1    "NCR/NET"' in snap.read_text().splitlines()
    assert '    0     0    0    0        0  0  0    "Clear Label"' in snap.read_text().splitlines()
    assert "1 NCR_NET 255 0 0 255" in ctbl.read_text().splitlines()
    assert "4 ET 255 255 0 255" in ctbl.read_text().splitlines()


@pytest.mark.parametrize("cls", range(1, N_CLASSES))
def test_overlay_draws_each_class_in_its_colour_table_colour(tmp_path, cls):
    """The PNG shows a class in the colour ITK-SNAP and Slicer give it (labels.txt, checked
    above against the class meanings): a slice full of the class over a black FLAIR is that
    colour at OVERLAY_ALPHA, and no other class's colour appears."""
    import matplotlib.image

    snap, _ = write_colour_tables(tmp_path, "brats2013")  # file values = canonical classes
    table = {}
    for line in snap.read_text().splitlines():
        m = SNAP_ROW.match(line)
        if m and int(m.group(1)):
            table[int(m.group(1))] = np.array([int(v) for v in m.groups()[1:4]], float)
    assert sorted(table) == list(range(1, N_CLASSES))
    image = np.random.default_rng(0).normal(100.0, 20.0, (4, 24, 20, 3)).astype(np.float32)
    image[MODALITIES.index("flair")] = 0.0  # black under the labels: their colour alone
    out = overlay_png(tmp_path / "o.png", image, np.full((24, 20, 3), cls, np.uint8), "c",
                      slice_index=1)
    pixels = np.round(matplotlib.image.imread(out)[..., :3] * 255.0)
    panel = pixels[:, -pixels.shape[1] // 5:].reshape(-1, 3)  # labels: the last of 5 panels

    def share(c: int) -> float:  # Agg blends in 8 bits: within 2 of the exact blend
        return float(np.mean(np.abs(panel - table[c] * OVERLAY_ALPHA).max(axis=1) <= 2))

    assert share(cls) > 0.5, share(cls)  # the slice's image fills most of its panel
    assert [c for c in table if c != cls and share(c) > 0] == []


def test_most_tumour_slice():
    labels = np.zeros((3, 3, 5), np.uint8)
    labels[0, :, 1] = 2  # 3 voxels
    labels[:, :2, 2] = 1  # 6 voxels
    labels[:2, :3, 3] = 4  # 6 voxels: a tie, the lower index wins
    labels[0, 0, 4] = 3
    assert most_tumour_slice(labels) == 2
    labels[2, 2, 3] = 2
    assert most_tumour_slice(labels) == 3
    assert most_tumour_slice(np.zeros((3, 3, 5), np.uint8)) == 2  # no tumour: middle slice


def test_display_orientation():
    s = np.arange(6).reshape(2, 3)  # (x=2, y=3)
    assert _display(s, False, False).tolist() == [[0, 3], [1, 4], [2, 5]]  # rows y, columns x
    assert _display(s, True, False).tolist() == [[3, 0], [4, 1], [5, 2]]
    assert _display(s, False, True).tolist() == [[2, 5], [1, 4], [0, 3]]


def _case(shape=(24, 20, 8)):
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, (4,) + shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[5:15, 4:12, 5] = 2
    labels[8:12, 6:10, 5] = 4
    labels[6:9, 6:9, 2] = 1
    return image, labels


def test_overlay_png_is_written(tmp_path):
    import matplotlib
    import matplotlib.image

    backend = matplotlib.get_backend()
    image, labels = _case()
    out = overlay_png(tmp_path / "figs" / "case.png", image, labels, "case-1", title="demo")
    assert out == tmp_path / "figs" / "case.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and pixels.shape[1] > pixels.shape[0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.png"]  # no temp files
    assert matplotlib.get_backend() == backend  # no global side effect


def test_overlay_png_with_reference_and_affine(tmp_path):
    image, labels = _case()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # RAS voxel axes: flipped for display
    out = overlay_png(tmp_path / "a.png", image, labels, "c", reference=labels, affine=affine)
    import matplotlib.image

    wide = matplotlib.image.imread(out)
    narrow = matplotlib.image.imread(overlay_png(tmp_path / "b.png", image, labels, "c"))
    assert wide.shape[1] > narrow.shape[1]  # one more panel


def test_overlay_png_rejects_bad_input(tmp_path):
    image, labels = _case()
    with pytest.raises(ValueError, match="slice_index"):
        overlay_png(tmp_path / "x.png", image, labels, "c", slice_index=8)
    with pytest.raises(ValueError, match="shape"):
        overlay_png(tmp_path / "x.png", image, labels[:, :, :4], "c")
    with pytest.raises(ValueError, match="canonical"):
        overlay_png(tmp_path / "x.png", image, labels + 5, "c")
    with pytest.raises(ValueError, match=r"\(4, x, y, z\)"):
        overlay_png(tmp_path / "x.png", image[:3], labels, "c")
    assert not (tmp_path / "x.png").exists()
