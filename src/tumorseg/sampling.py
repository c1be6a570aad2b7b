"""Where training looks: tile anchors and per-pixel loss weights.

A tile of T x T outputs needs an input window of (T + rf - 1)^2; T = 1 is the paper's single
33x33 patch. Slices are zero-padded by the model's receptive-field margin (`dense_padding`), so
every brain voxel of the cropped volume is a valid centre and patches that would leave the
volume see zeros, exactly as whole-slice inference does.

Sampling modes (paper, Sec. 3.2):
- balanced: anchors are drawn class-first (each canonical class present in the training set
  equally likely), and the loss is the mean over present classes of the per-class mean loss in
  the batch: the expected loss of balanced patch sampling, for any T. Two options (not in the
  paper) shift where anchors fall, the loss weights staying balanced: `healthy_share`, the
  fraction of anchors on healthy brain (the tumour/healthy ratio; 0 = 1/K as in the paper),
  and `border_share`, the fraction of those healthy anchors drawn within `border_mm` of the
  tumour (hard negatives: the tissue whose labels are hardest to place).
- natural: anchors uniform over brain voxels; loss is the plain mean over brain pixels.
- slice_weighted: natural anchors; each pixel is weighted by the inverse frequency of its class
  within its own tile's slice window (the public Keras re-implementation's variant).
Every output pixel outside the brain has weight 0.

All randomness comes from a numpy Generator the caller seeds per step, which makes a run
reproducible and resumable from any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tumorseg.geometry import PLANES
from tumorseg.labels import N_CLASSES
from tumorseg.models import dense_padding

SAMPLING_MODES = ("balanced", "natural", "slice_weighted")


@dataclass
class SliceData:
    """Training volumes, padded for tile extraction.

    images: per case (Z, 4, X + pad, Y + pad) float32; labels/masks: per case (Z, X, Y).
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    masks: list[np.ndarray]
    pad: tuple[int, int]
    case_ids: list[str]


def prepare(cases, receptive_field: int, planes: tuple[str, ...] = ("axial",)) -> SliceData:
    """Pad preprocessed cases (preprocess.Preprocessed with labels) for tile extraction.

    planes: the slicing planes each case contributes (geometry.PLANES); a case sliced in
    another plane than axial enters as one more volume, id "<case_id>@<plane>", with (X, Y, Z) permuted so
    that its slices stack along the last axis.
    """
    before, after = dense_padding(receptive_field)
    images, labels, masks, ids = [], [], [], []
    for pre in cases:
        for plane in planes:
            a, b, c = PLANES[plane]
            img = np.transpose(pre.image, (c + 1, 0, a + 1, b + 1))  # (4, X, Y, Z) -> (slices, 4, ., .)
            images.append(np.ascontiguousarray(
                np.pad(img, ((0, 0), (0, 0), (before, after), (before, after)))))
            labels.append(np.ascontiguousarray(np.transpose(pre.label, (c, a, b))))
            masks.append(np.ascontiguousarray(np.transpose(pre.mask, (c, a, b))))
            ids.append(pre.case_id if plane == "axial" else f"{pre.case_id}@{plane}")
    return SliceData(images, labels, masks, (before, after), ids)


