"""Training-time augmentation of dense tiles (not in Havaei et al.; off in the paper configs).

Drawn per tile from the step's numpy Generator (so a run stays reproducible and
resumable, see tumorseg.train):
- mirror: each tile is flipped along x and/or y, its input window and its targets together.
  The input window extends the output tile by the receptive field's margin, equal on both sides
  for every model here (rf odd), so the flipped input still lines up with the flipped targets;
- intensity: each modality of each tile is scaled by U(1 - scale, 1 + scale) and shifted by
  U(-shift, +shift) (in z-score units), on brain pixels only (preprocessing leaves 0 outside
  the brain, and zero padding must stay zero to match whole-slice inference);
- contrast (knee): before that, each modality's brain values above KNEE (1 z-score unit) are
  compressed towards it, v -> KNEE + (v - KNEE) * U(1 - knee, 1). Unlike scale and shift, this
  changes a bright lesion's contrast in standard deviations of the surrounding tissue: the
  oedema the model misses is 0.9-1.9 SD above normal brain in FLAIR, against 2-5 SD in the
  cases it segments well (docs/MODEL_CARD.md, scripts/oedema_contrast.py).
- rotation: each tile is turned by U(-rotate, +rotate) degrees about its centre as it is
  read from the slice (sampling.Sampler.rotated, before everything here), so the corners of
  its input window hold real neighbouring tissue; scanners and heads are not all aligned alike.
- oedema contrast: first of all, in half of the tiles (drawn per tile), each modality's oedema
  pixels (reference class 2, on the whole input window) are pulled towards the mean of the
  window's tumour-free brain, v -> m + (v - m) * U(1 - oedema, 1). Unlike knee, it touches only
  the tissue whose faint appearance the model misses, so bright healthy structures keep theirs.
- bias field: in half of the tiles (drawn per tile), a smooth field a + gy * u + gx * v (u, v
  running from -1 to 1 across the input window; a ~ U(-bias, bias), gy, gx ~ U(-bias/2, bias/2),
  z-score units) is added to the brain pixels of every modality, weighted per modality by
  U(0.5, 1), after the oedema fading and before knee, scale and shift. A scanner's
  receive-coil bias brightens or darkens all four sequences of a region together; after
  z-scoring, a slowly varying multiplicative bias is locally such an additive, nearly planar
  offset. Why: the false tumour along the frontal brain surface of the BRATS 2013 cases is
  tissue up to 1 SD brighter in every modality
  (docs/MODEL_CARD.md, Known failure modes), and the intensity shift draws each modality
  independently within +-shift, so the model never saw all four raised together by more
  than that (plus the scale). The equal-sign weights are a simplification: the crescent's
  profile is uneven (T1 +0.23 SD against FLAIR +1.07).

Why: the released weights fit their training cases far better than unseen ones
(../shared/notes/accuracy-diagnosis.md); scanners differ in contrast, and tumours occur in
either hemisphere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tumorseg.geometry import PLANES


OEDEMA = 2  # canonical class (tumorseg.labels)
KNEE = np.float32(1.0)  # z-score units: about the top sixth of normal brain lies above it


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations training applies; all off by default (the paper's recipe)."""

    mirror: bool = False  # random flips along x and y
    scale: float = 0.0  # per modality: multiply by U(1 - scale, 1 + scale)
    shift: float = 0.0  # per modality: add U(-shift, shift), z-score units
    knee: float = 0.0  # per modality: values above KNEE compressed by a factor U(1 - knee, 1)
    oedema: float = 0.0  # per modality, half the tiles: oedema contrast x U(1 - oedema, 1)
    planes: bool = False  # tiles from axial, coronal and sagittal slices (sampling.prepare)
    rotate: float = 0.0  # degrees: each tile turned by U(-rotate, rotate) (sampling.Sampler.rotated)
    bias: float = 0.0  # z-score units, half the tiles: planar offset up to +-bias at the centre

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale < 1.0 or self.shift < 0.0 or not 0.0 <= self.knee < 1.0 \
                or not 0.0 <= self.oedema < 1.0 or not 0.0 <= self.rotate <= 180.0 \
                or not 0.0 <= self.bias <= 5.0:
            raise ValueError(f"augment: need 0 <= scale < 1, shift >= 0, 0 <= knee < 1, "
                             f"0 <= oedema < 1, 0 <= rotate <= 180 and 0 <= bias <= 5, got "
                             f"scale={self.scale}, shift={self.shift}, knee={self.knee}, "
                             f"oedema={self.oedema}, rotate={self.rotate}, bias={self.bias}")

    @property
    def slicing(self) -> tuple[str, ...]:
        """The planes training slices each case in (geometry.PLANES)."""
        return tuple(PLANES) if self.planes else ("axial",)

    @property
    def enabled(self) -> bool:
        return self.mirror or self.scale > 0 or self.shift > 0 or self.knee > 0 \
            or self.oedema > 0 or self.bias > 0


