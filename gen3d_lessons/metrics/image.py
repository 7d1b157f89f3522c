"""Intensity agreement of a volume with a reference: PSNR, SSIM, RMSE, NMSE, and where the error sits.

- one volume against its reference: :func:`rmse`, :func:`nmse`, :func:`psnr`, :func:`ssim`
  (and the local map :func:`ssim_map`), each optionally inside a mask;
- chapter 11's scores of a denoiser: :func:`scores` (PSNR, SSIM, RMSE inside the brain) and
  :func:`mean_scores` over cases; :func:`detail_scores`, where the error sits (edges or flat
  tissue) and how sharp a result is; :func:`added_detail`, whether what one method adds to another
  agrees with the target — together they tell sharpening from invented detail;
- :func:`line_profile`: the intensities along a line, the edge profile of a figure.

``x`` / ``pred`` is what a method produced, ``y`` / ``target`` the reference.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .checks import as_array, as_volume, same_shape


def _intensity_pair(x: Any, y: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Two float64 volumes of one shape, and a boolean mask of that shape (or None)."""
    x, y = as_array(x, "x").astype(np.float64), as_array(y, "y").astype(np.float64)
    same_shape(x, y, "x", "y")
    if mask is not None:
        mask = as_array(mask, "mask") != 0
        same_shape(x, mask, "x", "mask")
        if not mask.any():
            raise ValueError("mask: selects no voxels")
    return x, y, mask


def _data_range(y: np.ndarray, data_range: float | None) -> float:
    """The reference's value range (max − min of ``y``) unless given."""
    if data_range is None:
        data_range = float(y.max() - y.min())
        if data_range == 0:
            raise ValueError("data_range: the reference y is constant, so its range is 0; pass data_range")
    elif not (isinstance(data_range, (int, float, np.number)) and data_range > 0):
        raise ValueError(f"data_range: expected a positive number, got {data_range!r}")
    return float(data_range)


# 1. One volume against its reference --------------------------------------------------------

