"""Reading NIfTI volumes with checks, and the same checks for arrays already in memory.

Every problem with a file becomes a :class:`DataError` whose message starts with the file and
then says what is wrong: missing, not NIfTI, truncated, wrong number of dimensions, NaN voxels,
a broken affine. ``check_volume`` does the in-memory part for the inputs of ``predict(...)``-style
functions, naming the argument instead of a file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from .errors import DataError

NDim = int | tuple[int, ...] | None

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Volume:
    """A volume read from disk: the voxels (X, Y, Z[, C or T]), the voxel -> mm affine, the file."""

    data: np.ndarray
    affine: np.ndarray  # 4x4, voxel index -> mm (RAS)
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (column norms of the affine's 3x3 part)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def _ndim_text(ndim: int | tuple[int, ...]) -> str:
    """(3, 4) -> '3D or 4D'."""
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    return " or ".join(f"{d}D" for d in dims)


def _ndim_ok(shape: tuple[int, ...], ndim: NDim) -> bool:
    if ndim is None:
        return True
    return len(shape) in ((ndim,) if isinstance(ndim, int) else tuple(ndim))


def _non_finite_text(n_nan: int, n_inf: int, total: int, unit: str) -> str | None:
    """'12 NaN and 3 inf voxels (of 1728)', or None when both counts are zero."""
    if n_nan == 0 and n_inf == 0:
        return None
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "inf")) if n]
    return " and ".join(parts) + f" {unit} (of {total})"


def _count_non_finite(data: np.ndarray, unit: str = "voxels") -> str | None:
    """The non-finite values of a numpy array, as text; None when all are finite (or not floats)."""
    if not np.issubdtype(data.dtype, np.floating):
        return None
    return _non_finite_text(int(np.isnan(data).sum()), int(np.isinf(data).sum()), data.size, unit)


def _gzip_complete(path: Path) -> bool:
    """Whether the whole gzip stream decompresses (a cut-off download fails at its end)."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (EOFError, zlib.error, OSError):
        return False
    return True


def _why_unreadable(path: Path, err: BaseException) -> str:
    """Turn a nibabel / gzip / zlib exception into a sentence about the file."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes): not a NIfTI volume"
    with open(path, "rb") as f:
        head = f.read(64)
    if path.name.endswith(".gz") and not head.startswith(_GZIP_MAGIC):
        text = head.decode("utf-8", errors="replace")
        looks_text = all(c.isprintable() or c.isspace() for c in text)
        hint = f"; it starts with text {text.strip()[:40]!r}" if looks_text else ""
        return f"not gzip-compressed, so not a .nii.gz file (the first bytes are not 1f 8b){hint}"
    if isinstance(err, (EOFError, zlib.error)) or (head.startswith(_GZIP_MAGIC) and not _gzip_complete(path)):
        return (f"truncated or corrupt compressed data ({err}); the file ({size} bytes) is probably an "
                "incomplete download or copy")
    if isinstance(err, ImageFileError):  # nibabel found no header it knows
        inside = "gzip data, but " if head.startswith(_GZIP_MAGIC) else ""
        return f"not a readable NIfTI volume ({inside}no NIfTI-1/NIfTI-2 header inside)"
    return f"not a readable NIfTI volume ({type(err).__name__}: {str(err).replace(str(path), 'the file')})"


def load_nifti(path: str | Path, *, ndim: NDim = None, dtype: Any = np.float32,
               allow_nan: bool = False) -> Volume:
    """Read a .nii / .nii.gz file and check it.

    ``ndim`` is the allowed number of dimensions (``3``, or ``(3, 4)``); ``dtype`` is the dtype of
    the returned array (``None`` keeps the stored one, after scaling). Raises :class:`DataError`
    naming the file when it is missing, not NIfTI, corrupt or truncated, has the wrong number of
    dimensions, contains NaN / inf voxels (unless ``allow_nan``), or has a non-invertible affine.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, expected a .nii or .nii.gz file")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise DataError(path, "expected a NIfTI file ending in .nii or .nii.gz")

    # 1. open the header and read the voxels (gzip errors only show up while reading)
    try:
        img = nib.load(str(path), mmap=False)  # a memmap would keep the file open
        raw = np.asanyarray(img.dataobj)
    except (ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ValueError) as err:
        raise DataError(path, _why_unreadable(path, err)) from err

    # 2. shape
    if any(s == 0 for s in raw.shape):
        raise DataError(path, f"has an empty shape {raw.shape}")
    if not _ndim_ok(raw.shape, ndim):
        raise DataError(path, f"expected a {_ndim_text(ndim)} volume, got shape {raw.shape} ({raw.ndim}D)")

    # 3. values (before any cast: NaN cast to int would be silent garbage)
    if not allow_nan and (bad := _count_non_finite(raw)):
        raise DataError(path, f"contains {bad}")

    # 4. affine: the voxel -> mm map must be invertible for resampling and registration
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DataError(path, f"affine has non-finite entries:\n{affine}")
    det = float(np.linalg.det(affine[:3, :3]))
    if abs(det) < 1e-12:
        raise DataError(path, f"affine is not invertible (det of its 3x3 part = {det:g}); "
                              "check the header's sform/qform and voxel sizes")

    data = raw if dtype is None else raw.astype(dtype, copy=False)
    return Volume(data=data, affine=affine, path=path)


def check_volume(array: Any, name: str, ndim: NDim = None, allow_nan: bool = False,
                 shape: Sequence[int | None] | None = None) -> Any:
    """Check an in-memory volume (numpy array or torch tensor) and return it unchanged.

    ``ndim`` is the allowed number of dimensions; ``shape`` a pattern such as
    ``(None, 1, None, None, None)`` for ``(B, 1, D, H, W)`` (None = any size). Raises
    :class:`DataError` (a ``ValueError``) whose message starts with ``name`` for: not an array,
    wrong dimensions or shape, a non-numeric dtype, NaN / inf values (unless ``allow_nan``).
    """
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise DataError(None, f"{name}: expected an array or tensor, got {type(array).__name__}")
    got = tuple(array.shape)
    if not _ndim_ok(got, ndim):
        raise DataError(None, f"{name}: expected a {_ndim_text(ndim)} array, got shape {got} ({len(got)}D)")
    if shape is not None:
        want = tuple(shape)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            pattern = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise DataError(None, f"{name}: expected shape {pattern}, got {got}")

    # tensors are checked with torch (bfloat16 has no numpy twin); arrays with numpy
    if hasattr(array, "detach"):
        import torch

        if array.dtype == torch.bool or array.is_complex():
            raise DataError(None, f"{name}: dtype {array.dtype} is not a real number type")
        if not allow_nan and array.is_floating_point() and not bool(torch.isfinite(array).all()):
            bad = _non_finite_text(int(torch.isnan(array).sum()), int(torch.isinf(array).sum()),
                                   array.numel(), "values")
            if bad:
                raise DataError(None, f"{name}: contains {bad}")
        return array

    arr = np.asarray(array)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(None, f"{name}: dtype {arr.dtype} is not a real number type")
    if not allow_nan and (bad := _count_non_finite(arr, "values")):
        raise DataError(None, f"{name}: contains {bad}")
    return array
