"""Classical denoisers of chapter 11 and the scores they are judged by.

- :func:`gaussian_denoise`: convolution with an isotropic Gaussian of width ``sigma`` voxels;
- :func:`nlm_denoise`: non-local means (Buades et al. 2005) in 3D, via
  ``skimage.restoration.denoise_nl_means``, with its filtering strength ``h`` given as a
  multiple of the noise level that :func:`estimate_noise_sigma` measures in the volume;
- :func:`choose_parameters`: parameters picked on the *validation* cases (never the test
  cases), with the table of every value tried;
- :func:`scores`: PSNR, SSIM and RMSE inside a mask (the brain), as the chapter reports them;
- :func:`detail_scores`: where the error sits (edges or flat tissue) and how sharp a result is;
  :func:`added_detail`: whether what one method adds to another agrees with the target —
  together they tell sharpening from invented detail.

Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1].
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .. import metrics
from ..data.io import check_volume


def _volume(x: Any, name: str) -> np.ndarray:
    """A checked 3D float64 NumPy volume (tensors are moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    check_volume(x, name, ndim=3)
    return np.asarray(x, dtype=np.float64)


def _mask(m: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask of ``shape`` (any non-zero value is inside)."""
    m = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m)
    if m.shape != shape:
        raise ValueError(f"mask: shape {m.shape} does not match the volumes' {shape}")
    return m != 0


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


def _edges_and_flat(target: np.ndarray, mask: np.ndarray, edge_fraction: float, smooth: float):
    """Boolean maps of the brain's "edge" voxels (the ``edge_fraction`` with the steepest
    gradient of the lightly smoothed target) and its "flat" voxels (the half with the gentlest)."""
    if mask.sum() < 8:
        raise ValueError(f"mask: selects {int(mask.sum())} voxels; need at least 8")
    if not 0 < edge_fraction <= 0.5:
        raise ValueError(f"edge_fraction: expected a value in (0, 0.5], got {edge_fraction!r}")
    g = np.linalg.norm(np.gradient(ndimage.gaussian_filter(target, smooth)), axis=0)     # (D, H, W)
    inside = g[mask]
    edges = mask & (g >= np.quantile(inside, 1 - edge_fraction))
    flat = mask & (g <= np.quantile(inside, 0.5))
    return edges, flat


def detail_scores(pred: Any, target: Any, mask: Any, edge_fraction: float = 0.25,
                  smooth: float = 1.0) -> dict[str, float]:
    """Where the error of ``pred`` is, and how much detail it has, inside ``mask``.

    - ``rmse_edges``: RMSE on the edge voxels (the ``edge_fraction`` of the brain where the
      target, smoothed by a Gaussian of ``smooth`` voxels so that noise does not count as
      an edge, changes fastest): lower means tissue boundaries are better restored;
    - ``rmse_flat``: RMSE on the flat half of the brain (gentlest gradient): detail a method
      adds there was not in the target;
    - ``sharpness``: mean gradient magnitude of ``pred`` over that of ``target`` (1: as much
      voxel-to-voxel variation as the full-dose volume, noise included; below 1: smoother).
    """
    pred, target = _volume(pred, "pred"), _volume(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {pred.shape} does not match target shape {target.shape}")
    mask = _mask(mask, target.shape)
    edges, flat = _edges_and_flat(target, mask, edge_fraction, smooth)
    err2 = (pred - target) ** 2

    def grad_norm(v: np.ndarray) -> float:
        return float(np.linalg.norm(np.gradient(v), axis=0)[mask].mean())

    return {"rmse_edges": float(np.sqrt(err2[edges].mean())), "rmse_flat": float(np.sqrt(err2[flat].mean())),
            "sharpness": grad_norm(pred) / max(grad_norm(target), 1e-12)}


def added_detail(pred: Any, base: Any, target: Any, mask: Any, edge_fraction: float = 0.25,
                 smooth: float = 1.0) -> dict[str, float]:
    """What ``pred`` adds to ``base`` (``d = pred − base``, e.g. adversarial minus MSE-only
    output), judged against what ``base`` missed (``e = target − base``), on the edge and flat
    voxels of :func:`detail_scores`:

    - ``added_rms_edges`` / ``added_rms_flat``: how much was added (RMS of ``d``);
    - ``toward_target_edges`` / ``toward_target_flat``: the correlation ``⟨d, e⟩ / (‖d‖ ‖e‖)``.
      Near 1: the added detail is detail the target has (sharpening). Near 0: it is unrelated
      to the target, i.e. invented (hallucinated). The target's own noise cannot be predicted,
      so even a perfect sharpener stays below 1 where that noise dominates ``e``.
    """
    pred, base, target = _volume(pred, "pred"), _volume(base, "base"), _volume(target, "target")
    if not pred.shape == base.shape == target.shape:
        raise ValueError(f"pred {pred.shape}, base {base.shape}, target {target.shape}: expected one shape")
    mask = _mask(mask, target.shape)
    edges, flat = _edges_and_flat(target, mask, edge_fraction, smooth)
    d, e = pred - base, target - base
    out = {}
    for name, region in (("edges", edges), ("flat", flat)):
        dn, en = np.linalg.norm(d[region]), np.linalg.norm(e[region])
        out[f"added_rms_{name}"] = float(dn / math.sqrt(max(region.sum(), 1)))
        out[f"toward_target_{name}"] = float(np.dot(d[region], e[region]) / (dn * en)) if dn * en > 0 else 0.0
    return out


def line_profile(volume: Any, start: Sequence[float], end: Sequence[float], n: int = 64) -> np.ndarray:
    """Intensities of ``volume`` at ``n`` evenly spaced points from voxel ``start`` to ``end``
    (linear interpolation): the edge profile of a figure."""
    volume = _volume(volume, "volume")
    start, end = np.asarray(start, float), np.asarray(end, float)
    if start.shape != (3,) or end.shape != (3,):
        raise ValueError(f"start, end: expected three voxel coordinates each, got {start.tolist()} and {end.tolist()}")
    points = start[:, None] + (end - start)[:, None] * np.linspace(0, 1, n)[None]        # (3, n)
    return ndimage.map_coordinates(volume, points, order=1, mode="nearest")


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

    The weights are ``exp(−max(d² − 2σ², 0) / h²)``, ``d²`` the mean squared difference of the
    two patches, with ``h = h_factor · σ``; ``σ`` is
    the noise level (estimated from ``x`` when None).
    """
    from skimage.restoration import denoise_nl_means

    x = _volume(x, "x")
    if not (isinstance(h_factor, (int, float, np.number)) and h_factor > 0):
        raise ValueError(f"h_factor: expected a positive number, got {h_factor!r}")
    sigma = estimate_noise_sigma(x) if sigma is None else float(sigma)
    return denoise_nl_means(x, h=h_factor * sigma, sigma=sigma, patch_size=patch_size,
                            patch_distance=patch_distance, fast_mode=True, channel_axis=None)


# 4. Choosing parameters on the validation cases ---------------------------------------------

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
