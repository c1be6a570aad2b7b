"""A batch report: one self-contained HTML page for a folder of label maps (`tumorseg report`).

The page holds, at the top, the cases that failed (with their reason) and a summary table, one
row per case, sortable by clicking a column header: whole / core / enhancing tumour volume in mL
(`metrics.label_volumes`, voxel size from the label map's header) and, given a metrics CSV
(`tumorseg evaluate -o`), Dice and HD95 per region. Then, per case, three orthogonal views
(axial, coronal, sagittal) through the centre of mass of the whole tumour: the labels over the
FLAIR (or another modality) when the dataset is given, else on a blank background. Images are
embedded as base64 PNG data URIs, the style and the sorting script are inline: the file needs
no network and no server.

A case failed if its images are in the dataset but SEG_OUTPUT has no label map for it, or if
its label map cannot be read (missing values of the convention, wrong dimensions, a corrupt
file: the reason is given). A label map whose images are missing, unreadable or on another grid
is still reported, drawn on a blank background, with a note saying why.

Display orientation (radiological, as `report.overlay_png`): every volume is first reoriented
from its affine's axis codes to L, P, S voxel axes (x to the patient's left, y to posterior, z
to superior), then shown with
    axial:    rows anterior -> posterior, columns patient right -> left (right on the left);
    coronal:  rows superior -> inferior,  columns patient right -> left;
    sagittal: rows superior -> inferior,  columns anterior -> posterior.
Each view is resampled (nearest neighbour) to square pixels of `pixel_pitch` mm, so that an
anisotropic voxel size keeps the anatomy's proportions.

Label convention of the label maps: --labels if given; else the one named in SEG_OUTPUT's
labels.ctbl (written by `tumorseg segment`); else the dataset case's own; else brats2017.
"""

from __future__ import annotations

import base64
import csv
import io as _io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg import io
from tumorseg.datasets import MODALITIES, find_cases, load_case
from tumorseg.errors import TumorsegInputError, one_line
from tumorseg.evaluation import PREDICTION_SUFFIXES
from tumorseg.labels import CONVENTIONS, REGION_NAMES, get_convention
from tumorseg.metrics import AFFINE_TOLERANCE_MM, label_volumes
from tumorseg.report import _rgba, _window, convention_colours

VIEWS = ("axial", "coronal", "sagittal")
DISPLAY_AXCODES = ("L", "P", "S")  # voxel axes of the displayed volume, see the module docstring
MAX_VIEW_PIXELS = 512  # the longest side of a view; coarser pixels beyond that
DISPLAY_PIXELS = 300  # the longest side of a case's views on the page (CSS pixels)
# The patient's direction at each edge of a view (letters drawn on the page).
VIEW_EDGES = {
    "axial": {"top": "A", "bottom": "P", "left": "R", "right": "L"},
    "coronal": {"top": "S", "bottom": "I", "left": "R", "right": "L"},
    "sagittal": {"top": "S", "bottom": "I", "left": "A", "right": "P"},
}
DEFAULT_CONVENTION = "brats2017"  # as segment's for explicit files
# segment's `<case>_probabilities.nii.gz` (segment.PROBABILITIES_SUFFIX) is 4-D, not a label map;
# segment.py imports torch, which a report does not need.
_PROBABILITIES = "_probabilities"
_CTBL_CONVENTION = re.compile(r"^# \d+ values, tumorseg (\S+) labels$", re.MULTILINE)


# -- inputs ------------------------------------------------------------------------------------


def find_label_maps(seg_dir: str | Path) -> dict[str, Path]:
    """{case_id: label map} for every `<case_id>.nii.gz` / `.nii` / `.mha` in seg_dir (not in
    sub-folders), sorted by case id; hidden files (temporaries) and `<case_id>_probabilities`
    files are skipped. Where one case id has several formats, .nii.gz wins, then .nii, .mha
    (as `tumorseg evaluate` pairs them)."""
    seg_dir = Path(seg_dir)
    found: dict[str, Path] = {}
    for suffix in PREDICTION_SUFFIXES:
        for path in sorted(seg_dir.glob(f"*{suffix}")):
            case_id = path.name[: -len(suffix)]
            if (not path.is_file() or path.name.startswith(".") or not case_id
                    or case_id.endswith(_PROBABILITIES) or case_id in found):
                continue
            found[case_id] = path
    return dict(sorted(found.items()))


