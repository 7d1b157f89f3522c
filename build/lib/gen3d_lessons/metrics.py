"""Metrics: how each chapter measures its results. Pure functions, one number (or one per class).

Every function takes NumPy arrays or torch tensors (on any device) and returns Python floats,
or a dict ``{label: float}`` for per-class segmentation metrics. Argument order follows the
book: ``pred`` / ``x`` is what a model produced, ``target`` / ``y`` is the reference.

- overlap and surface distance of label maps: :func:`dice`, :func:`hd95`, :func:`assd`
  (the distances call MONAI, which handles spacing and surfaces well);
- intensity agreement of volumes: :func:`psnr`, :func:`ssim`, :func:`rmse`, :func:`nmse`;
- distance between two *sets* of samples (are generated volumes like real ones?): :func:`mmd`.

Bad input (shapes that differ, NaN, a label map of fractions) raises ``ValueError`` naming the
argument, because a metric silently computed on the wrong thing is worse than none.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

Labels = Sequence[int] | Mapping[str, int] | None


# 1. Turning inputs into checked NumPy arrays -------------------------------------------------

def _array(a: Any, name: str) -> np.ndarray:
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


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {b.shape} does not match {name_a} shape {a.shape}")


def _intensity_pair(x: Any, y: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Two float64 volumes of one shape, and a boolean mask of that shape (or None)."""
    x, y = _array(x, "x").astype(np.float64), _array(y, "y").astype(np.float64)
    _same_shape(x, y, "x", "y")
    if mask is not None:
        mask = _array(mask, "mask") != 0
        _same_shape(x, mask, "x", "mask")
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


def _label_map(a: Any, name: str) -> np.ndarray:
    """An integer label map; floats are accepted only if every value is a whole number."""
    a = _array(a, name)
    if a.dtype == bool:
        return a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name}: expected an integer label map, found fractional values "
                             "(take argmax over channels or threshold first)")
    return a.astype(np.int64)


def _labels(labels: Labels, pred: np.ndarray, target: np.ndarray) -> dict[Any, int]:
    """``{key in the result: label value}``. ``None`` means every non-zero label present."""
    if labels is None:
        present = np.union1d(np.unique(pred), np.unique(target))
        return {int(v): int(v) for v in present if v != 0}
    if isinstance(labels, Mapping):
        items = dict(labels)
    elif isinstance(labels, (int, np.integer)):
        items = {int(labels): int(labels)}
    else:
        items = {int(v): int(v) for v in labels}
    if not items:
        raise ValueError("labels: is empty; pass the label values to score, e.g. [1, 2, 3]")
    for key, value in items.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"labels: value for {key!r} must be an integer label, got {value!r}")
    return {k: int(v) for k, v in items.items()}


# 2. Overlap and surface distances ------------------------------------------------------------

def dice(pred: Any, target: Any, labels: Labels = None) -> dict[Any, float]:
    """Dice overlap per label: ``2 |P ∩ T| / (|P| + |T|)``, 1 is perfect, 0 is no overlap.

    ``pred`` and ``target`` are integer label maps of one shape, e.g. (D, H, W). ``labels`` is
    a list of label values (the result is keyed by value), a dict ``{"LV": 3, ...}`` (keyed by
    name), or None for every non-zero label present in either map.

    A label absent from both maps gives **NaN**, not 1: there was nothing to find, so the
    overlap is undefined (MONAI's ``DiceMetric(ignore_empty=True)`` does the same). Average
    with ``np.nanmean`` to skip such labels.
    """
    pred, target = _label_map(pred, "pred"), _label_map(target, "target")
    _same_shape(target, pred, "target", "pred")
    out = {}
    for key, value in _labels(labels, pred, target).items():
        p, t = pred == value, target == value
        total = int(p.sum()) + int(t.sum())
        out[key] = math.nan if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


def _spacing(spacing: Any, ndim: int) -> list[float] | None:
    if spacing is None:
        return None
    s = [float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=float))]
    if len(s) == 1:
        s = s * ndim
    if len(s) != ndim or not all(v > 0 for v in s):
        raise ValueError(f"spacing: expected {ndim} positive voxel sizes, got {spacing!r}")
    return s


