"""Whole-slice dense inference.

`predict_volume` runs a model on every whole axial slice of a preprocessed volume in bounded
batches; each output pixel equals the patch classifier's output for the patch centred on it (see
models.dense_logits and tests/test_models.py). `predict_labels` is what segmentation uses: it
runs each slice on its own brain box (about 0.6 of the volume box's pixels on BraTS), batches
boxes of equal size, skips slices without brain, and keeps only the argmax (uint8) and, on
request, float16 probabilities. Post-processing lives in `tumorseg.postprocess`. How each layer
is computed (direct, FFT, bf16) is `models.fastconv`'s choice.

Memory: one batch of `batch_size` boxes goes through the network at a time, and the activations
of that batch dominate the peak: about 250 MB per slice for input_cascade on a whole 240 x 240
BraTS slice (padded to 304 x 304), 200 MB for two_path. See benchmarks/segment_case.py for the
measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from tumorseg.errors import TumorsegInputError
from tumorseg.geometry import PLANES
from tumorseg.labels import N_CLASSES
from tumorseg.models import PATCH, Cascade, dense_logits, dense_padding, fastconv

DEVICES = ("auto", "cpu", "cuda")
BATCH_SIZE = 2  # slice boxes per forward pass: bounds peak memory (speed is the same at 4)


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' if available else 'cpu'; 'cuda' without CUDA is an input error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise TumorsegInputError("--device",
                                 f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TumorsegInputError("--device", f"{name} requested but CUDA is not available")
    return name


def _slice_batches(model: torch.nn.Module, image: np.ndarray, zs: list[int], batch_size: int,
                   device: str | torch.device, progress: bool, desc: str
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (position in `zs` of the batch's first slice, softmax [b, 5, X, Y] on the CPU)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    bar = tqdm(total=len(zs), desc=desc, unit="slice", disable=not progress, leave=False)
    try:
        for start in range(0, len(zs), batch_size):
            chunk = zs[start:start + batch_size]
            x = np.ascontiguousarray(np.moveaxis(image[..., chunk], -1, 0))  # [b, 4, X, Y]
            with torch.no_grad():
                probs = torch.softmax(dense_logits(model, torch.from_numpy(x).to(device)), dim=1)
            yield start, probs.cpu()
            bar.update(len(chunk))
    finally:
        bar.close()


def predict_volume(model: torch.nn.Module, image: np.ndarray, slices: Sequence[int] | None = None,
                   batch_size: int = 4, device: str | torch.device = "cpu",
                   progress: bool = False, desc: str = "slices") -> np.ndarray:
    """Softmax probabilities of a volume.

    image: (4, X, Y, Z) float32 preprocessed. Returns (5, X, Y, len(slices)) float32, slices along
    the last axis (all Z slices by default). Memory: one batch of slices at a time.
    """
    zs = list(range(image.shape[-1])) if slices is None else list(slices)
    out = np.empty((N_CLASSES, image.shape[1], image.shape[2], len(zs)), np.float32)
    for start, probs in _slice_batches(model, image, zs, batch_size, device, progress, desc):
        out[..., start:start + probs.shape[0]] = np.moveaxis(probs.numpy(), 0, -1)
    return out


BOX_MULTIPLE = 16  # slice boxes are rounded up to multiples of this: few sizes, shared FFT plans


@dataclass(frozen=True)
class SliceBox:
    """The output window [x0, x0 + sx) x [y0, y0 + sy) of axial slice z."""

    z: int
    x0: int
    y0: int
    sx: int
    sy: int


def slice_boxes(mask: np.ndarray, multiple: int = BOX_MULTIPLE) -> list[SliceBox]:
    """One box per axial slice with brain: its brain's bounding box, each side rounded up to a
    multiple of `multiple` (or the slice's side), centred and kept inside the slice.

    mask: (X, Y, Z) bool. Returns the boxes from the largest to the smallest, then by z: batches
    of equal size follow each other (they share kernel spectra and oneDNN primitives), and each
    batch's tensors fit in the memory the larger batches before it freed.
    """
    nx, ny, _ = mask.shape
    boxes = []
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        m = mask[..., z]
        xs, ys = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        origin = []
        for lo, hi, n in ((xs[0], xs[-1] + 1, nx), (ys[0], ys[-1] + 1, ny)):
            size = min(n, -(-(hi - lo) // multiple) * multiple)
            start = min(max(0, lo - (size - (hi - lo)) // 2), n - size)
            origin.append((int(start), int(size)))
        (x0, sx), (y0, sy) = origin
        boxes.append(SliceBox(int(z), x0, y0, sx, sy))
    return sorted(boxes, key=lambda b: (-b.sx, -b.sy, b.z))


def _box_batches(boxes: list[SliceBox], batch_size: int) -> Iterator[list[SliceBox]]:
    """Consecutive boxes of equal size, at most `batch_size` at a time."""
    batch: list[SliceBox] = []
    for box in boxes:
        if batch and (len(batch) == batch_size or (box.sx, box.sy) != (batch[0].sx, batch[0].sy)):
            yield batch
            batch = []
        batch.append(box)
    if batch:
        yield batch


def _window(image: np.ndarray, batch: list[SliceBox], rf: int, before: int | None = None
            ) -> torch.Tensor:
    """The model input for a batch of equal-size boxes: [b, C, sx + rf - 1, sy + rf - 1], the
    box plus the receptive field's margin, zero outside the volume (as `dense_logits` pads).
    It starts `before` pixels before the box (default: `dense_padding(rf)`'s)."""
    if before is None:
        before, _ = dense_padding(rf)
    c, nx, ny, _ = image.shape
    sx, sy = batch[0].sx, batch[0].sy
    out = np.zeros((len(batch), c, sx + rf - 1, sy + rf - 1), np.float32)
    for i, b in enumerate(batch):
        x0, y0 = b.x0 - before, b.y0 - before
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + sx + rf - 1, nx), min(y0 + sy + rf - 1, ny)
        out[i, :, xa - x0:xb - x0, ya - y0:yb - y0] = image[:, xa:xb, ya:yb, b.z]
    return torch.from_numpy(out)


def _softmax(net: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, tta: bool
             ) -> torch.Tensor:
    """softmax(net(x, 0)) over classes, averaged with the x-mirrored input's, net(flip(x), 1),
    flipped back, when `tta` (the view index lets a cascade's second CNN take the first CNN's
    output of the same view); the window is symmetric about its box, so the flips line up."""
    probs = torch.softmax(net(x, 0), dim=1)
    if tta:
        probs += torch.softmax(net(x.flip(2), 1), dim=1).flip(2)
        probs *= 0.5
    return probs


def _box_probs(model: torch.nn.Module, image: np.ndarray, boxes: list[SliceBox], batch_size: int,
               device, tta: bool, bar) -> Iterator[tuple[list[SliceBox], torch.Tensor]]:
    """(batch of boxes, softmax [b, 5, sx, sy] on the CPU) for every box.

    A cascade runs stage by stage over all the boxes: the first CNN's probabilities of every
    box (plus the second CNN's margin) are kept, about 100 MB for a BraTS volume, then the
    second CNN runs. The results are those of the joint forward (same windows, same
    operations), but only one stage's kernel spectra (~200 MB each) and working set are alive
    at a time, which bounds the peak memory near a single TwoPathCNN's.
    """
    rf = model.receptive_field
    if not isinstance(model, Cascade):
        for batch in _box_batches(boxes, batch_size):
            with torch.no_grad():
                probs = _softmax(lambda v, _: model(v), _window(image, batch, rf).to(device), tta)
            bar.update(len(batch))
            yield batch, probs.cpu()
        return
    first: dict[int, list[torch.Tensor]] = {}
    for batch in _box_batches(boxes, batch_size):
        with torch.no_grad():
            x = _window(image, batch, rf).to(device)
            views = [x, x.flip(2)] if tta else [x]
            p1 = [torch.softmax(model.first(v), dim=1) for v in views]
        for i, b in enumerate(batch):
            first[b.z] = [p[i].clone() for p in p1]  # clone: do not pin the batch's tensor
        bar.update(len(batch))
    fastconv.release_spectra()  # the first stage's kernel spectra are not needed any more
    fastconv.release_freed_memory()  # nor its working set, whose block sizes stage 2 lacks
    before, _ = dense_padding(rf)
    o, r = model.offset, rf - PATCH
    for batch in _box_batches(boxes, batch_size):
        with torch.no_grad():
            x2 = _window(image, batch, rf - r, before - o).to(device)  # joint forward's x2
            p1 = [torch.stack([first[b.z][k] for b in batch]) for k in range(1 + tta)]
            probs = _softmax(lambda v, k: model.second_stage(v, p1[k]), x2, tta)
        for b in batch:
            del first[b.z]
        bar.update(len(batch))
        yield batch, probs.cpu()
    fastconv.release_spectra()


def _argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """probs.argmax(1) as uint8 ([b, K, X, Y] -> [b, X, Y]), first maximum on ties like argmax;
    K - 1 elementwise passes, several times faster than argmax's strided reduction."""
    best, idx = probs[:, 0], torch.zeros(probs[:, 0].shape, dtype=torch.uint8)
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best
        best = torch.where(better, probs[:, c], best)
        idx.masked_fill_(better, c)
    return idx


@dataclass(frozen=True)
class InferOptions:
    """How `predict_labels` runs a model over a volume.

    batch_size: slice boxes per forward pass (bounds memory); device: torch device;
    probabilities: also return them; progress/desc: a tqdm bar over the slices and its label;
    crop_slices: each slice's brain box (True) or the whole slices with brain (False: the
    behaviour before the boxes, kept as the benchmarks' control);
    class_weights: [5] factors the probabilities are multiplied by (and renormalised) before
    the argmax, e.g. a prior correction (train.prior_correction); None = 1;
    tta: mirror test-time augmentation: the probabilities are the mean of the slice's and its
    left-right (x) mirror's, at twice the compute;
    planes: slice the volume in each of these planes (geometry.PLANES) and average the
    probabilities, at len(planes) times the compute; ("axial",) is the paper's inference.
    """

    batch_size: int = BATCH_SIZE
    device: str | torch.device = "cpu"
    probabilities: bool = False
    progress: bool = False
    desc: str = "slices"
    crop_slices: bool = True
    class_weights: Sequence[float] | None = None
    tta: bool = False
    planes: Sequence[str] = ("axial",)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        planes = list(self.planes)
        if not planes or len(set(planes)) != len(planes) or set(planes) - set(PLANES):
            raise TumorsegInputError("--views", f"planes must be distinct names from "
                                                f"{', '.join(PLANES)}, got {planes}")


def predict_labels(model: torch.nn.Module, image: np.ndarray, mask: np.ndarray | None = None,
                   options: InferOptions | None = None, **fields
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax labels (and optionally probabilities) of a preprocessed volume.

    image: (4, X, Y, Z) float32 preprocessed; mask: (X, Y, Z) bool brain, or None (every pixel).
    options: an InferOptions; `fields` replace some of its fields (predict_labels(m, x,
    tta=True)). The model runs on each slice's brain box only (`slice_boxes`), plus the
    receptive field's margin: inside the box every label is exactly
    `predict_volume(...).argmax(0)` (the box's input window holds every pixel its outputs see).
    Outside the boxes, and on slices without brain, labels are 0 and probabilities
    (1, 0, 0, 0, 0).

    Returns (labels (X, Y, Z) uint8 canonical classes, probabilities (X, Y, Z, 5) float16 or
    None). Memory: the outputs plus one batch of boxes.
    """
    from tqdm import tqdm

    opts = replace(options or InferOptions(), **fields)
    if tuple(opts.planes) != ("axial",):
        return _predict_planes(model, image, mask, opts)
    shape = image.shape[1:]
    if mask is None:
        region = np.ones(shape, bool)
    elif opts.crop_slices:
        region = mask
    else:  # whole slices, those with brain
        region = np.zeros(shape, bool)
        region[..., mask.any(axis=(0, 1))] = True
    boxes = slice_boxes(region)
    labels = np.zeros(shape, np.uint8)
    probs_out = None
    if opts.probabilities:
        probs_out = np.zeros(shape + (N_CLASSES,), np.float16)
        probs_out[..., 0] = 1
    model.eval()
    rf = model.receptive_field
    weights = None
    if opts.class_weights is not None:
        weights = torch.as_tensor(opts.class_weights, dtype=torch.float32).reshape(1, -1, 1, 1)
    if opts.tta and len(set(dense_padding(rf))) != 1:  # an even receptive field: flips misalign
        raise TumorsegInputError("--tta", f"needs a model with an odd receptive field; this "
                                          f"one has {rf}")
    stages = 2 if isinstance(model, Cascade) else 1
    with tqdm(total=stages * len(boxes), desc=opts.desc, unit="slice", disable=not opts.progress,
              leave=False) as bar:
        for batch, probs in _box_probs(model, image, boxes, opts.batch_size, opts.device, opts.tta,
                                         bar):
            if weights is not None:
                probs *= weights
                probs /= probs.sum(1, keepdim=True)
            lab = _argmax_classes(probs).numpy()
            for i, b in enumerate(batch):
                window = (slice(b.x0, b.x0 + b.sx), slice(b.y0, b.y0 + b.sy), b.z)
                labels[window] = lab[i]
                if probs_out is not None:  # [5, sx, sy] -> (sx, sy, 5)
                    probs_out[window] = np.moveaxis(probs[i].numpy(), 0, -1)
    return labels, probs_out


def _predict_planes(model: torch.nn.Module, image: np.ndarray, mask: np.ndarray | None,
                    opts: InferOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """predict_labels over several slicing planes: each plane's probabilities (the volume's
    axes permuted so that its slices stack along the last axis, then permuted back) are
    averaged before the class weights and the argmax."""
    one_plane = replace(opts, planes=("axial",), probabilities=True, class_weights=None)
    total = None
    for plane in opts.planes:
        perm = PLANES[plane]
        sliced = np.ascontiguousarray(np.transpose(image, (0,) + tuple(a + 1 for a in perm)))
        _, probs = predict_labels(model, sliced, None if mask is None else
                                  np.ascontiguousarray(np.transpose(mask, perm)), one_plane)
        probs = torch.from_numpy(np.transpose(probs, tuple(np.argsort(perm)) + (3,)))
        total = probs.float() if total is None else total.add_(probs)
        del sliced, probs
    total /= len(opts.planes)
    if opts.class_weights is not None:
        total *= torch.as_tensor(opts.class_weights, dtype=torch.float32)
        total /= total.sum(-1, keepdim=True)
    labels = _argmax_classes(total.permute(3, 0, 1, 2).unsqueeze(0))[0].numpy()
    return labels, total.half().numpy() if opts.probabilities else None
