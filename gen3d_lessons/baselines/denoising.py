"""Classical denoisers of chapter 11.

- :func:`gaussian_denoise`: convolution with an isotropic Gaussian of width ``sigma`` voxels;
- :func:`nlm_denoise`: non-local means (Buades et al. 2005) in 3D, via
  ``skimage.restoration.denoise_nl_means``, with its filtering strength ``h`` given as a
  multiple of the noise level that :func:`estimate_noise_sigma` measures in the volume;
- :func:`choose_parameters`: parameters picked on the *validation* cases (never the test
  cases) by the mean PSNR of :func:`gen3d_lessons.metrics.image.mean_scores`, with the table of
  every value tried.

The scores they are judged by (PSNR, SSIM, RMSE inside the brain; where the error sits) are in
:mod:`gen3d_lessons.metrics.image`.

Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1].
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from ..metrics.checks import as_volume
from ..metrics.image import mean_scores


# 1. The Gaussian filter ----------------------------------------------------------------------

def gaussian_denoise(x: Any, sigma: float) -> np.ndarray:
    """Blur with an isotropic Gaussian of standard deviation ``sigma`` voxels (0: unchanged)."""
    x = as_volume(x, "x")
    if not (isinstance(sigma, (int, float, np.number)) and sigma >= 0):
        raise ValueError(f"sigma: expected a non-negative number of voxels, got {sigma!r}")
    return ndimage.gaussian_filter(x, float(sigma), mode="nearest") if sigma > 0 else x.copy()


# 2. Non-local means --------------------------------------------------------------------------

def estimate_noise_sigma(x: Any) -> float:
    """Noise standard deviation of a volume by Donoho's rule: ``median(|d|) / 0.6745``.

    ``d`` are the finest *diagonal* Haar wavelet coefficients: the alternating-sign sum over
    every 2×2×2 block, divided by ``√8``. Smooth anatomy nearly cancels in that sum, white noise
    of standard deviation σ keeps it, and the median ignores the few edges that do not cancel.
    (``skimage.restoration.estimate_sigma`` does the same with a Daubechies wavelet, but needs
    the PyWavelets package.)
    """
    x = as_volume(x, "x")
    if min(x.shape) < 2:
        raise ValueError(f"x: every edge must be at least 2 voxels, got shape {x.shape}")
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]   # even edges
    d = np.zeros([n // 2 for n in x.shape])
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                d += (-1) ** (i + j + k) * x[i::2, j::2, k::2]
    return float(np.median(np.abs(d / math.sqrt(8))) / 0.6745)


def nlm_denoise(x: Any, h_factor: float, patch_size: int = 3, patch_distance: int = 2,
                sigma: float | None = None) -> np.ndarray:
    """3D non-local means: every voxel becomes a weighted mean of voxels whose surrounding
    ``patch_size``³ patches look alike, searched within ``patch_distance`` voxels.

    The weights are ``exp(−max(d² − 2σ², 0) / h²)``, ``d²`` the mean squared difference of the
    two patches, with ``h = h_factor · σ``; ``σ`` is
    the noise level (estimated from ``x`` when None).
    """
    from skimage.restoration import denoise_nl_means

    x = as_volume(x, "x")
    if not (isinstance(h_factor, (int, float, np.number)) and h_factor > 0):
        raise ValueError(f"h_factor: expected a positive number, got {h_factor!r}")
    sigma = estimate_noise_sigma(x) if sigma is None else float(sigma)
    return denoise_nl_means(x, h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                            patch_distance=patch_distance, fast_mode=True, channel_axis=None)


# 3. Choosing parameters on the validation cases ---------------------------------------------

def choose_parameters(denoiser: Callable[..., np.ndarray], grid: Sequence[Mapping[str, Any]],
                      inputs: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any]) -> tuple[dict, pd.DataFrame]:
    """The keyword arguments in ``grid`` for which ``denoiser(x, **kwargs)`` has the best mean
    PSNR on the given (validation) cases, and a table of the mean scores of every setting tried
    (one column per parameter, then psnr, ssim, rmse)."""
    if len(grid) == 0:
        raise ValueError("grid: give at least one parameter setting to try")
    rows = []
    for params in grid:
        preds = [denoiser(x, **params) for x in inputs]
        rows.append({**params, **mean_scores(preds, targets, masks)})
    table = pd.DataFrame(rows)
    return dict(grid[int(table["psnr"].to_numpy().argmax())]), table


def best_gaussian(inputs, targets, masks, sigmas: Sequence[float] = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2)):
    """:func:`choose_parameters` for :func:`gaussian_denoise` over ``sigmas`` (voxels)."""
    return choose_parameters(gaussian_denoise, [{"sigma": s} for s in sigmas], inputs, targets, masks)


def best_nlm(inputs, targets, masks, h_factors: Sequence[float] = (0.6, 0.8, 1.0, 1.2),
             patch_distances: Sequence[int] = (1, 2), patch_size: int = 3):
    """:func:`choose_parameters` for :func:`nlm_denoise` over every pair of ``h_factors``
    (multiples of the estimated σ) and ``patch_distances`` (search radius in voxels)."""
    grid = [{"h_factor": h, "patch_distance": d} for d in patch_distances for h in h_factors]
    return choose_parameters(partial(nlm_denoise, patch_size=patch_size), grid, inputs, targets, masks)
