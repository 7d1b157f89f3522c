"""Input checks shared by the metrics (and the classical baselines): arrays in, checked arrays out.

Every metric starts by turning what it was given (a NumPy array or a torch tensor on any device)
into a checked NumPy array or CPU tensor, so that a metric computed on the wrong thing raises a
``ValueError`` naming the argument instead of returning a number:

- :func:`as_array`: any numeric array, refusing NaN and infinity; :func:`same_shape` compares two;
- :func:`as_label_map`: an integer label map; :func:`as_spacing`: voxel sizes, one per axis;
- :func:`as_features`: a set of samples as (N, F);
- :func:`as_volume`: one 3D volume (X, Y, Z) as float64; :func:`as_volumes`: volumes (N, C, D, H, W)
  as a float32 tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..data.io import check_volume


def as_array(a: Any, name: str) -> np.ndarray:
    """NumPy view of an array or tensor (moved to the CPU), refusing NaN and infinity."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
        a = a.numpy()
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name}: is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
        raise ValueError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN or infinite values")
    return a


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise a ``ValueError`` naming ``name_b`` unless ``b`` has ``a``'s shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {b.shape} does not match {name_a} shape {a.shape}")


def as_label_map(a: Any, name: str) -> np.ndarray:
    """An integer label map; floats are accepted only if every value is a whole number."""
    a = as_array(a, name)
    if a.dtype == bool:
        return a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name}: expected an integer label map, found fractional values "
                             "(take argmax over channels or threshold first)")
    return a.astype(np.int64)


def as_spacing(spacing: Any, ndim: int) -> list[float] | None:
    """``ndim`` positive voxel sizes from one number or one per axis; None stays None (unit voxels)."""
    if spacing is None:
        return None
    s = [float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=float))]
    if len(s) == 1:
        s = s * ndim
    if len(s) != ndim or not all(v > 0 for v in s):
        raise ValueError(f"spacing: expected {ndim} positive voxel sizes, got {spacing!r}")
    return s


def as_features(a: Any, name: str) -> np.ndarray:
    """(N, F) float64 features; (N,) becomes (N, 1), (N, ...) is flattened per sample."""
    a = as_array(a, name).astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    a = a.reshape(a.shape[0], -1)                     # (N, F)
    if a.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples for an unbiased estimate, got {a.shape[0]}")
    return a


def as_volume(x: Any, name: str) -> np.ndarray:
    """A checked 3D float64 NumPy volume (X, Y, Z) (tensors are moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    check_volume(x, name, ndim=3)
    return np.asarray(x, dtype=np.float64)


def as_volumes(x: Any, name: str, shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """A checked float32 CPU tensor (N, C, D, H, W); ``shape`` a pattern such as ``(None, 1, 32, 32, 32)``."""
    check_volume(x, name, ndim=5, shape=shape)
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.float()
