"""`tumorseg report`: the self-contained HTML batch report, checked against independent counts.

Phantom cases with an anisotropic voxel size; their label maps are the ground truth (shifted in
one case, so that metrics are not all perfect) written as predictions. Volumes are recounted
from the files with hand-written brats2017 region values, metrics are read back from the CSV
`evaluate` wrote, and the page is rendered in headless Chromium when it is installed.
"""

from __future__ import annotations

import base64
import csv
import io as _io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tumorseg import metrics
from tumorseg.cli import main
from tumorseg.evaluation import evaluate_folder
from tumorseg.html_report import orthogonal_views, write_report
from tumorseg.io import Volume, write_volume
from tumorseg.labels import CONVENTIONS
from tumorseg.phantom import make_phantom, write_phantom
from tumorseg.report import write_colour_tables

SHAPE = (40, 44, 28)
SPACING = (0.9, 1.2, 2.5)  # anisotropic: volumes and view sizes depend on every axis
# brats2017 file values of each region, written out by hand (not read from labels.py).
REGION_VALUES = {"whole": (1, 2, 4), "core": (1, 4), "enhancing": (4,)}
CHROMIUM = Path("/usr/bin/chromium")


class Page(HTMLParser):
    """What the tests read from the report: the summary table's body rows (cells as
    (data-sort, text)), images (src, width, height), failed-case items, every attribute."""

    def __init__(self, html: str):
        super().__init__()
        self.rows: list[list[tuple[str | None, str]]] = []
        self.images: list[dict] = []
        self.failed: list[str] = []
        self.attributes: list[tuple[str, str]] = []
        self._in_summary = self._in_body = self._in_failed = False
        self._cell: list | None = None
        self._item: list | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attributes += [(k, v or "") for k, v in attrs]
        if tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        elif tag == "tbody" and self._in_summary:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = [a.get("data-sort"), ""]
        elif tag == "div" and a.get("class") == "failed":
            self._in_failed = True
        elif tag == "li" and self._in_failed:
            self._item = [""]
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append((self._cell[0], self._cell[1].strip()))
            self._cell = None
        elif tag == "table":
            self._in_summary = self._in_body = False
        elif tag == "li" and self._item is not None:
            self.failed.append(" ".join(self._item[0].split()))
            self._item = None
        elif tag == "div":
            self._in_failed = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._item is not None:
            self._item[0] += data


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """A brats2017 dataset of cases a, b, c, d and a segmentation folder: a = its ground truth
    shifted by 2 voxels along x, b = its ground truth, c none (failed), d with label value 3
    (not brats2017: failed), e a label map whose images are not in the dataset."""
    root = tmp_path_factory.mktemp("report")
    data, seg = root / "data", root / "seg"
    truth = {}
    for seed, cid in enumerate("abcde"):
        ph = make_phantom(SHAPE, seed=seed, spacing=SPACING, case_id=f"case_{cid}")
        truth[ph.case_id] = (ph, CONVENTIONS["brats2017"].decode(ph.label))
        if cid != "e":
            write_phantom(ph, data, "brats2017")
    for cid, (ph, labels) in truth.items():
        ref = Volume(labels, ph.affine, ph.spacing, seg)
        if cid == "case_a":
            write_volume(seg / f"{cid}.nii.gz", np.roll(labels, 2, axis=0), ref)
        elif cid == "case_d":
            bad = labels.copy()
            bad[bad == 2] = 3
            write_volume(seg / f"{cid}.nii.gz", bad, ref)
        elif cid != "case_c":
            write_volume(seg / f"{cid}.nii.gz", labels, ref)
    rows, _ = evaluate_folder(seg, data)
    csv_path = metrics.write_csv(rows, root / "metrics.csv")
    return {"root": root, "data": data, "seg": seg, "csv": csv_path}


