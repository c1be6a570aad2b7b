"""How a valid, stride-1 convolution and a stride-1 max pooling are computed on this machine.

The models call `conv2d` and `max_pool` and never know which implementation ran. Each call site
is identified by what decides the cost: the operation, the weight's shape, the input's size
class (sides in octaves), whether autograd records it and the dtype. The first call of a kind
runs every candidate on a probe (without autograd: the first item, cropped to the class's
smallest size; under autograd, small training tiles: the call's own input), keeps the fastest,
and remembers the choice (in memory, and in a plan file so that a later process on the same
machine makes the same choice: two runs then give bitwise identical outputs).

Convolution candidates:
- "direct": oneDNN's convolution; under autograd its gradients are computed as forward
  convolutions (`_DirectConvFn`), which oneDNN runs an order of magnitude faster than its own
  backward for the 13x13 and 21x21 kernels;
- "native" (under autograd only): oneDNN's convolution with its own backward, which wins for
  3x3 kernels;
- "fft": rfft2 of input and flipped kernel on a fast FFT size >= the input, the channel sum as
  real batched matrix products over frequencies, irfft2, crop to the valid region
  (`_FFTConvFn`, backward in the frequency domain too). Offered for kernels >= FFT_MIN_KERNEL:
  it wins for the 21x21 output layer (224 -> 5 maps) and loses for the 13x13 global layer
  (4 -> 320 maps, 320 inverse transforms), so the choice is measured, not assumed;
- "fft_h" (without autograd, for layers with more maps out than in): rfft along the height,
  the kernel's columns summed as one real matrix product per height frequency (a 28 MB
  kernel spectrum for the 13x13 layer, read once per product instead of once per frequency
  row as in the 2-D case), irfft (`conv_fft_h`). It wins for the 13x13 global layer
  (4 -> 320 maps) where the 2-D transform loses: about 2x the direct convolution's speed on
  a Zen 2 (AVX2 only), and about 4x, on a loaded machine, for the input cascade's 9 -> 320
  maps;
- "direct_bf16" and "bf16_cl" (only with precision "bf16"): the direct convolution on
  bfloat16 copies, fp32 out, in NCHW and in channels-last order (oneDNN uses AMX tiles for
  the latter where the CPU has them: 3.6-9x the fp32 speed of the hidden layers in inference,
  1.3-2x in training, on a Sapphire Rapids Xeon).

Pooling candidates (all exact; max is order-independent): NCHW `max_pool2d`, channels-last
`max_pool2d`, and shifted `torch.maximum` (log2 k steps per axis).

`EngineOptions(mode="plain")` forces the direct fp32 convolution and NCHW pooling everywhere:
the reference path of the tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from tumorseg.io import numpy_huge_pages

MODES = ("auto", "plain")
PRECISIONS = ("fp32", "bf16")
FFT_MIN_KERNEL = 7  # smaller kernels: the direct convolution always wins (O(k^2) vs O(log N))
PLAN_VERSION = 6  # bump when candidates or keys change: old plans are then ignored
# bf16 call sites gained a candidate ("bf16_cl") after version 3: their keys carry their own
# version, so that fp32 plans (and fp32 outputs) stay as they were.
PRECISION_KEYS = {"fp32": "fp32", "bf16": "bf16v2"}
# bf16 training call sites since direct_bf16's weight gradient moved to fp32 (`_DirectConvFn`):
# its cost changed, so those choices are measured again.
BF16_GRAD_KEY = "bf16v3"
MARGIN = 0.2  # a candidate must be 20% faster than the reference (direct / NCHW) to be chosen
CLEAR = 3.0  # a candidate this many times slower than the fastest after one run is not rerun
# Close calls: candidates within CLOSE of the fastest run ROUNDS more times, interleaved. On a
# shared VM a busy moment in two runs of 1-10 ms probes gave the 13 x 13 layer's largest size
# class the direct convolution in 2 of 12 fresh plans (Zen 4): 2.7 s more per two_path case
# (docs/PERFORMANCE.md).
CLOSE = 2.0
ROUNDS = 3


@dataclass(frozen=True)
class EngineOptions:
    """mode: "auto" (choose per call site by measurement) or "plain" (direct fp32, the
    reference); precision: "fp32" or "bf16" (opt-in: bfloat16 direct convolutions become
    candidates; labels agree with fp32 on >= 99.9% of brain voxels, see docs/PERFORMANCE.md)."""

    mode: str = "auto"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"engine mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


_state = threading.local()


def current() -> EngineOptions:
    """The options in force in this thread (default: auto, fp32)."""
    return getattr(_state, "options", None) or EngineOptions()


@contextlib.contextmanager
def options(opts: EngineOptions | None = None, **kwargs) -> Iterator[EngineOptions]:
    """Run a block with other engine options: `with fastconv.options(mode="plain"): ...`."""
    new = opts or EngineOptions(**{**current().__dict__, **kwargs})
    old = getattr(_state, "options", None)
    _state.options = new
    try:
        yield new
    finally:
        _state.options = old


# ---------------------------------------------------------------------------------------------
# Direct convolution with the fast backward.

class _DirectConvFn(torch.autograd.Function):
    """conv2d (valid, stride 1) whose gradients are computed as forward convolutions:
      d/dx = conv2d(pad(g, k-1), flip(W)^T)          (a full convolution)
      d/dW = conv2d(x^T, g^T)^T                      (batch and channel axes swapped)
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        k, l = weight.shape[-2:]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w_t = weight.flip(-2, -1).transpose(0, 1)  # [C, O, k, l]
            gx = F.conv2d(F.pad(g, (l - 1, l - 1, k - 1, k - 1)), w_t)
        if ctx.needs_input_grad[1]:
            # This convolution's kernel is the output map (e.g. 48 x 48), and oneDNN's bf16
            # convolution returns wrong sums for kernels of about 32 x 32 and more (torch
            # 2.13.0, AMX and AVX-512-BF16 CPUs; relative error ~1): the weight gradient of a
            # bf16 layer is computed in fp32.
            xs, gs = (x.float(), g.float()) if x.dtype == torch.bfloat16 else (x, g)
            gw = F.conv2d(xs.transpose(0, 1), gs.transpose(0, 1)).transpose(0, 1) \
                .to(weight.dtype)  # [O, C, k, l]
        if ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb


_MALLOPT: dict = {}  # libc handle and the settings reuse_freed_memory applied


@contextlib.contextmanager
def _own_mapping() -> Iterator[None]:
    """Allocations in this block get their own mmap again (as glibc does by default): for
    long-lived large blocks (kernel spectra), which would otherwise split the reused heap."""
    libc = _MALLOPT.get("libc")
    if libc is None:
        yield
        return
    libc.mallopt(-4, 65536)  # M_MMAP_MAX: glibc's default
    try:
        yield
    finally:
        libc.mallopt(-4, 0)


def release_freed_memory() -> None:
    """Return the heap's free memory to the OS (glibc malloc_trim) after `reuse_freed_memory`:
    between cases, so that one case's high-water mark does not add to the next one's."""
    libc = _MALLOPT.get("libc")
    if libc is not None:
        libc.malloc_trim(0)


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    glibc serves every block of >= 32 MB with a fresh mmap and unmaps it on free, so each
    large tensor of a layer page-faults all its pages again when the next batch allocates it:
    about 0.1 s per 100 MB tensor in a virtual machine, a third of whole-brain inference time.
    With M_MMAP_MAX = 0 and no trimming, freed blocks stay in the heap and are reused; the
    process's RSS then stays at its peak. Process-wide; segmentation and training call it.

    It also stops numpy from asking for transparent huge pages (its default for arrays of
    4 MB and more): in the virtual machines measured, the first touch of memory cost about
    3.3 ms per MB with huge pages against 0.8 ms with 4 kB pages (a 512 MB array: 1.7 vs
    0.4 s), which made reading a BraTS case 1.2 s instead of 0.7 s in a new process.
    Returns False where it is not glibc (nothing changes).
    """
    import ctypes
    import ctypes.util

    numpy_huge_pages(False)

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
        if ok:
            _MALLOPT["libc"] = libc
        return ok
    except (OSError, AttributeError):
        return False


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_direct(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Valid stride-1 conv2d: x [B, C, H, W] (or a list to concatenate along channels),
    weight [O, C, k, l] -> [B, O, H-k+1, W-l+1]."""
    x = _cat(x)
    if _needs_grad(x, weight, bias):
        return _DirectConvFn.apply(x, weight, bias)
    return F.conv2d(x, weight, bias)


