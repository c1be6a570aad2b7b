"""To model space and back: orientation and voxel spacing.

The models see axial slices `image[..., k]` of BraTS-preprocessed volumes: voxel axes pointing
to the patient's Left, Posterior and Superior (axis codes "LPS", BraTS's own layout) at 1 mm
isotropic spacing. A scan stored otherwise (sagittal or coronal acquisition order, flipped
axes, 0.5 x 0.5 x 3 mm voxels) would be sliced along the wrong axis or at the wrong scale and
segmented wrongly without a word, so every case is brought into the model's space first:

1. reorient: permute and flip the array axes (exact, no interpolation) so that its axis codes
   are the model's (nibabel.orientations; an oblique scan takes its nearest axes);
2. resample, if any spacing differs from the model's by more than SPACING_TOLERANCE mm:
   images by linear interpolation (scipy.ndimage.affine_transform, order 1), label maps by
   nearest neighbour, onto a grid of the model's spacing that covers the same field of view
   (n_out = round(n_in * s_in / s_model) voxels per axis, voxel centres aligned as in
   `_source_coordinates`).

`Transform` records both steps; `Transform.to_input` maps a model-space map (labels or
probabilities) back onto the input's exact grid by nearest neighbour, so the output has the
input's shape and is written with its header and affine. On BraTS data both steps are the
identity and cost nothing.

The model space is stored in every model file (meta["geometry"]); model files written before it
existed are BraTS-trained and get `MODEL_SPACE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_AXCODES = "LPS"
MODEL_SPACING = (1.0, 1.0, 1.0)
SPACING_TOLERANCE = 0.01  # mm: closer than this to the model's spacing counts as equal
# Plausible MRI grids: voxels of 0.1-10 mm, a field of view of at most 512 voxels of the model's
# grid per axis (a head is ~200 mm). Outside that the header is wrong (or it is not a head
# scan), and resampling could need tens of GB.
MIN_SPACING, MAX_SPACING = 0.1, 10.0
MAX_MODEL_SIDE = 512
# Slicing planes of a volume (X, Y, Z) in model space: (in-plane axis, in-plane axis, axis
# across slices). A 2-D model slices axially; training and inference may also slice the others.
PLANES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


@dataclass(frozen=True)
class ModelSpace:
    """Orientation (3 axis codes, nibabel's convention) and voxel spacing (mm) a model expects."""

    axcodes: str = MODEL_AXCODES
    spacing: tuple[float, float, float] = MODEL_SPACING

    def __post_init__(self) -> None:
        pairs = [set(p) for p in ("LR", "PA", "IS")]
        if len(self.axcodes) != 3 or sorted(
                next((i for i, p in enumerate(pairs) if c in p), -1) for c in self.axcodes
        ) != [0, 1, 2]:
            raise ValueError(f"axcodes must name each of L/R, P/A, I/S once, got "
                             f"{self.axcodes!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm), got {self.spacing!r}")

    def affine(self) -> np.ndarray:
        """A 4x4 voxel -> RAS+ mm affine of this space (origin 0): for display."""
        import nibabel.orientations as nio

        out = np.eye(4)
        out[:3, :3] = 0
        for i, (axis, flip) in enumerate(nio.axcodes2ornt(tuple(self.axcodes))):
            out[int(axis), i] = flip * self.spacing[i]
        return out

    def to_dict(self) -> dict:
        return {"axcodes": self.axcodes, "spacing": [float(s) for s in self.spacing]}

    @classmethod
    def from_meta(cls, meta: dict) -> "ModelSpace":
        """The model space of a model file's meta (BraTS's for files without one)."""
        g = meta.get("geometry") or {}
        return cls(str(g.get("axcodes", MODEL_AXCODES)),
                   tuple(float(s) for s in g.get("spacing", MODEL_SPACING)))  # type: ignore[arg-type]


MODEL_SPACE = ModelSpace()


@dataclass(frozen=True)
class Transform:
    """Input grid -> model grid: reorientation `ornt` (nibabel's [axis, flip] rows, applied
    first), then per-axis resampling from `oriented_shape` at `oriented_spacing` to
    `model_shape` at the model's spacing. `input_shape` is the input's (x, y, z)."""

    ornt: np.ndarray
    input_shape: tuple[int, int, int]
    oriented_shape: tuple[int, int, int]
    oriented_spacing: tuple[float, float, float]
    model_shape: tuple[int, int, int]
    model_spacing: tuple[float, float, float]

    @property
    def reorients(self) -> bool:
        return not np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]])

    @property
    def resamples(self) -> bool:
        return self.oriented_shape != self.model_shape or any(
            abs(a - b) > SPACING_TOLERANCE for a, b in zip(self.oriented_spacing,
                                                           self.model_spacing))

    @property
    def identity(self) -> bool:
        return not (self.reorients or self.resamples)

    def to_model(self, data: np.ndarray, order: int) -> np.ndarray:
        """(x, y, z[, ...]) input-grid array -> model grid. order 1: linear (images), 0:
        nearest neighbour (label maps). Trailing axes (channels) are carried along."""
        out = _apply_ornt(data, self.ornt)
        if not self.resamples:
            return out
        if order == 0:
            idx = [_nearest(n_out, n_in, s_in, s_out) for n_out, n_in, s_in, s_out in
                   zip(self.model_shape, self.oriented_shape, self.oriented_spacing,
                       self.model_spacing)]
            return out[np.ix_(*idx)]
        return _linear(out, self.oriented_shape, self.oriented_spacing, self.model_shape,
                       self.model_spacing)

    def to_input(self, data: np.ndarray) -> np.ndarray:
        """(x, y, z[, ...]) model-grid array -> the input's grid, by nearest neighbour: each
        input voxel takes the model voxel whose centre is nearest to its own."""
        if self.resamples:
            idx = [_nearest(n_in, n_out, s_out, s_in) for n_in, n_out, s_in, s_out in
                   zip(self.oriented_shape, self.model_shape, self.oriented_spacing,
                       self.model_spacing)]
            data = data[np.ix_(*idx)]
        return _apply_ornt(data, _inverse_ornt(self.ornt))