@pytest.fixture(scope="module")
def report(batch) -> dict:
    out = batch["root"] / "out" / "report.html"
    summary = write_report(batch["seg"], out, images=batch["data"], metrics=batch["csv"])
    html = out.read_text(encoding="utf-8")
    return {"path": out, "summary": summary, "html": html, "page": Page(html)}


def _independent_volumes(path: Path) -> dict[str, float]:
    """mL per region: voxels of the region's brats2017 values x the header's voxel volume."""
    img = nib.load(str(path))
    labels = np.asarray(img.dataobj)
    ml_per_voxel = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    return {region: int(np.isin(labels, values).sum()) * ml_per_voxel
            for region, values in REGION_VALUES.items()}


def test_one_row_per_case_with_volumes_from_an_independent_count(batch, report):
    rows = report["page"].rows
    assert [r[0][1] for r in rows] == ["case_a", "case_b", "case_e"]
    for row in rows:
        expected = _independent_volumes(batch["seg"] / f"{row[0][1]}.nii.gz")
        for (sort, text), region in zip(row[1:4], REGION_VALUES):
            assert expected[region] > 0
            # label_volumes rounds to 1e-6 mL (0.001 mm^3); the table shows 2 decimals.
            assert float(sort) == pytest.approx(expected[region], abs=5e-7), (row[0], region)
            assert text == f"{expected[region]:.2f}"
    assert nib.load(str(batch["seg"] / "case_a.nii.gz")).header.get_zooms() == \
        pytest.approx(SPACING)  # the count above used the anisotropic spacing


def test_failed_cases_are_listed_with_their_reason(batch, report):
    failed = report["page"].failed
    assert len(failed) == 2
    c, d = failed
    assert c.startswith("case_c: no label map in ") and f"{batch['seg']}" in c
    assert d.startswith("case_d: label map cannot be read: ")
    assert "label values [3] are outside brats2017 labels" in d
    assert [f["case_id"] for f in report["summary"]["failed"]] == ["case_c", "case_d"]
    # case_e is reported (its own row) with a note that its images are not in the dataset.
    assert f"no images for this case in {batch['data']}" in report["html"]


def test_metrics_columns_equal_the_csv(batch, report):
    with open(batch["csv"], newline="") as fh:
        csv_rows = {(r["case_id"], r["region"]): r for r in csv.DictReader(fh)}
    by_case = {r[0][1]: r for r in report["page"].rows}
    dice_a = float(csv_rows[("case_a", "whole")]["dice"])
    assert 0.5 < dice_a < 1.0  # the shifted case: the check below compares non-trivial values
    for case_id in ("case_a", "case_b"):
        cells = by_case[case_id]
        for i, region in enumerate(REGION_VALUES):
            dice, hd95 = cells[4 + i], cells[7 + i]
            expected = csv_rows[(case_id, region)]
            assert float(dice[0]) == float(expected["dice"])  # exact: repr round-trips
            assert float(hd95[0]) == float(expected["hd95"])
            assert dice[1] == f"{float(expected['dice']):.3f}"
            assert hd95[1] == f"{float(expected['hd95']):.2f}"
    # case_e has no reference, so no metric rows: empty cells, sorted last.
    assert by_case["case_e"][4:] == [("", "")] * 6


def test_page_is_self_contained(report):
    html = report["html"]
    assert "http://" not in html and "https://" not in html
    for name, value in report["page"].attributes:
        if name in ("src", "href"):
            assert value.startswith(("data:image/png;base64,", "#")), (name, value[:60])
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_every_image_is_a_png_of_the_expected_size(report):
    images = report["page"].images
    assert len(images) == 3 * 3  # three views of the three reported cases
    pitch = min(SPACING)  # the phantom's views are far below MAX_VIEW_PIXELS
    x, y, z = (round(n * s / pitch) for n, s in zip(SHAPE, SPACING))
    # Phantom affine diag(-sx, -sy, sz) is already L, P, S: (width, height) per view.
    expected = [(x, y), (x, z), (y, z)] * 3
    for img, size in zip(images, expected):
        src = img["src"]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        png = Image.open(_io.BytesIO(data))
        png.load()
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", size)
        # The page shows the three views at one scale: proportions kept.
        ratio = int(img["width"]) / size[0]
        assert int(img["height"]) == pytest.approx(size[1] * ratio, abs=1)