def _mse(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> float:
    d2 = (x - y) ** 2
    return float(d2[mask].mean() if mask is not None else d2.mean())


def rmse(x: Any, y: Any, mask: Any = None) -> float:
    """Root-mean-square error between ``x`` and reference ``y`` (inside ``mask`` if given)."""
    x, y, mask = _intensity_pair(x, y, mask)
    return math.sqrt(_mse(x, y, mask))


def nmse(x: Any, y: Any, mask: Any = None) -> float:
    """Normalised squared error ``||x − y||² / ||y||²`` (inside ``mask`` if given); 0 is perfect."""
    x, y, mask = _intensity_pair(x, y, mask)
    if mask is not None:
        x, y = x[mask], y[mask]
    denom = float((y ** 2).sum())
    if denom == 0:
        raise ValueError("y: is all zeros, so ||y||² is 0 and NMSE is undefined")
    return float(((x - y) ** 2).sum()) / denom


def psnr(x: Any, y: Any, data_range: float | None = None, mask: Any = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(R² / MSE)``; higher is better.

    ``R`` is ``data_range``, by default the value range of the reference ``y`` (its max − min;
    note that ``skimage.metrics.peak_signal_noise_ratio`` instead uses the dtype's range, and
    takes the reference first). Identical volumes give infinity.
    """
    x, y, mask = _intensity_pair(x, y, mask)
    r = _data_range(y, data_range)
    mse = _mse(x, y, mask)
    return math.inf if mse == 0 else 10.0 * math.log10(r * r / mse)


def ssim_map(x: Any, y: Any, data_range: float | None = None, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """The local SSIM at every voxel (same shape as ``x``), with Gaussian windows (Wang et al. 2004).

    ``SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``, with local means
    and (co)variances from a Gaussian of width ``sigma`` voxels (truncated at 3.5 σ: an
    11-voxel window for σ = 1.5), ``C1 = (k1 R)²``, ``C2 = (k2 R)²``. Borders are mirrored,
    as in scikit-image.
    """
    x, y, _ = _intensity_pair(x, y)
    if x.ndim not in (2, 3):
        raise ValueError(f"x: expected a 2D or 3D volume such as (D, H, W), got shape {x.shape}; "
                         "index the batch and channel first, e.g. x[0, 0]")
    r = _data_range(y, data_range)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=sigma, truncate=3.5, mode="reflect")

    # 1. local means
    mu_x, mu_y = blur(x), blur(y)
    # 2. local (population) variances and covariance: E[ab] − E[a] E[b]
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    # 3. luminance × contrast-structure terms
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(x: Any, y: Any, data_range: float | None = None, mask: Any = None) -> float:
    """Structural similarity of two 2D/3D volumes; 1 for identical volumes.

    The mean of :func:`ssim_map` over the whole volume, or over ``mask`` if given (e.g. the
    brain, so that empty background does not inflate the score). ``data_range`` defaults to the
    reference ``y``'s max − min.

    Compared with ``skimage.metrics.structural_similarity(y, x, gaussian_weights=True,
    use_sample_covariance=False, data_range=R)``, the local map is the same; skimage then
    averages it only away from the border (it drops 5 voxels per side), which would leave
    little of a 16³ volume, so here the whole map is averaged.
    """
    s = ssim_map(x, y, data_range)
    if mask is not None:
        _, _, mask = _intensity_pair(x, y, mask)
        return float(s[mask].mean())
    return float(s.mean())


# 2. A denoiser's scores (chapter 11): volumes (D, H, W) in [0, 1], inside the brain ----------

def _mask(m: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask of ``shape`` (any non-zero value is inside)."""
    m = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m)
    if m.shape != shape:
        raise ValueError(f"mask: shape {m.shape} does not match the volumes' {shape}")
    return m != 0


def scores(pred: Any, target: Any, mask: Any, data_range: float = 1.0) -> dict[str, float]:
    """``{"psnr": dB, "ssim": ..., "rmse": ...}`` of ``pred`` against ``target`` inside ``mask``.

    ``data_range`` is the intensity range of the volumes (1 for our [0, 1] images): fixed, so
    that every method is measured on the same scale.
    """
    pred, target = as_volume(pred, "pred"), as_volume(target, "target")
    return {"psnr": psnr(pred, target, data_range=data_range, mask=mask),
            "ssim": ssim(pred, target, data_range=data_range, mask=mask),
            "rmse": rmse(pred, target, mask=mask)}


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
    pred, target = as_volume(pred, "pred"), as_volume(target, "target")
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
    pred, base, target = as_volume(pred, "pred"), as_volume(base, "base"), as_volume(target, "target")
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
    """Intensities of ``volume`` (D, H, W) at ``n`` evenly spaced points from voxel ``start`` to ``end``
    (linear interpolation): the edge profile of a figure."""
    volume = as_volume(volume, "volume")
    start, end = np.asarray(start, float), np.asarray(end, float)
    if start.shape != (3,) or end.shape != (3,):
        raise ValueError(f"start, end: expected three voxel coordinates each, got {start.tolist()} and {end.tolist()}")
    points = start[:, None] + (end - start)[:, None] * np.linspace(0, 1, n)[None]        # (3, n)
    return ndimage.map_coordinates(volume, points, order=1, mode="nearest")


# 4. An autoencoder's reconstructions (chapter 4): batches (B, 1, D, H, W), inside a mask and over the volume

def reconstruction_scores(x_hat: Any, x: Any, mask: Any, data_range: float = 1.0, region: str = "brain"
                          ) -> dict[str, float]:
    """Means over a batch of single-channel volumes (B, 1, D, H, W) of three scores of ``x_hat`` against ``x``:

    ``SSIM (<region>)`` inside ``mask``, ``SSIM (volume)`` over the whole volume, and
    ``PSNR (<region>, dB)`` inside ``mask``. Both are reported because a cube is mostly dark
    background, where SSIM's luminance term punishes tiny offsets around zero: the whole-volume
    score says more about the background than about the brain.
    """
    shapes = [tuple(getattr(v, "shape", ())) for v in (x_hat, x, mask)]
    if len(shapes[1]) != 5 or shapes[1][1] != 1 or len(set(shapes)) != 1:
        raise ValueError(f"x_hat, x, mask: expected one shape (B, 1, D, H, W), got {shapes}")
    each = [(ssim(a[0], b[0], data_range, mask=m[0]), ssim(a[0], b[0], data_range), psnr(a[0], b[0], data_range, mask=m[0]))
            for a, b, m in zip(x_hat, x, mask)]
    names = (f"SSIM ({region})", "SSIM (volume)", f"PSNR ({region}, dB)")
    return {name: float(v) for name, v in zip(names, np.mean(each, axis=0))}


def reconstruction_table(outputs: dict[str, Any], x: Any, mask: Any, data_range: float = 1.0,
                         region: str = "brain"):
    """:func:`reconstruction_scores` of each entry of ``outputs`` ``{method: x_hat}`` against ``x``,
    as a pandas DataFrame with one row per method, in the order given."""
    import pandas as pd

    if not hasattr(outputs, "items") or not outputs:
        raise ValueError("outputs: expected a non-empty dict {method: volumes (B, 1, D, H, W)}")
    return pd.DataFrame({name: reconstruction_scores(v, x, mask, data_range, region)
                         for name, v in outputs.items()}).T


def steepest_slope(profile: Any, samples_per_voxel: float = 1.0) -> float:
    """The steepest change of a :func:`line_profile` between neighbouring samples, per voxel
    (``samples_per_voxel`` samples to a voxel): how sharp the sharpest edge it crosses is."""
    profile = as_array(profile, "profile")
    if profile.ndim != 1 or profile.size < 2:
        raise ValueError(f"profile: expected a 1D profile of at least 2 samples, got shape {profile.shape}")
    if not (isinstance(samples_per_voxel, (int, float, np.number)) and samples_per_voxel > 0):
        raise ValueError(f"samples_per_voxel: expected a positive number, got {samples_per_voxel!r}")
    return float(np.abs(np.diff(profile)).max() * samples_per_voxel)
