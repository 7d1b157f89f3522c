"""Classical denoisers of chapter 11 and the scores they are judged by.

- :func:`gaussian_denoise`: convolution with an isotropic Gaussian of width ``sigma`` voxels;
- :func:`nlm_denoise`: non-local means (Buades et al. 2005) in 3D, via
  ``skimage.restoration.denoise_nl_means``, with its filtering strength ``h`` given as a
  multiple of the noise level that :func:`estimate_noise_sigma` measures in the volume;
- :func:`choose_parameter`: a parameter picked on the *validation* cases (never the test
  cases), with the table of every value tried;
- :func:`scores`: PSNR, SSIM and RMSE inside a mask (the brain), as the chapter reports them.

Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from . import metrics
from .data.io import check_volume


def _volume(x: Any, name: str) -> np.ndarray:
    """A checked 3D float64 NumPy volume (tensors are moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    check_volume(x, name, ndim=3)
    return np.asarray(x, dtype=np.float64)


# 1. Scores -----------------------------------------------------------------------------------

def scores(pred: Any, target: Any, mask: Any, data_range: float = 1.0) -> dict[str, float]:
    """``{"psnr": dB, "ssim": ..., "rmse": ...}`` of ``pred`` against ``target`` inside ``mask``.

    ``data_range`` is the intensity range of the volumes (1 for our [0, 1] images): fixed, so
    that every method is measured on the same scale.
    """
    pred, target = _volume(pred, "pred"), _volume(target, "target")
    return {"psnr": metrics.psnr(pred, target, data_range=data_range, mask=mask),
            "ssim": metrics.ssim(pred, target, data_range=data_range, mask=mask),
            "rmse": metrics.rmse(pred, target, mask=mask)}


def mean_scores(preds: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any],
                data_range: float = 1.0) -> dict[str, float]:
    """:func:`scores` averaged over cases (PSNR is averaged in dB, as papers report it)."""
    if not (len(preds) == len(targets) == len(masks)) or len(preds) == 0:
        raise ValueError(f"preds, targets, masks: expected equal non-zero lengths, got "
                         f"{len(preds)}, {len(targets)}, {len(masks)}")
    rows = [scores(p, t, m, data_range) for p, t, m in zip(preds, targets, masks)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# 2. The Gaussian filter ----------------------------------------------------------------------

def gaussian_denoise(x: Any, sigma: float) -> np.ndarray:
    """Blur with an isotropic Gaussian of standard deviation ``sigma`` voxels (0: unchanged)."""
    x = _volume(x, "x")
    if not (isinstance(sigma, (int, float, np.number)) and sigma >= 0):
        raise ValueError(f"sigma: expected a non-negative number of voxels, got {sigma!r}")
    return ndimage.gaussian_filter(x, float(sigma), mode="nearest") if sigma > 0 else x.copy()


# 3. Non-local means --------------------------------------------------------------------------

def estimate_noise_sigma(x: Any) -> float:
    """Noise standard deviation of a volume by Donoho's rule: ``median(|d|) / 0.6745``.

    ``d`` are the finest *diagonal* Haar wavelet coefficients: the alternating-sign sum over
    every 2×2×2 block, divided by ``√8``. Smooth anatomy nearly cancels in that sum, white noise
    of standard deviation σ keeps it, and the median ignores the few edges that do not cancel.
    (``skimage.restoration.estimate_sigma`` does the same with a Daubechies wavelet, but needs
    the PyWavelets package.)
    """
    x = _volume(x, "x")
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

    The weights are ``exp(−max(‖P_i − P_j‖² − 2σ², 0) / h²)`` with ``h = h_factor · σ``; ``σ`` is
    the noise level (estimated from ``x`` when None).
    """
    from skimage.restoration import denoise_nl_means

    x = _volume(x, "x")
    if not (isinstance(h_factor, (int, float, np.number)) and h_factor > 0):
        raise ValueError(f"h_factor: expected a positive number, got {h_factor!r}")
    sigma = estimate_noise_sigma(x) if sigma is None else float(sigma)
    return denoise_nl_means(x, h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                            patch_distance=patch_distance, fast_mode=True, channel_axis=None)


# 4. Choosing a parameter on the validation cases ---------------------------------------------

def choose_parameter(denoiser: Callable[[np.ndarray, float], np.ndarray], values: Sequence[float],
                     inputs: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any],
                     name: str = "value") -> tuple[float, pd.DataFrame]:
    """The value of ``denoiser(x, value)`` with the best mean PSNR on the given (validation)
    cases, and a table of the mean scores of every value tried."""
    if len(values) == 0:
        raise ValueError("values: give at least one parameter value to try")
    rows = []
    for v in values:
        preds = [denoiser(x, v) for x in inputs]
        rows.append({name: v, **mean_scores(preds, targets, masks)})
    table = pd.DataFrame(rows)
    best = table[name].iloc[int(table["psnr"].idxmax())]
    return float(best), table


def best_gaussian(inputs, targets, masks, sigmas: Sequence[float] = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2)):
    """:func:`choose_parameter` for :func:`gaussian_denoise` over ``sigmas`` (voxels)."""
    return choose_parameter(gaussian_denoise, sigmas, inputs, targets, masks, name="sigma")


def best_nlm(inputs, targets, masks, h_factors: Sequence[float] = (0.4, 0.6, 0.8, 1.0), **kw):
    """:func:`choose_parameter` for :func:`nlm_denoise` over ``h_factors`` (multiples of σ)."""
    return choose_parameter(lambda x, h: nlm_denoise(x, h, **kw), h_factors, inputs, targets, masks,
                            name="h_factor")