def test_views_are_radiological_whatever_the_voxel_order():
    """A blob at the patient's right-anterior-superior appears at the top left of every view
    (axial: anterior up, right on the left; coronal: superior up, right on the left; sagittal:
    superior up, anterior on the left), and the same anatomy stored in other voxel orders
    gives the same pictures."""
    lps = np.zeros((20, 24, 16), np.uint8)  # x -> patient left, y -> posterior, z -> superior
    lps[2:6, 2:6, 11:15] = 4
    spacing = (1.0, 1.0, 2.0)
    affine_lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    views = orthogonal_views(lps, affine_lps, spacing)
    assert views["centre"] == (4, 4, 13)
    yellow = np.array([255, 255, 0])  # enhancing, opaque on a blank background
    # (rows, cols) of the blob: z 11..14 are rows 2..9 at 2 mm (15 - 14 = 1 -> rows 2, 3).
    boxes = {"axial": ((2, 5), (2, 5)), "coronal": ((2, 9), (2, 5)), "sagittal": ((2, 9), (2, 5))}
    for view, ((r0, r1), (c0, c1)) in boxes.items():
        rgb = views[view]
        blob = np.all(rgb == yellow, axis=-1)
        rows, cols = np.nonzero(blob)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (r0, r1, c0, c1), view
        assert blob.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)
        assert not rgb[~blob].any()  # black elsewhere

    # The same voxels stored R, A, S (x and y reversed) and stored S, R, A-permuted.
    ras = lps[::-1, ::-1, :]
    affine_ras = affine_lps.copy()
    affine_ras[:3, :3] = np.diag([1.0, 1.0, 2.0])
    affine_ras[:2, 3] = [-19.0, -23.0]  # voxel 0 of ras is voxel (19, 23) of lps
    perm = np.transpose(ras, (2, 0, 1))  # (z, x, y) voxel order
    affine_perm = affine_ras[:, [2, 0, 1, 3]]
    cases = ((ras, affine_ras, spacing, (15, 19, 13)), (perm, affine_perm, (2.0, 1.0, 1.0),
                                                      (13, 15, 19)))
    for data, affine, sp, centre in cases:
        other = orthogonal_views(data, affine, sp)
        assert other["centre"] == centre  # lps voxel (4, 4, 13) in this storage order
        for view in ("axial", "coronal", "sagittal"):
            np.testing.assert_array_equal(other[view], views[view], err_msg=view)


def test_convention_from_the_colour_table_segment_writes(tmp_path):
    ph = make_phantom(SHAPE, seed=7, spacing=SPACING, case_id="c23")
    labels = CONVENTIONS["brats2023"].decode(ph.label)  # ET is 3, not a brats2017 value
    write_volume(tmp_path / "seg" / "c23.nii.gz", labels, Volume(labels, ph.affine, ph.spacing,
                                                                 tmp_path))
    without = write_report(tmp_path / "seg", tmp_path / "a.html")
    assert without["cases"] == [] and "outside brats2017" in without["failed"][0]["reason"]
    write_colour_tables(tmp_path / "seg", "brats2023")
    summary = write_report(tmp_path / "seg", tmp_path / "b.html")
    ml = float(np.prod(SPACING)) / 1000.0
    case = summary["cases"][0]
    assert case["convention"] == "brats2023"
    assert case["enhancing_ml"] == pytest.approx(np.isin(labels, (3,)).sum() * ml, abs=5e-7)
    assert case["core_ml"] == pytest.approx(np.isin(labels, (1, 3)).sum() * ml, abs=5e-7)