def _surface_metric(pred: Any, target: Any, labels: Labels, spacing: Any, kind: str) -> dict[Any, float]:
    """Shared body of hd95 and assd: one-hot the chosen labels and ask MONAI."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred, target = _label_map(pred, "pred"), _label_map(target, "target")
    _same_shape(target, pred, "target", "pred")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred: expected a 2D or 3D label map such as (D, H, W), got shape {pred.shape}")
    spacing = _spacing(spacing, pred.ndim)
    wanted = _labels(labels, pred, target)

    out: dict[Any, float] = {}
    both: list[tuple[Any, int]] = []
    for key, value in wanted.items():
        p_any, t_any = bool((pred == value).any()), bool((target == value).any())
        if not p_any and not t_any:
            out[key] = math.nan        # nothing to find and nothing found: undefined
        elif p_any != t_any:
            out[key] = math.inf        # one surface is missing: the distance is unbounded
        else:
            both.append((key, value))
    if both:
        # MONAI wants one-hot (B, C, *spatial); we already chose the channels, so include them all.
        p1h = torch.from_numpy(np.stack([pred == v for _, v in both])[None])   # (1, C, D, H, W)
        t1h = torch.from_numpy(np.stack([target == v for _, v in both])[None])
        with warnings.catch_warnings():
            # MONAI warns about empty classes (handled above) and a deprecated argument it passes itself
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if kind == "hd95":
                d = compute_hausdorff_distance(p1h, t1h, include_background=True, percentile=95, spacing=spacing)
            else:
                d = compute_average_surface_distance(p1h, t1h, include_background=True, symmetric=True,
                                                     spacing=spacing)
        for (key, _), v in zip(both, d[0].tolist()):
            out[key] = float(v)
    return {key: out[key] for key in wanted}  # keep the caller's order


def hd95(pred: Any, target: Any, labels: Labels = None, spacing: Any = None) -> dict[Any, float]:
    """95th-percentile symmetric Hausdorff distance per label, in the units of ``spacing`` (mm).

    The largest boundary error after ignoring the worst 5 % of boundary points, taken both
    ways (pred → target and target → pred). ``spacing`` is the voxel size per axis (voxels if
    None). A label in neither map gives NaN; a label in only one map gives infinity.
    """
    return _surface_metric(pred, target, labels, spacing, "hd95")


def assd(pred: Any, target: Any, labels: Labels = None, spacing: Any = None) -> dict[Any, float]:
    """Average symmetric surface distance per label, in the units of ``spacing`` (mm).

    The mean distance from every boundary voxel of one map to the nearest boundary voxel of the
    other, over both directions. Same NaN / infinity conventions as :func:`hd95`.
    """
    return _surface_metric(pred, target, labels, spacing, "assd")


# 3. Intensity agreement ----------------------------------------------------------------------

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


# 4. Comparing sets of samples ----------------------------------------------------------------

def _features(a: Any, name: str) -> np.ndarray:
    """(N, F) float64 features; (N,) becomes (N, 1), (N, ...) is flattened per sample."""
    a = _array(a, name).astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    a = a.reshape(a.shape[0], -1)                     # (N, F)
    if a.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples for an unbiased estimate, got {a.shape[0]}")
    return a


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, (N, M)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)  # rounding can make tiny negatives


def mmd(x_feats: Any, y_feats: Any, sigma: float | None = None) -> float:
    """Squared maximum mean discrepancy between two samples, with an RBF kernel.

    ``x_feats`` (N, F) and ``y_feats`` (M, F) are features of N generated and M real volumes
    (or the volumes themselves, flattened). With ``k(a, b) = exp(−||a − b||² / (2 σ²))``, the
    unbiased estimate (Gretton et al. 2012, Eq. 3) is

    ``MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j)``.

    It is about 0 when both come from the same distribution (and, being unbiased, can dip
    slightly below 0), and grows as they differ. ``sigma`` defaults to the median heuristic:
    the median distance between all pairs of the pooled samples.
    """
    x, y = _features(x_feats, "x_feats"), _features(y_feats, "y_feats")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y_feats: {y.shape[1]} features per sample do not match x_feats' {x.shape[1]}")
    n, m = len(x), len(y)

    # 1. bandwidth
    if sigma is None:
        pooled = np.concatenate([x, y])
        d2 = _sq_dists(pooled, pooled)[np.triu_indices(n + m, k=1)]
        sigma = float(np.sqrt(np.median(d2)))
        if sigma == 0:
            sigma = 1.0  # more than half the pairs coincide: any width will do
    elif not (isinstance(sigma, (int, float, np.number)) and sigma > 0):
        raise ValueError(f"sigma: expected a positive number or None, got {sigma!r}")

    # 2. kernels within and across the samples
    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-_sq_dists(a, b) / (2.0 * sigma ** 2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    # 3. unbiased: drop the diagonal k(x_i, x_i) = 1 terms
    term_xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())
