"""Reading and writing volumes, and atomic file writes.

One axis order for the whole package: arrays are indexed (x, y, z[, channel]) in voxel order,
as nibabel returns them. SimpleITK returns (z, y, x); `read_volume` transposes MHA data so that
both formats agree, and `write_volume` transposes back. Axial slices are `data[:, :, k]`.

Each `Volume` keeps what is needed to write a result back in the input's space: the nibabel
header and affine for NIfTI, origin/spacing/direction for MHA.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from tumorseg.errors import TumorsegInputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MHA_SUFFIXES = (".mha", ".mhd")
# LPS (ITK) <-> RAS (NIfTI) world coordinates differ by the sign of the first two axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def volume_suffix(path: str | Path) -> str | None:
    """The recognised volume suffix of `path` ('.nii.gz', '.nii', '.mha', '.mhd') or None."""
    name = str(path).lower()
    for suffix in NIFTI_SUFFIXES + MHA_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


@dataclass
class Volume:
    """An image or label map with its geometry.

    data: (x, y, z) or (x, y, z, c) array in file units.
    affine: 4x4 voxel-index (x, y, z) -> RAS+ world (mm) transform.
    spacing: voxel size in mm along x, y, z.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path
    header: object | None = None  # nibabel header (NIfTI) or None
    itk: dict = field(default_factory=dict)  # origin/spacing/direction (MHA), LPS as ITK keeps them

    @property
    def shape3(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]


def read_volume(path: str | Path, allowed_ndim: tuple[int, ...] = (3,)) -> Volume:
    """Read a NIfTI (nibabel) or MHA (SimpleITK) file into (x, y, z[, c]) order.

    Raises TumorsegInputError for a missing, truncated or corrupt file, an unexpected number of
    dimensions, or NaN/Inf voxels.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not path.is_file():
        raise TumorsegInputError(path, "file does not exist")
    if suffix is None:
        raise TumorsegInputError(path, "not a volume: expected .nii, .nii.gz, .mha or .mhd")
    try:
        vol = _read_nifti(path) if suffix in NIFTI_SUFFIXES else _read_mha(path)
    except TumorsegInputError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TumorsegInputError(path, f"cannot read volume (truncated or corrupt file?): {first}")
    if vol.data.ndim not in allowed_ndim:
        raise TumorsegInputError(
            path, f"image has {vol.data.ndim} dimensions, expected {' or '.join(map(str, allowed_ndim))}"
        )
    if vol.data.dtype.kind == "f" and not np.all(np.isfinite(vol.data)):
        raise TumorsegInputError(path, "image contains NaN or Inf voxels")
    return vol


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:  # e.g. "is not a gzip file"
        raise ValueError(str(exc)) from exc  # reported by read_volume as a corrupt file
    data = np.asanyarray(img.dataobj)  # forces full decompression: truncation surfaces here
    # Trailing singleton dimensions (x, y, z, 1) are common in exported 3-D images.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(np.asarray(data), np.asarray(img.affine, dtype=np.float64), spacing, path, img.header)


def _read_mha(path: Path) -> Volume:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    data = np.transpose(arr, (2, 1, 0, 3) if arr.ndim == 4 else tuple(range(arr.ndim))[::-1])
    data = np.ascontiguousarray(data)
    spacing = tuple(float(s) for s in img.GetSpacing())[:3]
    itk = {"origin": img.GetOrigin(), "spacing": img.GetSpacing(), "direction": img.GetDirection()}
    return Volume(data, _itk_affine(itk), spacing, path, None, itk)  # type: ignore[arg-type]


def _itk_affine(itk: dict) -> np.ndarray:
    dim = len(itk["spacing"])
    direction = np.asarray(itk["direction"], dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(itk["spacing"][:3])
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(itk["origin"][:3], dtype=np.float64)
    return affine


def _affine_to_itk(affine: np.ndarray) -> dict:
    lin = _LPS_TO_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    return {
        "origin": tuple(_LPS_TO_RAS @ affine[:3, 3]),
        "spacing": tuple(spacing),
        "direction": tuple(direction.ravel()),
    }


def write_volume(path: str | Path, data: np.ndarray, reference: Volume) -> Path:
    """Write `data` ((x, y, z) or (x, y, z, c)) atomically, in the space of `reference`.

    The format follows the suffix of `path`. NIfTI output copies the reference header (or its
    affine when the reference is MHA); MHA output copies origin/spacing/direction.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise TumorsegInputError(path, "output must end in .nii, .nii.gz, .mha or .mhd")
    if tuple(data.shape[:3]) != reference.shape3:
        raise ValueError(f"{path}: data shape {data.shape[:3]} != reference {reference.shape3}")
    with atomic_write(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(tmp, data, reference)
        else:
            _write_mha(tmp, data, reference)
    return path


def _write_nifti(tmp: Path, data: np.ndarray, reference: Volume) -> None:
    import nibabel as nib

    if reference.header is not None and isinstance(reference.header, nib.Nifti1Header):
        header = reference.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_data_shape(data.shape)
        img = nib.Nifti1Image(data, reference.affine, header)
        img.header.set_slope_inter(1.0, 0.0)  # never rescale labels or probabilities
    else:
        img = nib.Nifti1Image(data, reference.affine)
        img.header.set_qform(reference.affine, code=1)
        img.header.set_sform(reference.affine, code=1)
    nib.save(img, str(tmp))


def _write_mha(tmp: Path, data: np.ndarray, reference: Volume) -> None:
    import SimpleITK as sitk

    arr = np.transpose(data, (2, 1, 0, 3) if data.ndim == 4 else (2, 1, 0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=data.ndim == 4)
    itk = reference.itk if reference.itk else _affine_to_itk(reference.affine)
    img.SetOrigin(tuple(itk["origin"])[:3])
    img.SetSpacing(tuple(itk["spacing"])[:3])
    direction = np.asarray(itk["direction"]).reshape(len(itk["spacing"]), -1)[:3, :3]
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(tmp), True)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and
    restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: str | Path | None) -> Iterator[None]:
    """Hold an exclusive lock shared by every process that uses `path`: fcntl.flock on the
    folder itself if `path` is a folder (no file left behind), else on '<path>.lock'. E.g.
    several `segment --num-parts` processes updating one CSV in their output folder. No lock
    where it cannot be had (path None, no fcntl on Windows, a read-only folder)."""
    if path is None:
        yield
        return
    path = Path(path)
    try:
        import fcntl

        if path.is_dir():
            fd = os.open(path, os.O_RDONLY)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the suffix (writers choose formats by suffix) and starts with '.',
    so a killed run never leaves a truncated file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = volume_suffix(path) or path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def numpy_huge_pages(enable: bool) -> None:
    """numpy's madvise(MADV_HUGEPAGE) of large arrays on or off, process-wide (a private numpy
    switch; nothing happens where it is missing). Off, a new process first touches memory
    about 4x faster in the virtual machines measured (docs/PERFORMANCE.md)."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return
    _set_madvise_hugepage(enable)