def test_cli_writes_the_report_and_exits_1_when_cases_failed(batch, tmp_path, capsys):
    out = tmp_path / "r.html"
    rc = main(["report", "-i", str(batch["seg"]), "--images", str(batch["data"]), "-o", str(out),
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1 and out.is_file()
    assert "wrote" in captured.out and "3 case(s), 2 failed" in captured.out
    assert captured.err.count("case case_c failed: no label map") == 1
    seg_ok = tmp_path / "ok"
    seg_ok.mkdir()
    shutil.copy(batch["seg"] / "case_b.nii.gz", seg_ok)
    assert main(["report", "-i", str(seg_ok), "-o", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "r.html"]  # no temporaries


def _bad_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", ["seg_missing", "seg_empty", "out_is_folder", "csv_missing",
                                  "csv_columns", "csv_value"])
def test_cli_bad_input_is_one_line_and_exit_2(batch, tmp_path, capsys, kind):
    seg, out, extra = str(batch["seg"]), str(tmp_path / "r.html"), []
    expect = {
        "seg_missing": "segmentation folder does not exist",
        "seg_empty": "no label maps",
        "out_is_folder": "is a folder",
        "csv_missing": "metrics CSV does not exist",
        "csv_columns": "no column dice, hd95",
        "csv_value": "line 2: dice 'high' is not a number",
    }[kind]
    if kind == "seg_missing":
        seg = str(tmp_path / "nowhere")
    elif kind == "seg_empty":
        (tmp_path / "empty").mkdir()
        write_colour_tables(tmp_path / "empty", "brats2017")  # colour tables are not label maps
        seg = str(tmp_path / "empty")
    elif kind == "out_is_folder":
        out = str(tmp_path)
    elif kind == "csv_missing":
        extra = ["--metrics", str(tmp_path / "none.csv")]
    elif kind == "csv_columns":
        extra = ["--metrics", str(_bad_csv(tmp_path / "m.csv", "case_id,region\ncase_a,whole\n"))]
    else:
        extra = ["--metrics", str(_bad_csv(tmp_path / "m.csv",
                                           "case_id,region,dice,hd95\ncase_a,whole,high,1.0\n"))]
    rc = main(["report", "-i", seg, "-o", out, "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tumorseg: error: ") and err.count("\n") == 1, err
    assert expect in err
    assert not (tmp_path / "r.html").exists()


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    # The flags keep Chromium off the network (closed here) and out of the user's profile.
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(tmp)})


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium not installed (apt-get install "
                                                  "chromium)")
def test_chromium_renders_the_page_and_sorts_the_table(batch, report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000",
              report["path"].resolve().as_uri(), tmp=tmp_path)
    assert shot.is_file()
    rgb = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # Text alone gives a few hundred anti-aliasing shades; the MR views give thousands.
    assert len(np.unique(rgb, axis=0)) > 1000
    # The oedema overlay (green over grey: G well above R and B) was decoded and drawn.
    assert np.sum((rgb[:, 1] - np.maximum(rgb[:, 0], rgb[:, 2])) > 100) > 200

    # Two clicks on "whole" volume: descending order, by the page's own script.
    clicked = tmp_path / "clicked.html"
    click = 'document.querySelector(\'th[data-key="volume_ml_whole"]\').click();'
    clicked.write_text(report["html"].replace("</body>", f"<script>{click * 2}</script></body>"))
    dom = _chromium("--dump-dom", clicked.as_uri(), tmp=tmp_path).stdout
    order = [r[0][1] for r in Page(dom).rows]
    whole = {cid: _independent_volumes(batch["seg"] / f"{cid}.nii.gz")["whole"] for cid in order}
    assert len(set(whole.values())) == 3  # distinct, so the order is determined
    assert order == sorted(whole, key=whole.get, reverse=True)