def augment(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig, window_labels: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment a batch of tiles in place and return it.

    images: [N, C, T + rf - 1, T + rf - 1] float32; labels, weights: [N, T, T]; window_labels:
    [N, T + rf - 1, T + rf - 1] canonical classes on the input window, needed by `cfg.oedema`.
    The draws are made for all N tiles in a fixed order whatever `cfg` enables (the bias
    field's last, and only when cfg.bias > 0, still for all N tiles), so a rank that keeps a
    subset of the batch afterwards sees the same tiles as a single process.
    """
    if cfg.oedema > 0 and window_labels is None:
        raise ValueError("augment: oedema contrast needs the labels of the input windows")
    n, c = images.shape[:2]
    flips = rng.random((n, 2)) < 0.5
    scales = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale, (n, c)).astype(np.float32)
    shifts = rng.uniform(-cfg.shift, cfg.shift, (n, c)).astype(np.float32)
    slopes = rng.uniform(1.0 - cfg.knee, 1.0, (n, c)).astype(np.float32)  # after: older runs keep theirs
    faint = rng.random(n) < 0.5
    factors = rng.uniform(1.0 - cfg.oedema, 1.0, (n, c)).astype(np.float32)
    fields = _bias_fields(images.shape[-1], rng, cfg.bias, n, c) if cfg.bias > 0 else None
    for i in range(n):
        if cfg.oedema > 0 and faint[i]:
            _fade_oedema(images[i], window_labels[i], factors[i])
        if cfg.scale > 0 or cfg.shift > 0 or cfg.knee > 0 or fields is not None:
            brain = np.any(images[i] != 0, axis=0)
            for ch in range(c):
                v = images[i, ch][brain]
                if fields is not None:
                    v = v + fields[i, ch][brain]
                if cfg.knee > 0:
                    v = np.where(v > KNEE, KNEE + (v - KNEE) * slopes[i, ch], v)
                images[i, ch][brain] = v * scales[i, ch] + shifts[i, ch]
        if cfg.mirror:
            for axis in (0, 1):
                if flips[i, axis]:
                    images[i] = np.flip(images[i], axis + 1)
                    labels[i] = np.flip(labels[i], axis)
                    weights[i] = np.flip(weights[i], axis)
    return images, labels, weights


def _bias_fields(side: int, rng: np.random.Generator, bias: float, n: int, c: int) -> np.ndarray:
    """[n, c, side, side] float32 planar fields (zero for the half of the tiles left alone); drawn
    only when bias > 0 (after every other draw), so runs without it keep their random streams."""
    on = rng.random(n) < 0.5
    offset = rng.uniform(-bias, bias, n)
    slopes = rng.uniform(-bias / 2, bias / 2, (n, 2))
    weights = rng.uniform(0.5, 1.0, (n, c))
    u = np.linspace(-1.0, 1.0, side)
    plane = offset[:, None, None] + slopes[:, 0, None, None] * u[None, :, None] \
        + slopes[:, 1, None, None] * u[None, None, :]  # [n, rows, cols]
    return (on[:, None, None, None] * weights[:, :, None, None] * plane[:, None]).astype(np.float32)


def _fade_oedema(image: np.ndarray, window_labels: np.ndarray, factors: np.ndarray) -> None:
    """[C, S, S] in place: oedema (class 2) pulled towards the tumour-free brain mean by `factors`
    [C]; a window without both is left alone."""
    brain = np.any(image != 0, axis=0)  # zero outside the brain must stay zero
    oedema = (window_labels == OEDEMA) & brain
    healthy = (window_labels == 0) & brain
    if not oedema.any() or not healthy.any():
        return
    for ch in range(image.shape[0]):
        m = image[ch][healthy].mean()
        image[ch][oedema] = m + (image[ch][oedema] - m) * factors[ch]
