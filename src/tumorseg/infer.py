"""Whole-slice dense inference.

`predict_volume` runs a model on every axial slice of a preprocessed volume in bounded batches;
each output pixel equals the patch classifier's output for the patch centred on it (see
models.dense_logits and tests/test_models.py). `predict_labels` is the memory-lean variant that
segmentation uses: it keeps only the argmax (uint8) and, on request, float16 probabilities, and
skips slices without brain. Post-processing lives in `tumorseg.postprocess`.

Memory: one batch of `batch_size` slices goes through the network at a time, and the activations
of that batch dominate the peak: about 250 MB per slice for input_cascade on a whole 240 x 240
BraTS slice (padded to 304 x 304), 200 MB for two_path. The default BATCH_SIZE = 4 keeps a
segmentation of a 240 x 240 x 155 case under 2 GB RSS even when the brain fills the slice; see
benchmarks/segment_case.py for the measured peak.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from tumorseg.errors import TumorsegInputError
from tumorseg.labels import N_CLASSES
from tumorseg.models import dense_logits

DEVICES = ("auto", "cpu", "cuda")
BATCH_SIZE = 4  # axial slices per forward pass in segmentation: bounds peak memory


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


def predict_labels(model: torch.nn.Module, image: np.ndarray, mask: np.ndarray | None = None,
                   batch_size: int = BATCH_SIZE, device: str | torch.device = "cpu",
                   probabilities: bool = False, progress: bool = False, desc: str = "slices"
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax labels (and optionally probabilities) of a preprocessed volume.

    image: (4, X, Y, Z) float32 preprocessed; mask: (X, Y, Z) bool brain, or None. Axial slices
    without any brain voxel are not run through the model: their labels are 0 and their
    probabilities (1, 0, 0, 0, 0). Elsewhere labels = argmax of the softmax, exactly as
    `predict_volume(...).argmax(0)`.

    Returns (labels (X, Y, Z) uint8 canonical classes, probabilities (X, Y, Z, 5) float16 or
    None). Memory: the outputs plus one batch of slices.
    """
    shape = image.shape[1:]
    zs = list(range(shape[2])) if mask is None else [int(z) for z in
                                                     np.flatnonzero(mask.any(axis=(0, 1)))]
    labels = np.zeros(shape, np.uint8)
    probs_out = None
    if probabilities:
        probs_out = np.zeros(shape + (N_CLASSES,), np.float16)
        probs_out[..., 0] = 1
    for start, probs in _slice_batches(model, image, zs, batch_size, device, progress, desc):
        chunk = zs[start:start + probs.shape[0]]
        labels[..., chunk] = np.moveaxis(probs.argmax(1).numpy().astype(np.uint8), 0, -1)
        if probs_out is not None:  # [b, 5, X, Y] -> (X, Y, b, 5)
            probs_out[:, :, chunk, :] = np.transpose(probs.numpy(), (2, 3, 0, 1))
    return labels, probs_out