def transform_for(affine: np.ndarray, shape: tuple[int, int, int],
                  space: ModelSpace = MODEL_SPACE) -> Transform:
    """The Transform from a (x, y, z) grid with this 4x4 voxel -> RAS+ mm `affine` to `space`."""
    import nibabel.orientations as nio

    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(space.axcodes)))
    spacing = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))
    axes = ornt[:, 0].astype(int)
    oriented_shape = [0, 0, 0]
    oriented_spacing = [0.0, 0.0, 0.0]
    for src in range(3):  # input axis src becomes output axis axes[src]
        oriented_shape[axes[src]] = int(shape[src])
        oriented_spacing[axes[src]] = float(spacing[src])
    model_shape = tuple(
        n if abs(s - t) <= SPACING_TOLERANCE else max(1, int(round(n * s / t)))
        for n, s, t in zip(oriented_shape, oriented_spacing, space.spacing))
    return Transform(ornt, tuple(int(s) for s in shape), tuple(oriented_shape),  # type: ignore[arg-type]
                     tuple(oriented_spacing), model_shape, tuple(space.spacing))  # type: ignore[arg-type]


def _apply_ornt(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """nibabel.orientations.apply_orientation on the first three axes (trailing ones kept)."""
    import nibabel.orientations as nio

    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data
    return np.ascontiguousarray(nio.apply_orientation(data, ornt))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `ornt`."""
    inv = np.zeros_like(ornt)
    for src, (dst, flip) in enumerate(ornt):
        inv[int(dst)] = (src, flip)
    return inv


def _source_coordinates(n_out: int, s_src: float, s_out: float) -> np.ndarray:
    """Continuous source-grid index of each of `n_out` output voxel centres, both grids
    starting at the same edge: centre (j + 0.5) * s_out mm = (i + 0.5) * s_src mm."""
    return (np.arange(n_out) + 0.5) * (s_out / s_src) - 0.5


def _nearest(n_out: int, n_src: int, s_src: float, s_out: float) -> np.ndarray:
    """Index of the nearest source voxel for each output voxel (clipped to the grid)."""
    return np.clip(np.floor(_source_coordinates(n_out, s_src, s_out) + 0.5), 0,
                   n_src - 1).astype(np.intp)


def _linear(data: np.ndarray, shape, spacing, out_shape, out_spacing) -> np.ndarray:
    """Linear resampling of the first three axes; edges clamp to the nearest voxel."""
    from scipy import ndimage

    scale = [o / s for s, o in zip(spacing, out_spacing)]
    offset = [0.5 * c - 0.5 for c in scale]
    lead = data.reshape(data.shape[:3] + (-1,))
    out = np.empty(tuple(out_shape) + (lead.shape[-1],), np.float32)
    for c in range(lead.shape[-1]):
        out[..., c] = ndimage.affine_transform(lead[..., c].astype(np.float32, copy=False), scale,
                                               offset, output_shape=tuple(out_shape), order=1,
                                               mode="nearest")
    return out.reshape(tuple(out_shape) + data.shape[3:])


def to_model_space(loaded, space: ModelSpace = MODEL_SPACE):
    """A datasets.LoadedCase in `space` (image (4, x', y', z'), label by nearest neighbour,
    spacing the model's) and the Transform that maps results back. The input's `reference`
    volume is kept: outputs are written on its grid. Identity on BraTS data (no copy)."""
    import dataclasses

    affine = np.asarray(loaded.reference.affine, np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        from tumorseg.errors import TumorsegInputError

        raise TumorsegInputError(loaded.reference.path, "the header's affine is not finite and "
                                 "invertible: voxel positions are unknown")
    t = transform_for(affine, loaded.reference.shape3, space)
    check_grid(t, loaded.reference.path)
    if t.identity:
        return loaded, t
    image = None
    if loaded.image is not None:
        image = np.ascontiguousarray(np.moveaxis(
            t.to_model(np.moveaxis(loaded.image, 0, -1), order=1), -1, 0), dtype=np.float32)
    label = None if loaded.label is None else t.to_model(loaded.label, order=0)
    spacing = t.model_spacing if t.resamples else t.oriented_spacing
    return dataclasses.replace(loaded, image=image, label=label, spacing=spacing), t


def check_grid(t: Transform, path) -> None:
    """Refuse (TumorsegInputError naming `path`) a grid no MRI head scan has: voxel sizes
    outside MIN_SPACING-MAX_SPACING mm, or a model-space side over MAX_MODEL_SIDE voxels."""
    from tumorseg.errors import TumorsegInputError

    spacing = t.oriented_spacing
    if not all(np.isfinite(spacing)) or min(spacing) < MIN_SPACING or max(spacing) > MAX_SPACING:
        raise TumorsegInputError(path, "voxel size " + " x ".join(f"{s:.3g}" for s in spacing)
                                 + f" mm (from the header's affine) is outside {MIN_SPACING}-"
                                 f"{MAX_SPACING:g} mm: is the header right?")
    if max(t.model_shape) > MAX_MODEL_SIDE:
        raise TumorsegInputError(path, f"field of view {t.model_shape} voxels at the model's "
                                       f"spacing exceeds {MAX_MODEL_SIDE} per axis: not a head "
                                       "scan, or a wrong header")