def conv_native(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d with autograd's own (oneDNN) backward: faster than `_DirectConvFn` for 3x3."""
    return F.conv2d(_cat(x), weight, bias)


def conv_direct_bf16(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """`conv_direct` on bfloat16 copies of x and weight (bias added in fp32); fp32 out."""
    x = _cat(x)
    y = conv_direct(x.to(torch.bfloat16), weight.to(torch.bfloat16), None).to(x.dtype)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_bf16_cl(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's convolution on bfloat16 channels-last copies of x and weight, fp32 out, still
    channels-last: the maxout and shifted pooling after it keep that order, and the next bf16
    layer needs it. Those layers run slower on it (the maxout reads its pieces with a stride
    of 2; the FFT output layer transforms strided channels), but the whole network still gains:
    two_path with bf16 on Brats18_2013_11_1, 9.4-11.2 s of inference against 12.2-14.0 s with
    the result converted to NCHW (2026-12-06). Planner keys tell channels-last inputs apart.

    In channels-last order oneDNN runs bf16 on AMX tiles where the CPU has them: on the
    Sapphire Rapids VM the 13 x 13 global layer took 0.076 s against 0.205 s in NCHW bf16 and
    0.27 s in fp32 (2 slices of 176 x 192 outputs). Under autograd the gradients are oneDNN's
    bf16 backward, cast back to fp32 by autograd."""
    x = _cat(x)
    y = F.conv2d(x.to(torch.bfloat16, memory_format=torch.channels_last),
                 weight.to(torch.bfloat16, memory_format=torch.channels_last)).to(x.dtype)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# FFT convolution.

def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes MKL / pocketfft transform fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 5
        p3 *= 3
    return best


def _freq_major(z: torch.Tensor) -> torch.Tensor:
    """Complex [A, B, nh, nf] -> [nh*nf, A, B] (a strided view; `_cmatmul` copies it once)."""
    return z.permute(2, 3, 0, 1).flatten(0, 1)


def _spatial_major(z: torch.Tensor, nh: int, nf: int) -> torch.Tensor:
    """[nh*nf, A, B] -> [A, B, nh, nf] (a view)."""
    return z.view(nh, nf, *z.shape[1:]).permute(2, 3, 0, 1)


# Complex matrix products over frequencies as real bmm (CPU complex bmm of many small matrices
# runs matrix by matrix, about 10x slower). With the right-hand side b stored as `_icols(b)`
# (per row: re, then -im), a (viewed as interleaved re/im) times it gives re(ab), and i*a times
# it gives -im(ab).
def _icols(b: torch.Tensor) -> torch.Tensor:
    """Complex [F, m, p] -> real [F, 2m, p]: rows 2j = re(b_j), 2j+1 = -im(b_j)."""
    f, m, p = b.shape
    return torch.stack([b.real, -b.imag], 2).view(f, 2 * m, p)


def _cmatmul(a: torch.Tensor, b_icols: torch.Tensor) -> torch.Tensor:
    """a @ b for each frequency: a complex [F, n, m] (any strides), b as `_icols(b)` [F, 2m, p]
    -> complex [F, n, p]. Pass `a` without keeping a reference to it, so that it can be freed."""
    f, n, m = a.shape
    rows = a.new_empty(f, 2 * n, m)
    rows[:, :n] = a
    return _cmatmul_stacked(rows, b_icols)


def _cmatmul_stacked(rows: torch.Tensor, b_icols: torch.Tensor) -> torch.Tensor:
    """`_cmatmul` of a = rows[:, :n], given a contiguous complex buffer rows [F, 2n, m] whose
    second half it overwrites with i*a: one real bmm of the stacked rows then reads b, the
    large operand (a kernel spectrum), once instead of twice."""
    f, n2, m = rows.shape
    n = n2 // 2
    torch.mul(rows[:, :n], 1j, out=rows[:, n:])  # exact: (x + iy) i = -y + ix
    out = torch.bmm(torch.view_as_real(rows).view(f, n2, 2 * m), b_icols)  # [F, 2n, p]
    return torch.complex(out[:, :n], out[:, n:].neg())


def _kernel_icols(weight: torch.Tensor, nh: int, nw: int, storage: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """`_icols` of the rfft2 of the flipped kernel on an nh x nw grid: real [nh*nf, 2C, O].

    weight [O, C, k, l]. A real transform along the k rows, then the DFT along the k nonzero
    rows as one real matrix product laid out to give `_icols` directly: k/nh of the cost of a
    full transform along that axis, and no transposing copy of the (large) result.
    """
    o, c, k, _ = weight.shape
    # rfft along the kernel's columns, laid out [k, nf, C, O] (re, im last)
    r = torch.view_as_real(torch.fft.rfft(weight.flip(-2, -1).permute(2, 3, 1, 0), n=nw, dim=1))
    nf = r.shape[1]
    # (cos - i sin)(a + ib) = (cos a + sin b) + i (cos b - sin a), summed over the k rows:
    # re = [cos, -sin] @ [a; -b], -im = [cos, -sin] @ [-b; -a]
    phase = 2 * math.pi * torch.outer(torch.arange(nh, dtype=torch.float64),
                                      torch.arange(k, dtype=torch.float64)) / nh
    dft = torch.cat([phase.cos(), -phase.sin()], 1).to(weight.dtype).to(weight.device)
    re, im = r[..., 0], r[..., 1]
    rhs = torch.empty(2 * k, nf, c, 2, o, dtype=weight.dtype, device=weight.device)
    rhs[:k, :, :, 0] = re
    torch.neg(im, out=rhs[k:, :, :, 0])
    torch.neg(im, out=rhs[:k, :, :, 1])
    torch.neg(re, out=rhs[k:, :, :, 1])
    rhs = rhs.reshape(2 * k, nf * c * 2 * o)
    if storage is not None and storage.numel() >= nh * rhs.shape[1]:
        # Written into a previous spectrum's memory: no fresh pages to fault in per grid.
        out = storage.view(-1)[:nh * rhs.shape[1]].view(nh, rhs.shape[1])
        torch.matmul(dft, rhs, out=out)
    else:
        out = dft @ rhs  # [nh, nf * C * 2 * O]
    return out.view(nh * nf, 2 * c, o)


def _icols_numel(weight: torch.Tensor, nh: int, nw: int) -> int:
    """Elements of `_kernel_icols(weight, nh, nw)`."""
    o, c = weight.shape[:2]
    return nh * (nw // 2 + 1) * 2 * c * o


class _SpectrumCache:
    """A kernel spectrum of each weight at its last grid, for no-grad calls: inference visits
    batches grouped by size, so one grid per weight suffices (the two_path head's 2-D spectrum
    is 176 MB for a 180 x 216 grid; a cascade keeps one per stage). Entries are tied to the
    weight tensor itself (a weak reference, not its id, which a later tensor may reuse) and
    dropped with it. `build(weight, *grid, storage)` computes a spectrum, into `storage` (the
    previous one's memory) when given; `numel(weight, *grid)` is its size."""

    def __init__(self, build: Callable[..., torch.Tensor], numel: Callable[..., int]):
        self.build, self.numel = build, numel
        self.items: dict[int, tuple] = {}
        # Reentrant: a garbage collection while `get` holds the lock may free another weight
        # and run its weakref callback (`_drop`) in this very thread.
        self.lock = threading.RLock()

    def get(self, weight: torch.Tensor, *grid: int) -> torch.Tensor:
        key = (weight._version, weight.dtype, weight.device, *grid)
        with self.lock:
            held = self.items.get(id(weight))
            if held is None or held[0]() is not weight or held[1] != key:
                # The weight's previous spectrum: its memory takes the new one if large enough
                # (boxes come largest first), else it is freed before computing (the peak).
                old = self.items.pop(id(weight), None)
                storage = old[2] if old is not None and old[0]() is weight else None
                del old
                owner = id(weight)
                ref = weakref.ref(weight, lambda _, owner=owner: self._drop(owner))
                if storage is not None and storage.numel() < self.numel(weight, *grid):
                    storage = None
                with _own_mapping():
                    held = self.items[owner] = (ref, key, self.build(weight, *grid, storage))
            return held[2]

    def clear(self) -> None:
        with self.lock:
            self.items.clear()

    def _drop(self, owner: int) -> None:
        with self.lock:
            held = self.items.get(owner)
            if held is not None and held[0]() is None:
                del self.items[owner]


_spectra = _SpectrumCache(_kernel_icols, _icols_numel)


def release_spectra() -> None:
    """Drop every cached kernel spectrum (a cascade's inference does between its stages, so
    one stage's spectrum is alive at a time)."""
    _spectra.clear()
    _spectra_h.clear()


def _irfft_valid(yf: torch.Tensor, nh: int, nw: int, rows: slice, cols: slice) -> torch.Tensor:
    """irfft2 of a frequency-major [nh*nf, A, B] spectrum, cropped: [A, B, rows, cols]."""
    return torch.fft.irfft2(_spatial_major(yf, nh, nw // 2 + 1), s=(nh, nw))[..., rows, cols]


def _irfft_corner(yf: torch.Tensor, nh: int, nw: int, k: int, l: int) -> torch.Tensor:
    """irfft2(...)[..., :k, :l] of a frequency-major [nh*nf, A, B] spectrum -> [A, B, k, l]:
    the inverse DFT along rows onto the k rows needed only (one matrix product), then irfft
    along columns: k/nh of the transforms of a full irfft2."""
    nf = nw // 2 + 1
    f, a, b = yf.shape
    phase = 2 * math.pi * torch.outer(torch.arange(k, dtype=torch.float64),
                                      torch.arange(nh, dtype=torch.float64)) / nh
    idft = torch.polar(torch.ones_like(phase), phase).to(yf.dtype).to(yf.device) / nh  # [k, nh]
    rows = idft @ yf.view(nh, nf * a * b)  # [k, nf * A * B]
    rows = rows.view(k, nf, a, b).permute(2, 3, 0, 1)  # [A, B, k, nf]
    return torch.fft.irfft(rows, n=nw)[..., :l]  # irfft's 1/nw and idft's 1/nh: irfft2's norm


class _FFTConvFn(torch.autograd.Function):
    """Valid stride-1 conv2d through the FFT, forward and backward, of the channel
    concatenation of xs (without materialising it).

    With grids nh >= H, nw >= W, the circular convolution of x with the flipped, zero-padded
    kernel equals the valid output on rows k-1..H-1 (wrap-around only reaches rows < k-1). The
    gradients are the adjoint operations on the same grid (no wrap-around reaches them either):
      d/dx  = irfft2(G * conj(K))[:H, :W]
      d/dW' = irfft2(sum_b conj(X) * G)[:k, :l],  W = flip(W')
    where G is the spectrum of the output gradient placed at rows k-1.., cols l-1...
    """

    @staticmethod
    def forward(ctx, weight, bias, *xs):
        h, w = xs[0].shape[-2:]
        k, l = weight.shape[-2:]
        nh, nw = fft_size(h), fft_size(w)
        xf = _freq_major(torch.fft.rfft2(_padded(xs, nh, nw)))  # [F, B, C]
        kf = _kernel_icols(weight, nh, nw)  # [F, 2C, O]
        y = _irfft_valid(_cmatmul(xf, kf), nh, nw, slice(k - 1, h), slice(l - 1, w))
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(xf, kf)
        ctx.geometry = (h, w, k, l, nh, nw, [x.shape[1] for x in xs])
        return y.contiguous()

    @staticmethod
    def backward(ctx, g):
        xf, kf = ctx.saved_tensors
        h, w, k, l, nh, nw, splits = ctx.geometry
        gf = _freq_major(torch.fft.rfft2(F.pad(g, (l - 1, 0, k - 1, 0)), s=(nh, nw)))  # [F,B,O]
        gw = gb = None
        gxs = [None] * len(splits)
        if any(ctx.needs_input_grad[2:]):
            f, c2, o = kf.shape
            # kf rows per channel: re(K), -im(K). _icols(conj(K)^T) rows per output map:
            # re(K)^T, -im(conj K)^T = im(K)^T: one transposing multiply by (1, -1).
            sign = kf.new_tensor([1.0, -1.0]).view(1, 1, 2, 1)
            conj_kt = kf.new_empty(f, o, 2, c2 // 2)
            torch.mul(kf.view(f, c2 // 2, 2, o).permute(0, 3, 2, 1), sign, out=conj_kt)
            conj_kt = conj_kt.view(f, 2 * o, c2 // 2)
            gx = _cmatmul(gf, conj_kt)  # [F, B, C]
            gxs = list(_irfft_valid(gx, nh, nw, slice(0, h), slice(0, w)).split(splits, 1))
        if ctx.needs_input_grad[0]:
            # (sum_b conj(X) G)^T = G^T conj(X): the small operand G^T is the one _cmatmul
            # doubles, and _icols(conj X) = [re X; im X] is a plain copy of X.
            f, b, c = xf.shape
            conj_x = torch.view_as_real(xf).permute(0, 1, 3, 2).reshape(f, 2 * b, c)
            gw = _cmatmul(gf.transpose(1, 2), conj_x)  # [F, O, C]
            gw = _irfft_corner(gw, nh, nw, k, l).flip(-2, -1)  # [O, C, k, l]
        if ctx.needs_input_grad[1]:
            gb = g.sum((0, 2, 3))
        return (gw, gb, *gxs)


CHUNK_BYTES = 16 << 20  # frequency rows per step of `_contract`: a cache-sized working set


def _contract(xspec: torch.Tensor, k_icols: torch.Tensor) -> torch.Tensor:
    """The channel contraction of the spectra, a few frequency rows at a time: xspec complex
    [B, C, nh, nf], k_icols [nh*nf, 2C, O] -> complex [nh*nf, B, O]. Equal to
    `_cmatmul(_freq_major(xspec), k_icols)`, without a frequency-major copy of all of xspec."""
    b, c, nh, nf = xspec.shape
    out = torch.empty(nh * nf, b, k_icols.shape[-1], dtype=xspec.dtype, device=xspec.device)
    step = max(1, CHUNK_BYTES // (nf * b * c * xspec.element_size()))
    for r in range(0, nh, step):
        part = xspec[:, :, r:r + step]
        count = part.shape[2] * nf
        rows = xspec.new_empty(count, 2 * b, c)
        _transpose_into(rows[:, :b].view(part.shape[2], nf, b, c), part)
        out[r * nf:r * nf + count] = _cmatmul_stacked(rows, k_icols[r * nf:r * nf + count])
    return out


TRANSPOSE_BLOCK = 56  # channels per copy in `_transpose_into`


def _transpose_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[r, f, b, c] = src[b, c, r, f] (frequency-major), a block of channels of one image
    at a time: one strided copy of the whole reads and writes with no locality (14 -> 5 ms
    per [2, 224, 51, 91] complex block, one Zen 3 core). Same values."""
    b, c = src.shape[:2]
    for i in range(b):
        for c0 in range(0, c, TRANSPOSE_BLOCK):
            dst[:, :, i, c0:c0 + TRANSPOSE_BLOCK].copy_(
                src[i, c0:c0 + TRANSPOSE_BLOCK].permute(1, 2, 0))


def _padded(xs: Sequence[torch.Tensor], nh: int, nw: int) -> torch.Tensor:
    """The channel concatenation of xs ([B, C_i, H, W] each), zero-padded to [B, C, nh, nw]
    in one buffer: cheaper than torch.cat followed by rfft2's own padding copy."""
    b, _, h, w = xs[0].shape
    buf = xs[0].new_empty(b, sum(x.shape[1] for x in xs), nh, nw)
    buf[..., h:, :].zero_()
    buf[..., :h, w:].zero_()
    start = 0
    for x in xs:
        buf[:, start:start + x.shape[1], :h, :w] = x
        start += x.shape[1]
    return buf


def _rfft2_chunked(xs: Sequence[torch.Tensor], nh: int, nw: int) -> torch.Tensor:
    """rfft2 of the channel concatenation of xs ([B, C_i, H, W] each) zero-padded to (nh, nw):
    complex [B, C, nh, nw // 2 + 1] (a view of [C, B, ...] storage), a few channels at a time,
    so that no padded real copy of every channel (as large as the spectrum itself) is alive
    beside it. Each channel's transform is independent: the same values as one rfft2 of the
    whole padded input."""
    b = xs[0].shape[0]
    # Channel-major storage: each chunk's transform is written in place (out=) instead of
    # being copied into a batch-major buffer, 1.4x faster; the caller gets a [B, C] view.
    out = torch.empty(sum(x.shape[1] for x in xs), b, nh, nw // 2 + 1,
                      dtype=torch.complex64 if xs[0].dtype == torch.float32 else torch.complex128,
                      device=xs[0].device)
    step = max(1, CHUNK_BYTES // (b * nh * nw * xs[0].element_size()))
    start = 0
    for x in xs:
        for c in range(0, x.shape[1], step):
            part = x[:, c:c + step].transpose(0, 1)
            torch.fft.rfft2(part, s=(nh, nw), out=out[start:start + part.shape[0]])
            start += part.shape[0]
    return out.transpose(0, 1)


def conv_fft(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """Valid stride-1 conv2d by FFT: x [B, C, H, W] (or a list of [B, C_i, H, W] to be
    concatenated along channels), weight [O, C, k, l] -> [B, O, H-k+1, W-l+1].

    Agrees with the direct convolution to float rounding (about 1e-6 of the output's scale in
    float32). Without autograd, kernel spectra are cached per weight and grid size.
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    if _needs_grad(*xs, weight, bias):
        return _FFTConvFn.apply(weight, bias, *xs)
    h, w = xs[0].shape[-2:]
    k, l = weight.shape[-2:]
    nh, nw = fft_size(h), fft_size(w)
    yf = _contract(_rfft2_chunked(xs, nh, nw), _spectra.get(weight, nh, nw))
    y = _irfft_valid(yf, nh, nw, slice(k - 1, h), slice(l - 1, w))
    return y + bias.view(1, -1, 1, 1) if bias is not None else y.contiguous()


# `conv_fft_h`'s products per step (its transforms: half); half this measured 5% slower
FFT_H_CHUNK_BYTES = 64 << 20


def _kernel_h_numel(weight: torch.Tensor, nh: int) -> int:
    """Elements of `_kernel_h(weight, nh)`."""
    o, c, _, l = weight.shape
    return (nh // 2 + 1) * 4 * c * l * o


def _kernel_h(weight: torch.Tensor, nh: int, storage: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The right-hand side of `conv_fft_h`'s products: the rfft along the kernel's rows
    (axis k, flipped) on nh points, as real [nf, 2 C l, 2 O]. Row (c, j, 0) holds K[c, j] and
    row (c, j, 1) holds i K[c, j], each output map's column pair its (re, im): the interleaved
    input spectrum (a + ib per row) times it is aK + b(iK), the complex product, stored
    interleaved. weight [O, C, k, l]."""
    o, c, _, l = weight.shape
    # transformed along the outer axis of a (tiny) [k, C, l, O] copy: [nf, C, l, O]
    spec = torch.fft.rfft(weight.flip(-2).permute(2, 1, 3, 0).contiguous(), n=nh, dim=0)
    parts = [torch.view_as_real(spec), torch.view_as_real(spec * 1j)]  # (x + iy) i = -y + ix
    if storage is None:
        out = torch.stack(parts, 3)
    else:  # into a previous spectrum's memory
        out = storage.view(-1)[:_kernel_h_numel(weight, nh)].view(*spec.shape[:3], 2, o, 2)
        torch.stack(parts, 3, out=out)
    return out.view(spec.shape[0], 2 * c * l, 2 * o)


_spectra_h = _SpectrumCache(_kernel_h, _kernel_h_numel)  # 28 MB for the 13 x 13 global layer


def conv_fft_h(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
               bias: torch.Tensor | None, pieces: int = 1) -> torch.Tensor:
    """Valid stride-1 conv2d by FFT along the height only, the l kernel columns summed
    directly (inference: no autograd): x [B, C, H, W] (or a list to concatenate), weight
    [O, C, k, l] -> [B, O, H-k+1, W-l+1] (a strided view, maps innermost in memory); with
    `pieces` K > 1 its maxout, [B, O/K, H-k+1, W-l+1], taken step by step while each step's
    output is in cache (`conv2d_maxout`).

    For each height frequency the outputs are one real matrix product of the C*l shifted
    input columns with the kernel's spectrum ([nf, 2Cl, 2O], 28 MB, reused by every column):
    compute-bound, with about a tenth of the direct convolution's multiplications for the
    13 x 13 global layer (4 -> 320 maps), where the 2-D transform's per-frequency products
    read a kernel spectrum as large as the image times the maps. The bias enters as the DC
    term. The inverse transforms run along the frequency-major product's outer axis, which
    numpy's pocketfft does about twice as fast as torch's (MKL, AMD EPYC).
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    if _needs_grad(*xs, weight, bias):
        raise RuntimeError("conv_fft_h has no backward: it is offered without autograd")
    x = _cat(xs)
    b, c, h, w = x.shape
    o, _, k, l = weight.shape
    wo, nh = w - l + 1, fft_size(h)
    n, nf = b * wo, nh // 2 + 1
    xf = torch.fft.rfft(x, n=nh, dim=2)  # [B, C, nf, W]
    # cols[f, (b, s), (c, j)] = xf[b, c, f, s + j]: one copy of the unfolded view
    cols = xf.unfold(3, l, 1).permute(2, 0, 3, 1, 4).reshape(nf, n, c * l).contiguous()
    cols = torch.view_as_real(cols).view(nf, n, 2 * c * l)
    kernel = _spectra_h.get(weight, nh)
    ho, om = h - k + 1, o // pieces
    # A few columns at a time through one product buffer, transformed straight into `out`
    # (or, for maxout, into a scratch whose max over pieces goes to `out`): cache-sized steps,
    # no allocation per step.
    step = min(n, max(1, FFT_H_CHUNK_BYTES // (2 * nf * o * x.element_size())))
    buf = x.new_empty(2 * nf * step * o)
    out = x.new_empty(nh, n, o) if pieces == 1 else x.new_empty(ho, n, om)
    scratch = None if pieces == 1 else x.new_empty(nh * step * o)
    for s in range(0, n, step):
        m = min(step, n - s)
        y = torch.bmm(cols[:, s:s + m], kernel, out=buf[:nf * m * 2 * o].view(nf, m, 2 * o))
        if bias is not None:
            y.view(nf, m, o, 2)[0, :, :, 0].add_(bias, alpha=nh)  # irfft divides by nh
        dst = out[:, s:s + m] if pieces == 1 else scratch[:nh * m * o].view(nh, m, o)
        _irfft_rows(torch.view_as_complex(y.view(nf, m, o, 2)).numpy(), dst.numpy(), nh)
        if pieces == 2:  # channel c*K + k is piece k of map c
            z = dst[k - 1:h].view(ho, m, om, 2)
            torch.maximum(z[..., 0], z[..., 1], out=out[:, s:s + m])
        elif pieces > 2:
            torch.amax(dst[k - 1:h].view(ho, m, om, pieces), -1, out=out[:, s:s + m])
    if pieces == 1:
        out = out[k - 1:h]
    return out.view(ho, b, wo, om).permute(1, 3, 0, 2)


_POOL: dict = {}  # thread count -> ThreadPoolExecutor of `_irfft_rows`
os.register_at_fork(after_in_child=_POOL.clear)  # a forked child has none of the threads


def _irfft_rows(src, dst, n: int) -> None:
    """dst[:] = irfft(src, n, axis=0) (numpy arrays; complex64 [n//2+1, m, O] -> float32
    [n, m, O]) by numpy's pocketfft, which writes into `dst` and releases the GIL: the columns
    are split over torch's thread count, one single-threaded transform per thread."""
    import numpy as np

    threads = max(1, min(torch.get_num_threads(), src.shape[1]))
    if threads == 1:
        np.fft.irfft(src, n=n, axis=0, out=dst)
        return
    pool = _POOL.get(threads)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tumorseg-fft")
    bounds = [src.shape[1] * i // threads for i in range(threads + 1)]
    list(pool.map(lambda i: np.fft.irfft(src[:, bounds[i]:bounds[i + 1]], n=n, axis=0,
                                         out=dst[:, bounds[i]:bounds[i + 1]]), range(threads)))


def _cat(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0] if len(x) == 1 else torch.cat(list(x), 1)


# ---------------------------------------------------------------------------------------------
# Stride-1 max pooling.

def pool_nchw(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k max pooling, stride 1, no padding: [B, C, H, W] -> [B, C, H-k+1, W-k+1]."""
    return F.max_pool2d(x, k, stride=1)


def pool_channels_last(x: torch.Tensor, k: int) -> torch.Tensor:
    """`pool_nchw` computed in channels-last memory order (oneDNN / ATen's vectorised kernel)."""
    y = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, stride=1)
    return y.contiguous()


def pool_shifted(x: torch.Tensor, k: int) -> torch.Tensor:
    """`pool_nchw` as shifted maxima: a window of w doubles to 2w (or grows to k) per step."""
    for dim in (-1, -2):
        w = 1
        while w < k:
            step = min(w, k - w)
            n = x.shape[dim]
            x = torch.maximum(x.narrow(dim, 0, n - step), x.narrow(dim, step, n - step))
            w += step
    return x


class _Maxout2Fn(torch.autograd.Function):
    """Max over 2 maxout pieces, [B, C, 2, H, W] -> [B, C, H, W], with the gradient of amax
    (ties split evenly) in three elementwise passes instead of amax's mask, count and divide."""

    @staticmethod
    def forward(ctx, z):
        a, b = z.unbind(2)
        ctx.save_for_backward(z)
        return torch.maximum(a, b)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        a, b = z.unbind(2)
        out = g.new_empty(z.shape)
        # (sign(a - b) + 1) / 2: 1 where a wins, 0 where b wins, 1/2 on ties (heaviside gives
        # the same, 4x slower); g - g/2 is exact.
        torch.mul(g, torch.sign(a - b).add_(1).mul_(0.5), out=out[:, :, 0])
        torch.sub(g, out[:, :, 0], out=out[:, :, 1])
        return out


def maxout(z: torch.Tensor, pieces: int) -> torch.Tensor:
    """Max over groups of `pieces` channels: [B, C*K, H, W] -> [B, C, H, W], channel c*K + k
    being piece k of map c; the gradient of a tie is split evenly (as amax's)."""
    b, ck, h, w = z.shape
    z = z.view(b, ck // pieces, pieces, h, w)
    if pieces == 2 and current().mode != "plain":
        if _needs_grad(z):
            return _Maxout2Fn.apply(z)
        return torch.maximum(*z.unbind(2))  # amax would first fill its output with -inf
    return z.amax(dim=2)


# ---------------------------------------------------------------------------------------------
# Choosing by measurement.

CONV_CANDIDATES: dict[str, Callable] = {"direct": conv_direct, "native": conv_native,
                                        "fft": conv_fft, "fft_h": conv_fft_h,
                                        "direct_bf16": conv_direct_bf16, "bf16_cl": conv_bf16_cl}
POOL_CANDIDATES: dict[str, Callable] = {"nchw": pool_nchw, "channels_last": pool_channels_last,
                                        "shifted": pool_shifted}


def _size_class(n: int) -> int:
    """Sides in [2^(c-1), 2^c) share class c, and a choice."""
    return max(n, 1).bit_length()


def _probe_input(x: torch.Tensor | Sequence[torch.Tensor], min_side: int
                 ) -> torch.Tensor | list[torch.Tensor]:
    """The first item of the batch, cropped to the smallest size of its size class (but not
    below `min_side`): a cheap, representative measurement of the class."""
    def crop(t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        ch = max(min(h, 1 << (_size_class(h) - 1)), min(h, min_side))
        cw = max(min(w, 1 << (_size_class(w) - 1)), min(w, min_side))
        return t[:1, :, :ch, :cw]
    return crop(x) if isinstance(x, torch.Tensor) else [crop(t) for t in x]


# Inference choices measured on quiet cores of the CPUs the project has run on (like FFTW's
# wisdom): on such a CPU a first run measures only what they lack. Keyed like a plan file.
SHIPPED_PLANS = Path(__file__).with_name("engine_plans.json")


class Planner:
    """Per call site choices, measured once, kept in memory and in a JSON plan file.

    The plan file (default ~/.cache/tumorseg/engine-plan.json; TUMORSEG_ENGINE_PLAN overrides,
    an empty value keeps plans in memory only) is keyed by CPU, torch version and thread count.
    `shipped`: a file of plans measured elsewhere, read under the plan file's own choices
    (default: SHIPPED_PLANS when the plan file is the default one; a moved or in-memory plan,
    as in tests and `--fresh-plan` benchmarks, measures everything itself).
    """

    def __init__(self, path: str | Path | None = None, shipped: str | Path | None = None):
        if path is None:
            env = os.environ.get("TUMORSEG_ENGINE_PLAN")
            path = (Path.home() / ".cache" / "tumorseg" / "engine-plan.json"
                    if env is None else (Path(env) if env else None))
            if env is None and shipped is None:
                shipped = SHIPPED_PLANS
        self.path = Path(path) if path else None
        self.shipped = Path(shipped) if shipped else None
        self.lock = threading.Lock()
        self.choices: dict[str, str] = {}
        self.measured: dict[str, str] = {}  # this process's choices for the current machine
        self.timings: dict[str, dict[str, float]] = {}
        self._loaded_for: str | None = None

    def machine(self) -> str:
        return f"{platform.machine()}|{cpu_name()}|torch {torch.__version__}|" \
               f"threads {torch.get_num_threads()}|v{PLAN_VERSION}"

    def _read(self, path: Path | None = None) -> dict:
        path = path or self.path
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _load(self, again: bool = False) -> None:
        """Choices of this machine: shipped, under the plan file's, under the ones in memory."""
        machine = self.machine()
        if self._loaded_for == machine and not again:
            return
        if self._loaded_for != machine:  # e.g. another thread count: another plan
            self.measured = {}
        self.choices = {}
        self._loaded_for = machine
        for path in (self.shipped, self.path):  # the plan file's own choices win
            saved = self._read(path).get(machine, {}) if path else {}
            if isinstance(saved, dict):
                self.choices.update((k, v) for k, v in saved.items() if isinstance(v, str))
        self.choices.update(self.measured)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            from tumorseg.io import atomic_write

            data = self._read()
            # Only what this process measured: shipped choices stay out of the user's file.
            data[self.machine()] = {**data.get(self.machine(), {}), **self.measured}
            with atomic_write(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home: the plan stays in memory

    def _file_lock(self):
        """An exclusive lock shared by every process using the plan file, held while a choice
        is measured and saved: processes that start together (a resumed run beside another,
        torchrun ranks) make each choice once and all use it, so their arithmetic is identical."""
        from tumorseg.io import file_lock

        return file_lock(self.path)

    def choose(self, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        """The name of the fastest candidate for `key`; the first candidate is the reference and
        another must beat it by MARGIN to be chosen (timing noise must not flip choices). Each
        runs twice, the faster run counting (the first may pay oneDNN's primitive creation and
        FFT planning), unless its first run was CLEAR times the fastest's (the 21 x 21 output
        layer's direct convolution: about 6x the FFT's), then ROUNDS more times for the candidates
        within CLOSE of the fastest, the first time a key is seen, on a probe (`_probe_input`),
        so that a first run on a new machine costs about two seconds."""
        with self.lock:
            self._load()
            if key in self.choices and self.choices[key] in candidates:
                return self.choices[key]
        with self._file_lock():
            with self.lock:
                self._load(again=True)  # another process may have chosen meanwhile
                if key in self.choices and self.choices[key] in candidates:
                    return self.choices[key]
            times = {name: _seconds(run) for name, run in candidates.items()}
            for name, run in candidates.items():
                # The best of two runs (first-call setup or a busy moment must not decide),
                # except for a candidate CLEAR times slower than the fastest: that one lost.
                if times[name] <= CLEAR * min(times.values()):
                    times[name] = min(times[name], _seconds(run))
            for _ in range(ROUNDS):
                fastest = min(times.values())
                close = [name for name in candidates if times[name] <= CLOSE * fastest]
                if len(close) < 2:
                    break
                for name in close:
                    times[name] = min(times[name], _seconds(candidates[name]))
            reference = next(iter(times))
            best = min(times, key=times.get)
            if times[best] > times[reference] * (1 - MARGIN):
                best = reference
            with self.lock:
                self.choices[key] = self.measured[key] = best
                self.timings[key] = {n: round(t, 5) for n, t in times.items()}
                self._save()
        return best


def _seconds(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model as /proc/cpuinfo names it, with its family and model numbers (VMs often
    name every generation alike, e.g. "AMD EPYC", and their fastest layers differ); else
    platform.processor()."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the first processor's block is enough
                continue
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            ids = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
            return fields["model name"] + (f" ({', '.join(ids)})" if ids else "")
    except OSError:
        pass
    return platform.processor() or "cpu"


planner = Planner()


def _channels_last(x: torch.Tensor) -> bool:
    """Maps innermost in memory: channels-last, or any other such view (`conv_fft_h`'s output,
    [B, O, H, W] with strides (W O, 1, B W O, O), is channels-last only when B = 1; one layout,
    one key, or a batch of 1 would measure every choice again under a key of its own)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def _key(op: str, x: torch.Tensor | Sequence[torch.Tensor], channels: int, extra: tuple,
         grad: bool) -> str:
    """The call site: op, weight shape or kernel (`extra`), input channels, size classes,
    autograd, dtype, device, and "|cl" plus one flag per input (c: channels-last, n: not) if
    any input is channels-last (after a "bf16_cl" layer): that layout costs differently."""
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    h, w = xs[0].shape[-2:]
    flags = "".join("c" if _channels_last(t) else "n" for t in xs)
    layout = f"|cl {flags}" if "c" in flags else ""
    return f"{op}|{extra}|in {channels}|{_size_class(h)}x{_size_class(w)}|" \
           f"{'grad' if grad else 'nograd'}|{xs[0].dtype}|{xs[0].device.type}{layout}"


def conv2d(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Valid, stride-1 convolution, computed the way the engine chose for this call site.

    x [B, C, H, W] float32, or a list of [B, C_i, H, W] that the convolution sees concatenated
    along channels (the FFT path then skips the concatenation's copy); weight [O, C, k, l];
    bias [O] or None -> [B, O, H-k+1, W-l+1].
    """
    return CONV_CANDIDATES[_conv_choice(x, weight, bias)](x, weight, bias)


def conv2d_maxout(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: torch.Tensor | None, pieces: int) -> torch.Tensor:
    """maxout(conv2d(x, weight, bias), pieces): [B, C, H, W] -> [B, O/K, H-k+1, W-l+1]. Where
    the engine chose "fft_h" the max is taken inside the convolution's output pass (half the
    memory and one pass fewer); elsewhere the two run one after the other."""
    choice = _conv_choice(x, weight, bias)
    if choice == "fft_h":
        return conv_fft_h(x, weight, bias, pieces)
    return maxout(CONV_CANDIDATES[choice](x, weight, bias), pieces)


def _conv_choice(x: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor | None) -> str:
    """The CONV_CANDIDATES name the engine runs for this call site (measured once)."""
    opts = current()
    first = x if isinstance(x, torch.Tensor) else x[0]
    if opts.mode == "plain" or first.device.type != "cpu":
        return "direct"
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    grad = _needs_grad(*xs, weight, bias)
    names = ["direct"]
    if grad:
        names.append("native")
    if min(weight.shape[-2:]) >= FFT_MIN_KERNEL:
        names.append("fft")
        if not grad and weight.shape[0] > weight.shape[1]:
            # fft_h's products grow with C l O per column and frequency, the 2-D FFT's with C O
            # and its O inverse transforms: fft_h can win only with more maps out than in (the
            # 13 x 13 layer: 4 -> 320). The 21 x 21 head (224 -> 5) measured it 7-15x slower
            # than the 2-D FFT in every size class (Zen 2), 0.4 s of a first run's plan.
            names.append("fft_h")
    if opts.precision == "bf16":
        names += ["direct_bf16", "bf16_cl"]
    if len(names) == 1:
        return "direct"
    precision_key = BF16_GRAD_KEY if grad and opts.precision == "bf16" else \
        PRECISION_KEYS[opts.precision]
    key = _key("conv", xs, weight.shape[1], tuple(weight.shape), grad) + f"|{precision_key}"
    # Training tiles are small: measure on the call's own input (forward and backward).
    args = (xs if grad else _probe_input(xs, 2 * weight.shape[-1]), weight, bias)
    return planner.choose(key, {n: _probe(CONV_CANDIDATES[n], args, grad) for n in names})


def _probe(fn: Callable, args: tuple, grad: bool) -> Callable[[], None]:
    """A run of `fn` on the probe arguments: forward, and backward under autograd."""
    def run() -> None:
        if not grad:
            with torch.no_grad():
                fn(*args)
            return
        def leaf(a):
            if a is None or isinstance(a, (int, float)):
                return a
            if not isinstance(a, torch.Tensor):
                return [leaf(t) for t in a]
            return a.detach().clone().requires_grad_(a.requires_grad)

        leaves = [leaf(a) for a in args]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
    return run


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k max pooling with stride 1: [B, C, H, W] -> [B, C, H-k+1, W-k+1] (exact)."""
    if current().mode == "plain" or x.device.type != "cpu" or k == 1:
        return pool_nchw(x, k)
    grad = _needs_grad(x)
    key = _key("maxpool", x, x.shape[1], (k,), grad)
    probe = x if grad else _probe_input(x, 4 * k)
    choice = planner.choose(key, {n: _probe(lambda t, f=f: f(t, k), (probe,), grad)
                                  for n, f in POOL_CANDIDATES.items()})
    return POOL_CANDIDATES[choice](x, k)
