"""Label colour tables for ITK-SNAP and 3D Slicer, and overlay PNGs of one axial slice.

Colours are fixed per canonical class (BraTS / ITK-SNAP style): necrosis red, oedema green,
non-enhancing tumour blue, enhancing tumour yellow. A convention's file value takes the colour of
the canonical class it maps to, so "NCR/NET" (BraTS 2017) and "NETC" (BraTS 2023) are red and
every "enhancing" label is yellow.

Display orientation of overlays: radiological axial view, i.e. the patient's right on the left
of the image and anterior at the top, slice index along z. Arrays are (x, y, z) (see `io`); the
slice is shown with rows = y and columns = x. Without an affine the voxel axes are assumed to
point to patient Left and Posterior (LPS, the BraTS layout), which is already radiological with
row 0 at the top; with an affine, x and y are flipped as needed from its axis codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tumorseg import io
from tumorseg.datasets import MODALITIES
from tumorseg.labels import CLASS_NAMES, N_CLASSES, get_convention

# Canonical class -> (R, G, B), 0..255.
COLOURS: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0),
    1: (255, 0, 0),  # necrosis
    2: (0, 255, 0),  # oedema
    3: (0, 0, 255),  # non-enhancing tumour
    4: (255, 255, 0),  # enhancing tumour
}
OVERLAY_ALPHA = 0.5

_ITKSNAP_HEADER = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields:
#    IDX:   Zero-based index
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    MSH:   Label mesh visibility (0 or 1)
#  LABEL:   Label description
################################################
"""


def convention_colours(convention: str) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(file value, label name, RGB) for every value of a convention, sorted by value."""
    conv = get_convention(convention)
    return [
        (value, name, COLOURS[conv.to_canonical[value]])
        for value, name in sorted(conv.values.items())
    ]


def write_colour_tables(out_dir: str | Path, convention: str) -> list[Path]:
    """Write `labels.txt` (ITK-SNAP label descriptions) and `labels.ctbl` (3D Slicer colour
    table) for `convention` into out_dir, atomically. Returns both paths."""
    out_dir = Path(out_dir)
    entries = convention_colours(convention)

    snap_rows = []
    for value, name, (r, g, b) in entries:
        label, alpha, visible = (name, 1, 1) if value else ("Clear Label", 0, 0)
        snap_rows.append(
            f'{value:5d} {r:5d} {g:4d} {b:4d} {alpha:8d} {visible:2d} {visible:2d}    "{label}"'
        )
    snap_path = out_dir / "labels.txt"
    with io.atomic_write(snap_path) as tmp:
        tmp.write_text(_ITKSNAP_HEADER + "\n".join(snap_rows) + "\n")

    ctbl_path = out_dir / "labels.ctbl"
    lines = [
        f"# Color table file {ctbl_path.name}",
        f"# {len(entries)} values, tumorseg {convention} labels",
    ]
    for value, name, (r, g, b) in entries:
        # Slicer names are whitespace-separated tokens.
        token = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        lines.append(f"{value} {token} {r} {g} {b} {255 if value else 0}")
    with io.atomic_write(ctbl_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return [snap_path, ctbl_path]


def most_tumour_slice(labels: np.ndarray) -> int:
    """Index along z of the axial slice with the most tumour voxels (label > 0) in an (x, y, z)
    map; the lowest such index on ties, the middle slice if there is no tumour."""
    counts = np.count_nonzero(np.asarray(labels) > 0, axis=(0, 1))
    return int(np.argmax(counts)) if counts.any() else labels.shape[2] // 2


def _display(slice_xy: np.ndarray, flip_x: bool, flip_y: bool) -> np.ndarray:
    """(x, y) slice -> (rows = y, columns = x) image, row 0 drawn at the top."""
    img = slice_xy.T
    if flip_y:
        img = img[::-1, :]
    if flip_x:
        img = img[:, ::-1]
    return img


def _window(img: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the 1st-99th percentiles of the slice's non-zero voxels."""
    values = img[img != 0]
    if values.size == 0:
        return np.zeros_like(img, dtype=np.float64)
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _rgba(labels_2d: np.ndarray) -> np.ndarray:
    lut = np.zeros((N_CLASSES, 4))
    for cls, rgb in COLOURS.items():
        lut[cls, :3] = np.asarray(rgb) / 255.0
        lut[cls, 3] = OVERLAY_ALPHA if cls else 0.0
    return lut[labels_2d.astype(np.intp)]