class Sampler:
    """Draws tile anchors (case, z, x0, y0) and builds batches of tiles with loss weights."""

    def __init__(self, data: SliceData, receptive_field: int, tile: int, mode: str,
                 healthy_share: float = 0.0, border_share: float = 0.0, border_mm: float = 10.0):
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
        check_anchor_options(mode, healthy_share, border_share, border_mm)
        self.data, self.rf, self.tile, self.mode = data, receptive_field, tile, mode
        self.healthy_share, self.border_share = healthy_share, border_share
        # Flat voxel indices of each class inside the brain, per case: (Z, X, Y) order.
        self.index = [[np.flatnonzero((lab == c) & msk).astype(np.int64) for c in range(N_CLASSES)]
                      for lab, msk in zip(data.labels, data.masks)]
        self.counts = np.array([[len(ix) for ix in per] for per in self.index], dtype=np.float64)
        self.present = [c for c in range(N_CLASSES) if self.counts[:, c].sum() > 0]
        self.tumour = [c for c in self.present if c != 0]
        self.class_freq = class_frequencies(data)
        self.border = [border_voxels(lab, msk, border_mm) if border_share > 0 else
                       np.zeros(0, np.int64) for lab, msk in zip(data.labels, data.masks)]
        self.border_counts = np.array([len(ix) for ix in self.border], dtype=np.float64)
        if border_share > 0 and self.border_counts.sum() == 0:
            raise ValueError(f"border_share = {border_share}: no healthy brain voxel lies within "
                             f"{border_mm} mm of a tumour in the training cases")

    def _balanced_class(self, rng: np.random.Generator) -> int:
        if self.healthy_share <= 0 or not self.tumour or 0 not in self.present:
            return self.present[rng.integers(len(self.present))]
        if rng.random() < self.healthy_share:
            return 0
        return self.tumour[rng.integers(len(self.tumour))]

    def _anchor(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        border = False
        if self.mode == "balanced":
            c = self._balanced_class(rng)
            border = c == 0 and self.border_share > 0 and rng.random() < self.border_share
            weights = self.border_counts if border else self.counts[:, c]
        else:
            c, weights = None, self.counts.sum(1)
        case = int(rng.choice(len(weights), p=weights / weights.sum()))
        if c is None:
            sizes = self.counts[case]
            k = int(rng.integers(int(sizes.sum())))
            cls = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
            flat = self.index[case][cls][k - int(sizes[:cls].sum())]
        else:
            ix = self.border[case] if border else self.index[case][c]
            flat = ix[rng.integers(len(ix))]
        z, x, y = np.unravel_index(flat, self.data.labels[case].shape)
        # The anchor voxel sits at a uniformly random place inside the T x T output window.
        _, nx, ny = self.data.labels[case].shape
        x0 = int(np.clip(x - rng.integers(self.tile), 0, max(nx - self.tile, 0)))
        y0 = int(np.clip(y - rng.integers(self.tile), 0, max(ny - self.tile, 0)))
        return case, int(z), x0, y0

    def anchors(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
        return [self._anchor(rng) for _ in range(n)]

    def targets(self, anchors) -> tuple[np.ndarray, np.ndarray]:
        """Labels and loss weights [N, T, T] for `anchors`; weights sum to 1 over the batch.

        Output pixels beyond the slice (small slices) get label 0 and weight 0.
        """
        t = self.tile
        labels = np.zeros((len(anchors), t, t), np.int64)
        valid = np.zeros((len(anchors), t, t), bool)
        for i, (case, z, x0, y0) in enumerate(anchors):
            lab = self.data.labels[case][z, x0:x0 + t, y0:y0 + t]
            labels[i, :lab.shape[0], :lab.shape[1]] = lab
            valid[i, :lab.shape[0], :lab.shape[1]] = self.data.masks[case][z, x0:x0 + t, y0:y0 + t]
        return labels, class_weights(labels, valid, self.mode)

    def images(self, anchors) -> np.ndarray:
        """Input tiles [N, 4, T + rf - 1, T + rf - 1] (zero beyond the padded slice)."""
        size = self.tile + self.rf - 1
        out = np.zeros((len(anchors), 4, size, size), np.float32)
        for i, (case, z, x0, y0) in enumerate(anchors):
            win = self.data.images[case][z, :, x0:x0 + size, y0:y0 + size]
            out[i, :, :win.shape[1], :win.shape[2]] = win
        return out

    def rotated(self, anchors, angles: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tiles of `anchors` turned by `angles` [N] (radians) about each output tile's centre.

        Returns images [N, 4, S, S], labels and loss weights [N, T, T] and window labels [N, S, S]
        (S = T + rf - 1), read from the slice at rotated positions, so the window's corners hold
        real context rather than fill. Images are bilinear and set to 0 wherever the brain mask
        (nearest) is 0, keeping preprocessing's zero-outside-the-brain convention; labels and
        the mask are nearest-neighbour. Outside the slice: image 0, label 0, weight 0.
        """
        t, before = self.tile, self.data.pad[0]
        size = t + self.rf - 1
        n = len(anchors)
        images = np.zeros((n, 4, size, size), np.float32)
        labels = np.zeros((n, t, t), np.int64)
        valid = np.zeros((n, t, t), bool)
        window = np.zeros((n, size, size), np.int64)
        for i, (case, z, x0, y0) in enumerate(anchors):
            centre = (x0 + (t - 1) / 2, y0 + (t - 1) / 2)  # also the input window's centre (rf odd)
            lab, msk = self.data.labels[case][z], self.data.masks[case][z]
            win = _rotated_grid(size, centre, angles[i])  # unpadded slice coordinates
            out = _rotated_grid(t, centre, angles[i])
            brain = _nearest(msk, win).astype(bool)
            for ch in range(4):
                images[i, ch] = ndimage.map_coordinates(
                    self.data.images[case][z, ch], win + before, order=1, cval=0.0) * brain
            window[i] = _nearest(lab, win)
            labels[i] = _nearest(lab, out)
            valid[i] = _nearest(msk, out).astype(bool)
        return images, labels, class_weights(labels, valid, self.mode), window

    def window_labels(self, anchors) -> np.ndarray:
        """Labels [N, T + rf - 1, T + rf - 1] on the input windows of `anchors` (0 on padding)."""
        size, before = self.tile + self.rf - 1, self.data.pad[0]
        out = np.zeros((len(anchors), size, size), np.int64)
        for i, (case, z, x0, y0) in enumerate(anchors):
            lab = self.data.labels[case][z]
            xs, ys = x0 - before, y0 - before  # the window's corner in unpadded coordinates
            win = lab[max(xs, 0):xs + size, max(ys, 0):ys + size]
            out[i, max(-xs, 0):max(-xs, 0) + win.shape[0], max(-ys, 0):max(-ys, 0) + win.shape[1]] = win
        return out


def _rotated_grid(size: int, centre: tuple[float, float], angle: float) -> np.ndarray:
    """[2, size, size] source coordinates of a size x size grid centred on `centre`, turned by
    `angle` radians (angle 0: the plain window, integer positions)."""
    off = np.arange(size, dtype=np.float64) - (size - 1) / 2
    u, v = np.meshgrid(off, off, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + c * u - s * v, centre[1] + s * u + c * v])


def _nearest(array: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """`array` [X, Y] read at the nearest integer positions `coords` [2, ...]; 0 outside."""
    ix = np.rint(coords).astype(np.int64)
    inside = (ix[0] >= 0) & (ix[0] < array.shape[0]) & (ix[1] >= 0) & (ix[1] < array.shape[1])
    out = np.zeros(coords.shape[1:], array.dtype)
    out[inside] = array[ix[0][inside], ix[1][inside]]
    return out


def check_anchor_options(mode: str, healthy_share: float, border_share: float,
                         border_mm: float) -> None:
    """ValueError unless the balanced-sampling options are in range (and only used with it)."""
    if not 0 <= healthy_share < 1 or not 0 <= border_share <= 1 or border_mm <= 0:
        raise ValueError(f"need 0 <= healthy_share < 1, 0 <= border_share <= 1 and border_mm > 0; "
                         f"got {healthy_share}, {border_share}, {border_mm}")
    if mode != "balanced" and (healthy_share or border_share):
        raise ValueError(f"healthy_share and border_share shape balanced sampling; "
                         f"sampling is {mode!r}")


def border_voxels(label: np.ndarray, mask: np.ndarray, mm: float) -> np.ndarray:
    """Flat indices (in label's order) of healthy brain voxels within `mm` of a tumour voxel.

    label, mask: (Z, X, Y) on the model's 1 mm isotropic grid, so voxels are millimetres (and
    any slicing plane's permutation keeps distances). Empty without tumour.
    """
    from scipy import ndimage

    tumour = label > 0
    if not tumour.any():
        return np.zeros(0, np.int64)
    near = ndimage.distance_transform_edt(~tumour) <= mm
    return np.flatnonzero(near & ~tumour & mask).astype(np.int64)


def class_frequencies(data: SliceData) -> np.ndarray:
    """[5] fraction of brain voxels of each canonical class over all training cases."""
    total = sum(np.bincount(lab[msk], minlength=N_CLASSES) for lab, msk in zip(data.labels, data.masks))
    return total / total.sum()


def class_weights(labels: np.ndarray, valid: np.ndarray, mode: str) -> np.ndarray:
    """Per-pixel loss weights [N, T, T] (sum 1) reproducing `mode` (see module docstring)."""
    w = np.zeros(labels.shape, np.float64)
    if mode == "natural":
        w[valid] = 1.0
    elif mode == "balanced":
        present = [c for c in range(N_CLASSES) if np.any(valid & (labels == c))]
        for c in present:
            sel = valid & (labels == c)
            w[sel] = 1.0 / sel.sum()
    else:  # slice_weighted: inverse class frequency inside each tile, tiles weighted equally
        for i in range(len(labels)):
            present = [c for c in range(N_CLASSES) if np.any(valid[i] & (labels[i] == c))]
            for c in present:
                sel = valid[i] & (labels[i] == c)
                w[i][sel] = 1.0 / (sel.sum() * len(present))  # each tile sums to 1
    total = w.sum()
    return (w / total if total > 0 else w).astype(np.float32)