def seg_dir_convention(seg_dir: str | Path) -> str | None:
    """The label convention named in seg_dir/labels.ctbl (the 3D Slicer colour table that
    `tumorseg segment` writes, `report.write_colour_tables`), or None if there is none."""
    path = Path(seg_dir) / "labels.ctbl"
    try:
        match = _CTBL_CONVENTION.search(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return match.group(1) if match and match.group(1) in CONVENTIONS else None


def read_metrics_csv(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """{case_id: {region: {"dice": float, "hd95": float (mm)}}} from the CSV `tumorseg evaluate
    -o` writes (columns case_id, region, dice, hd95, ...; one row per case and region; "nan"
    stays NaN). Raises TumorsegInputError (one line, with the line number) for a missing or
    unreadable file, a missing column, an unknown region or a value that is not a number."""
    path = Path(path)
    if not path.is_file():
        raise TumorsegInputError(path, "metrics CSV does not exist" if not path.exists()
                                 else "metrics CSV is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(_io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TumorsegInputError(path, f"cannot read the metrics CSV: {one_line(exc)}") from None
    header = rows[0] if rows else []
    missing = [c for c in ("case_id", "region", "dice", "hd95") if c not in header]
    if missing:
        raise TumorsegInputError(path, f"not a metrics CSV of `tumorseg evaluate -o`: no "
                                       f"column {', '.join(missing)}")
    col = {name: header.index(name) for name in ("case_id", "region", "dice", "hd95")}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise TumorsegInputError(path, f"line {line}: {len(row)} fields, the header has "
                                           f"{len(header)}")
        region = row[col["region"]]
        if region not in REGION_NAMES:
            raise TumorsegInputError(path, f"line {line}: unknown region {region!r}; expected "
                                           f"one of {', '.join(REGION_NAMES)}")
        values = {}
        for name in ("dice", "hd95"):
            try:
                values[name] = float(row[col[name]])
            except ValueError:
                raise TumorsegInputError(path, f"line {line}: {name} {row[col[name]]!r} is not "
                                               "a number") from None
        out.setdefault(row[col["case_id"]], {})[region] = values
    return out


# -- views -------------------------------------------------------------------------------------


def _display_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the affine's voxel axes to DISPLAY_AXCODES."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine))
    return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(DISPLAY_AXCODES))


def to_display(volume: np.ndarray, affine: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """Reorient an (x, y, z) array to DISPLAY_AXCODES (L, P, S) voxel axes by flips and axis
    permutations only (no resampling), using the affine's axis codes. Returns (array,
    spacing in mm along the new axes)."""
    import nibabel as nib

    transform = _display_transform(affine)
    out_spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(transform):
        out_spacing[int(new_axis)] = float(spacing[axis])
    return nib.orientations.apply_orientation(volume, transform), tuple(out_spacing)


def _to_input_index(index: tuple[int, int, int], shape, affine: np.ndarray) -> tuple:
    """A voxel index of the display volume (to_display) -> the same voxel's index in the input
    array of `shape`."""
    transform = _display_transform(affine)
    out = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(transform):
        i = index[int(new_axis)]
        out[axis] = int(shape[axis] - 1 - i if flip < 0 else i)
    return tuple(out)


def pixel_pitch(shape, spacing) -> float:
    """Square pixel size (mm) of the views of an (x, y, z) volume: the finest voxel spacing,
    coarsened if needed so that no view side exceeds MAX_VIEW_PIXELS pixels."""
    extent = max(n * float(s) for n, s in zip(shape, spacing))
    return max(min(float(s) for s in spacing), extent / MAX_VIEW_PIXELS)


def view_size(n: int, spacing: float, pitch: float) -> int:
    """Pixels along one view axis of n voxels of `spacing` mm, at `pitch` mm per pixel."""
    return max(1, int(round(n * spacing / pitch)))


def _resample(img: np.ndarray, row_mm: float, col_mm: float, pitch: float) -> np.ndarray:
    """Nearest-neighbour resampling of a (rows, cols[, c]) image to square `pitch` mm pixels."""
    rows = view_size(img.shape[0], row_mm, pitch)
    cols = view_size(img.shape[1], col_mm, pitch)
    r = np.minimum(((np.arange(rows) + 0.5) * pitch / row_mm).astype(np.intp), img.shape[0] - 1)
    c = np.minimum(((np.arange(cols) + 0.5) * pitch / col_mm).astype(np.intp), img.shape[1] - 1)
    return img[r][:, c]


def _slices(vol: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The three display slices (rows, cols) of an L, P, S volume through `centre`."""
    i, j, k = centre
    return {
        "axial": vol[:, :, k].T,  # rows y (A -> P), columns x (R -> L)
        "coronal": vol[:, j, :].T[::-1],  # rows z (S -> I), columns x (R -> L)
        "sagittal": vol[i, :, :].T[::-1],  # rows z (S -> I), columns y (A -> P)
    }


_VIEW_MM = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # (row axis, column axis)


def orthogonal_views(labels_canonical: np.ndarray, affine: np.ndarray, spacing,
                     image: np.ndarray | None = None) -> dict:
    """RGB views of a label map through the centre of mass of its whole tumour.

    labels_canonical: (x, y, z) canonical classes 0..4. affine: 4x4 voxel -> RAS+ (mm);
    spacing: voxel size in mm (x, y, z). image: optional (x, y, z) background on the same grid
    (each slice windowed to its 1st-99th percentiles, labels blended with report.OVERLAY_ALPHA);
    without it the labels are drawn opaque on black.
    Returns {"centre": (x, y, z) voxel index (rounded centre of mass; the volume's middle if
    there is no tumour), "pitch": mm per pixel, "axial" | "coronal" | "sagittal": (rows, cols,
    3) uint8}. Orientation and pixel size: see the module docstring.
    """
    labels_canonical = np.asarray(labels_canonical)
    disp_labels, disp_spacing = to_display(labels_canonical, affine, spacing)
    # In display indices, so that the slices do not depend on the order the voxels are stored.
    tumour = np.argwhere(disp_labels > 0)
    if len(tumour):
        disp_centre = tuple(int(v) for v in np.floor(tumour.mean(axis=0) + 0.5))
    else:
        disp_centre = tuple(n // 2 for n in disp_labels.shape)
    centre = _to_input_index(disp_centre, labels_canonical.shape, affine)
    pitch = pixel_pitch(disp_labels.shape, disp_spacing)
    label_slices = _slices(disp_labels, disp_centre)
    image_slices = (_slices(to_display(np.asarray(image), affine, spacing)[0], disp_centre)
                    if image is not None else None)
    out: dict = {"centre": centre, "pitch": pitch}
    for view in VIEWS:
        rgba = _rgba(label_slices[view])  # report's colours, alpha 0 where there is no tumour
        if image_slices is None:
            alpha = (rgba[..., 3:] > 0).astype(np.float64)
            grey = np.zeros(rgba.shape[:2] + (1,))
        else:
            alpha = rgba[..., 3:]
            grey = _window(image_slices[view].astype(np.float64))[..., None]
        rgb = grey * (1.0 - alpha) + rgba[..., :3] * alpha
        rgb8 = np.round(rgb * 255.0).astype(np.uint8)
        row_axis, col_axis = _VIEW_MM[view]
        out[view] = _resample(rgb8, disp_spacing[row_axis], disp_spacing[col_axis], pitch)
    return out


def png_data_uri(rgb: np.ndarray) -> str:
    """A `data:image/png;base64,...` URI of a (rows, cols, 3) uint8 image."""
    from PIL import Image  # Pillow: installed with matplotlib, which writes PNGs with it

    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- the report --------------------------------------------------------------------------------


@dataclass
class _CaseRow:
    case_id: str
    volumes: dict
    metrics: dict
    convention: str
    spacing: tuple
    label_path: str
    centre: tuple
    views: dict = field(default_factory=dict)  # view -> {uri, width, height, display_*, edges}
    notes: list = field(default_factory=list)


def _cell(value: float | None, digits: int) -> dict:
    """A table cell: text shown and the exact value the sort script reads ('' = missing)."""
    if value is None:
        return {"text": "", "sort": ""}
    if not math.isfinite(value):
        return {"text": str(value), "sort": ""}
    return {"text": f"{value:.{digits}f}", "sort": repr(float(value))}


def write_report(seg_dir: str | Path, out_path: str | Path, images: str | Path | None = None,
                 metrics: str | Path | None = None, progress: bool = False,
                 labels: str | None = None, layout: str | None = None,
                 modality: str = "flair") -> dict:
    """Write the HTML report of the label maps in `seg_dir` to `out_path`, atomically.

    images: the dataset the labels were segmented from (any layout `find_cases` reads; cases
    matched by case id), for the background and to list the cases without a label map.
    metrics: the CSV of `tumorseg evaluate -o`. labels: convention of the label maps (default:
    see the module docstring); layout: of `images`; modality: background drawn under the labels
    (one of MODALITIES). progress: a tqdm bar over the cases.
    Returns {"path", "cases": [{"case_id", "whole_ml", "core_ml", "enhancing_ml", "voxels_<v>",
    "convention", "metrics": {region: {"dice", "hd95"}}, "notes"}], "failed": [{"case_id",
    "reason"}]}. Raises TumorsegInputError for a missing seg_dir or one without label maps, an
    out_path that is a folder, a bad metrics CSV or --images folder.
    """
    from tqdm import tqdm

    seg_dir, out_path = Path(seg_dir), Path(out_path)
    if not seg_dir.is_dir():
        raise TumorsegInputError(seg_dir, "segmentation folder does not exist" if not
                                 seg_dir.exists() else "not a folder: -i names the folder "
                                 "`tumorseg segment` wrote")
    if out_path.is_dir():
        raise TumorsegInputError(out_path, "is a folder: -o names the HTML file to write")
    if modality not in MODALITIES:
        raise TumorsegInputError("--modality", f"unknown modality {modality!r}; valid: "
                                               f"{', '.join(MODALITIES)}")
    if labels is not None:
        get_convention(labels)  # validates the name
    label_maps = find_label_maps(seg_dir)
    if not label_maps:
        raise TumorsegInputError(seg_dir, "no label maps (<case_id>.nii.gz, .nii or .mha) in "
                                          "this folder")
    scores = read_metrics_csv(metrics) if metrics is not None else {}
    cases, image_errors = {}, {}
    if images is not None:
        errors: list = []
        for case in find_cases(images, layout=layout, errors=errors):
            cases[case.case_id] = case
        image_errors = {str(cid): err for cid, err in errors}
    seg_convention = labels or seg_dir_convention(seg_dir)

    failed = [{"case_id": cid, "reason": f"no label map in {seg_dir} (expected {cid}.nii.gz, "
                                         ".nii or .mha)"}
              for cid in sorted(set(cases) | set(image_errors)) if cid not in label_maps]
    rows: list[_CaseRow] = []
    for case_id, path in tqdm(label_maps.items(), desc="report", unit="case",
                              disable=not progress):
        case = cases.get(case_id)
        # Any error fails this case only (KeyboardInterrupt stops), saying which step failed.
        try:
            vol = io.read_volume(path, allowed_ndim=(3,))
            convention = get_convention(seg_convention or (case.convention if case else None)
                                        or DEFAULT_CONVENTION)
            canonical = convention.encode(vol.data, where=str(path))  # validates the values
        except Exception as exc:
            failed.append({"case_id": case_id, "reason": f"label map cannot be read: "
                                                         f"{one_line(exc)}"})
            continue
        try:
            background, notes = _background(vol, case, image_errors.get(case_id), images,
                                            modality)
            rows.append(_case_row(case_id, vol, convention, canonical, background, notes,
                                  scores.get(case_id, {})))
            del background  # a view of all four modalities: not kept while the next case loads
        except Exception as exc:  # out of memory, a bug
            failed.append({"case_id": case_id, "reason": f"not reported: {one_line(exc)}"})
    failed.sort(key=lambda f: f["case_id"])

    html = _render(rows, failed, seg_dir, images, metrics, modality, bool(scores))
    with io.atomic_write(out_path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return {
        "path": str(out_path),
        "cases": [{"case_id": r.case_id, **r.volumes, "convention": r.convention,
                   "metrics": r.metrics, "notes": r.notes} for r in rows],
        "failed": failed,
    }


def _background(vol, case, image_error, images, modality: str
                ) -> tuple[np.ndarray | None, list[str]]:
    """The `modality` image drawn under label map `vol` (None if there is none to show, or it
    does not match the label map's grid) and the notes that say why not."""
    if images is None:
        return None, []
    if image_error is not None:
        return None, [f"images not shown: {one_line(image_error)}"]
    if case is None:
        return None, [f"no images for this case in {images}"]
    try:
        loaded = load_case(case)
        if loaded.image.shape[1:] != vol.data.shape:
            return None, [f"images not shown: shape {loaded.image.shape[1:]} != label map "
                          f"shape {vol.data.shape}"]
        if not np.allclose(loaded.reference.affine, vol.affine, atol=AFFINE_TOLERANCE_MM):
            return None, ["images not shown: their affine differs from the label map's"]
        return loaded.image[MODALITIES.index(modality)], []
    except Exception as exc:  # bad images cost the background only
        return None, [f"images not shown: {one_line(exc)}"]


def _case_row(case_id, vol, convention, canonical, background, notes, scores) -> _CaseRow:
    """One case's volumes, metrics and views from its label map `vol` (file values) and
    `canonical` (the same in canonical classes), drawn over `background` (or none)."""
    volumes = label_volumes(vol.data, convention, vol.spacing)
    views = orthogonal_views(canonical, vol.affine, vol.spacing, background)
    row = _CaseRow(case_id, volumes, scores, convention.name, vol.spacing, str(vol.path),
                   views["centre"])
    # One scale for the three views, so that the same millimetre has the same size in each.
    scale = DISPLAY_PIXELS / max(max(views[v].shape[:2]) for v in VIEWS)
    for view in VIEWS:
        rgb = views[view]
        row.views[view] = {"uri": png_data_uri(rgb), "width": rgb.shape[1],
                           "height": rgb.shape[0], "display_width": round(rgb.shape[1] * scale),
                           "display_height": round(rgb.shape[0] * scale),
                           "edges": VIEW_EDGES[view]}
    row.notes = notes
    return row


def _render(rows, failed, seg_dir, images, metrics_path, modality, with_metrics) -> str:
    import jinja2

    from tumorseg import __version__

    env = jinja2.Environment(loader=jinja2.PackageLoader("tumorseg", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    table = []
    for r in rows:
        cells = [_cell(r.volumes[f"{region}_ml"], 2) for region in REGION_NAMES]
        if with_metrics:
            for name, digits in (("dice", 3), ("hd95", 2)):
                cells += [_cell(r.metrics[region][name] if region in r.metrics else None, digits)
                          for region in REGION_NAMES]
        table.append({"case_id": r.case_id, "cells": cells})
    # Column groups of the table, each over the regions; data-key "<key>_<region>".
    groups = [{"key": "volume_ml", "title": "volume (mL)"}]
    if with_metrics:
        groups += [{"key": "dice", "title": "Dice"}, {"key": "hd95_mm", "title": "HD95 (mm)"}]
    for index, group in enumerate(groups):
        group["index"] = index
    conventions = sorted({r.convention for r in rows}) or [DEFAULT_CONVENTION]
    legend = {}
    for name in conventions:
        for value, label, rgb in convention_colours(name):
            if value:
                legend.setdefault(rgb, []).append(label)
    return env.get_template("report.html.j2").render(
        version=__version__, seg_dir=str(seg_dir), images=str(images) if images else None,
        metrics=str(metrics_path) if metrics_path else None, modality=modality,
        groups=groups, table=table, rows=rows, failed=failed, views=VIEWS,
        regions=REGION_NAMES, with_metrics=with_metrics, conventions=conventions,
        legend=[{"rgb": "#%02x%02x%02x" % rgb, "names": " / ".join(dict.fromkeys(names))}
                for rgb, names in legend.items()])