def overlay_png(
    path: str | Path,
    image: np.ndarray,
    labels_canonical: np.ndarray,
    case_id: str,
    slice_index: int | None = None,
    title: str | None = None,
    reference: np.ndarray | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """Write a PNG of one axial slice: the four modalities, then the labels over FLAIR.

    image: (4, x, y, z) float, channels in MODALITIES order (t1, t1c, t2, flair).
    labels_canonical: (x, y, z) canonical classes 0..4 (e.g. a prediction).
    reference: optional (x, y, z) canonical ground truth, drawn in a further panel.
    slice_index: z index; default `most_tumour_slice` of the reference if given, else of
    labels_canonical. affine: optional 4x4 voxel -> RAS+ transform used to orient the display
    radiologically (see the module docstring). Written atomically; returns the path.
    """
    # The object-oriented Figure + Agg canvas needs no pyplot: no global backend switch and no
    # figure registry to leak, whatever backend the caller's session uses.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image)
    labels_canonical = np.asarray(labels_canonical)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise ValueError(f"image must be (4, x, y, z) in {MODALITIES} order, got {image.shape}")
    maps = [("prediction" if reference is not None else "labels", labels_canonical)]
    if reference is not None:
        maps.append(("reference", np.asarray(reference)))
    for name, arr in maps:
        if arr.shape != image.shape[1:]:
            raise ValueError(f"{name} shape {arr.shape} != image shape {image.shape[1:]}")
        if arr.size and (arr.min() < 0 or arr.max() >= N_CLASSES):
            raise ValueError(f"{name} must hold canonical classes 0..{N_CLASSES - 1}")
    if slice_index is None:
        slice_index = most_tumour_slice(maps[-1][1])
    if not 0 <= slice_index < image.shape[3]:
        raise ValueError(f"slice_index {slice_index} outside 0..{image.shape[3] - 1}")

    flip_x, flip_y = False, False
    if affine is not None:
        import nibabel as nib

        codes = nib.aff2axcodes(np.asarray(affine))
        flip_x, flip_y = codes[0] == "R", codes[1] == "A"

    k = slice_index
    flair = _window(_display(image[MODALITIES.index("flair"), :, :, k], flip_x, flip_y))
    n_panels = len(MODALITIES) + len(maps)
    fig = Figure(figsize=(3.0 * n_panels, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels)
    for ax, (c, name) in zip(axes, enumerate(MODALITIES)):
        grey = _window(_display(image[c, :, :, k], flip_x, flip_y))
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
    for ax, (name, arr) in zip(axes[len(MODALITIES) :], maps):
        ax.imshow(flair, cmap="gray", vmin=0, vmax=1)
        ax.imshow(_rgba(_display(arr[:, :, k], flip_x, flip_y)), interpolation="nearest")
        ax.set_title(f"{name} on flair")
    for ax in axes:
        ax.set_axis_off()
    handles = [
        Patch(facecolor=np.asarray(COLOURS[c]) / 255.0, label=CLASS_NAMES[c])
        for c in range(1, N_CLASSES)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    heading = f"{case_id}  axial slice z={k}"
    fig.suptitle(f"{title}\n{heading}" if title else heading)
    fig.tight_layout(rect=(0, 0.08, 1, 1))

    path = Path(path)
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    fig.clear()
    return path
