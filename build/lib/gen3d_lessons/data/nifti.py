"""Reading and writing NIfTI volumes, with checks that name the file and the problem."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from .errors import DataError


def spacing_affine(spacing: Sequence[float], shape: Sequence[int] | None = None) -> np.ndarray:
    """A RAS affine with the given voxel spacing (mm), centred on the grid when ``shape`` is given."""
    affine = np.diag([*map(float, spacing[:3]), 1.0])
    if shape is not None:
        affine[:3, 3] = -0.5 * (np.asarray(shape[:3], dtype=float) - 1) * np.asarray(spacing[:3], float)
    return affine


def save_nifti(array: np.ndarray, path: str | Path, affine: np.ndarray | None = None,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), dtype=None, on_disk=None) -> Path:
    """Write ``array`` (X, Y, Z[, C or T]) to ``path`` (.nii or .nii.gz) with an affine and voxel sizes.

    Without an explicit ``affine`` a RAS affine with ``spacing`` centred on the grid is used.
    Integer label maps should be passed with ``dtype=np.uint8``. ``on_disk=np.int16`` stores a float
    image as scaled 16-bit integers (NIfTI's scl_slope/scl_inter; readers get floats back): half the
    bytes and a faster gzip, at a precision of 1/65535 of the intensity range.
    """
    path = Path(path)
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    if array.ndim not in (3, 4):
        raise DataError(path, f"expected a 3D or 4D array to save, got shape {array.shape}")
    if affine is None:
        affine = spacing_affine(spacing, array.shape)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm", "sec")
    if on_disk is not None:
        img.set_data_dtype(on_disk)
    if array.ndim == 4:  # keep the 4th zoom meaningful (1 per channel / frame)
        img.header.set_zooms((*img.header.get_zooms()[:3], 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
