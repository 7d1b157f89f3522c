"""Comparing sets of samples: are generated volumes like real ones, diverse, and new?

- in a feature space (N, F) vs (M, F): :func:`frechet_distance` (FD, FID's formula),
  :func:`kid` (kernel distance, unbiased), :func:`mmd` (RBF kernel), :func:`one_nn_accuracy`
  (a leave-one-out two-sample test); :func:`mmd2_unbiased` is the estimator KID and MMD share;
- in voxel space: :func:`ms_ssim` of pairs and :func:`ms_ssim_diversity` of a set (mode
  collapse), :func:`memorisation` (are samples nearer the training set than new real volumes
  are?) and its pass/fail rule :func:`memorisation_passed`.

:mod:`gen3d_lessons.tasks.yardstick` puts them together into the book's table for generated volumes.
Features are ``(N, F)`` arrays (or anything :func:`~gen3d_lessons.metrics.checks.as_features`
flattens to that); volumes ``(N, C, D, H, W)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import numpy as np
import torch
from scipy import linalg

from .checks import as_features, as_volumes


# 1. Distances between two sets of features (N, F) and (M, F) ---------------------------------

def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, (N, M)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)  # rounding can make tiny negatives


def _pair(feats_a: Any, feats_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_features(feats_a, "feats_a"), as_features(feats_b, "feats_b")   # (N, F), (M, F) float64
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_b: {b.shape[1]} features per sample do not match feats_a's {a.shape[1]}")
    return a, b


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, our encoder).

    ``FD = ||mu_a − mu_b||² + Tr(S_a + S_b − 2 (S_a S_b)^{1/2})`` (Heusel et al. 2017), with
    ``mu`` the feature means and ``S`` the sample covariances. 0 for identical sets.

    With fewer samples than features the covariances are singular; ``scipy.linalg.sqrtm`` then
    returns a matrix with tiny imaginary parts (rounding), which are dropped. If the square root
    is not finite, or its imaginary part is not tiny, ``eps · I`` is added to both covariances
    and it is taken again. FD is biased upwards by small samples: compare rows that use the
    same numbers of samples.
    """
    a, b = _pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)                                   # (F,)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))                        # (F, F)
    s_b = np.atleast_2d(np.cov(b, rowvar=False))

    def sqrt_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "matrix is singular": handled below
            root = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(root).all():
            return None
        if np.iscomplexobj(root):
            scale = max(1.0, float(np.abs(root).max()))
            if np.abs(root.imag).max() > 1e-3 * scale:
                return None
            root = root.real
        return root

    root = sqrt_product(s_a, s_b)
    if root is None:                                   # regularise the singular covariances
        offset = eps * np.eye(len(s_a))
        root = sqrt_product(s_a + offset, s_b + offset)
        if root is None:
            raise FloatingPointError("frechet_distance: the covariance square root is not finite even with "
                                     f"eps={eps}; pass a larger eps")
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(root))


def mmd2_unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased MMD² from the three kernel matrices (diagonals of the within-set ones dropped)."""
    n, m = len(k_aa), len(k_bb)
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2.0 * k_ab.mean())


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID, Bińkowski et al. 2018): mean and std of unbiased MMD² over subsets.

    The kernel is the cubic polynomial ``k(x, y) = (xᵀy / F + 1)³``. Each of ``subsets`` rounds
    draws ``min(subset_size, N, M)`` samples from each set without replacement and computes the
    unbiased MMD² (so KID is about 0, possibly slightly negative, for one distribution, whatever
    the sample size: unlike FD it has no small-sample bias). Returns ``(mean, std)``.
    """
    a, b = _pair(feats_a, feats_b)
    if not (isinstance(subsets, int) and subsets >= 1 and isinstance(subset_size, int) and subset_size >= 2):
        raise ValueError(f"subsets >= 1 and subset_size >= 2 must be integers, got {subsets!r}, {subset_size!r}")
    f = a.shape[1]
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)

    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / f + 1.0) ** 3

    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        values.append(mmd2_unbiased(k(x, x), k(y, y), k(x, y)))
    return float(np.mean(values)), float(np.std(values))


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
    x, y = as_features(x_feats, "x_feats"), as_features(y_feats, "y_feats")
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

    # 3. unbiased: drop the diagonal k(x_i, x_i) = 1 terms
    return mmd2_unbiased(k(x, x), k(y, y), k(x, y))


def one_nn_accuracy(feats_a: Any, feats_b: Any) -> float:
    """Leave-one-out 1-nearest-neighbour two-sample test (Lopez-Paz & Oquab 2017).

    Pool both sets, label each point by its set, and classify every point by the label of its
    nearest *other* point (Euclidean). Returns the balanced accuracy (mean of the two sets'
    accuracies), which equals plain accuracy when N = M and stays near 0.5 for one distribution
    when the sets differ in size. 0.5: indistinguishable; 1.0: separable; **below 0.5**: samples
    sit on top of reals, the signature of copies (each copy's neighbour is its original).
    """
    a, b = _pair(feats_a, feats_b)
    x = np.concatenate([a, b])                                         # (N + M, F)
    label = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
    d2 = _sq_dists(x, x)
    np.fill_diagonal(d2, np.inf)                                       # leave one out
    correct = label[d2.argmin(1)] == label
    return float(0.5 * (correct[~label].mean() + correct[label].mean()))


# 2. Voxel-space statistics: diversity and memorisation ----------------------------------------

# The first three of Wang et al.'s (2003) five MS-SSIM scale weights, renormalised: at 32³ there
# is room for three scales (32³, 16³, 8³), not five.
MS_SSIM_WEIGHTS = tuple(w / (0.0448 + 0.2856 + 0.3001) for w in (0.0448, 0.2856, 0.3001))


def _ms_ssim_kernel(edge: int) -> int:
    """The largest Gaussian window (5 or 3) that MONAI accepts for three scales at this edge.

    MONAI requires ``edge // (len(weights) − 1)² > kernel_size − 1``, i.e. ``edge // 4 >= k``.
    """
    for k in (5, 3):
        if edge // (len(MS_SSIM_WEIGHTS) - 1) ** 2 > k - 1:
            return k
    raise ValueError(f"volumes: an edge of {edge} voxels is too small for 3-scale MS-SSIM (need >= 12)")


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """MS-SSIM of each pair ``(x[i], y[i])`` with MONAI, 3 scales, window 5 (3 below 20³): (B,).

    ``x`` and ``y`` are (B, C, D, H, W) with the same shape; 1 for identical volumes.
    """
    from monai.metrics.regression import compute_ms_ssim

    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"x, y: expected two (B, C, D, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    k = _ms_ssim_kernel(min(x.shape[2:]))
    return compute_ms_ssim(x.float(), y.float(), spatial_dims=3, data_range=float(data_range), kernel_size=k,
                           kernel_sigma=1.5 if k == 5 else 1.0, weights=MS_SSIM_WEIGHTS)[:, 0]


def ms_ssim_diversity(volumes: Any, data_range: float, max_pairs: int = 100, seed: int = 0,
                      batch_size: int = 25) -> float:
    """Mean MS-SSIM over random pairs of distinct volumes of one set (Odena et al. 2017).

    Lower means more diverse. Alone it means little: compare with the same statistic on real
    volumes. Samples much *more* alike than real pairs are a sign of mode collapse; mean + noise
    samples are alike in their anatomy and differ only in noise. ``data_range`` must be the same
    for every set compared (e.g. the training volumes' max − min). Uses all pairs if there are at
    most ``max_pairs``, else ``max_pairs`` random ones.
    """
    v = as_volumes(volumes, "volumes")
    n = len(v)
    if n < 2:
        raise ValueError(f"volumes: need at least 2 volumes for pairs, got {n}")
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
        i, j = i[pick], j[pick]
    values = [ms_ssim(v[i[s:s + batch_size]], v[j[s:s + batch_size]], data_range)
              for s in range(0, len(i), batch_size)]
    return float(torch.cat(values).mean())


def memorisation(samples: Any, train: Any, heldout: Any) -> dict[str, float]:
    """Are samples closer to the training set than to new real volumes? (voxel space)

    For every sample ``s``: ``a(s)``, its distance to the nearest training volume, and ``b(s)``,
    its distance to the nearest held-out real volume; ``q(s) = a(s) / b(s)``. A copy of a
    training volume has ``q = 0``. A new brain, however good or bad, is about as near the
    training set as it is near other new brains. The same ``q`` for every held-out real volume
    (with ``b`` its distance to the nearest *other* held-out volume; a sample identical to a
    held-out volume is treated the same way) calibrates what "as near" means with these set
    sizes. Distances are RMS differences over voxels divided by the standard deviation of the
    training voxels (0: an exact copy; about 1.4: two unrelated images of the same contrast).
    Returns:

    - ``mem_ratio = median q(samples) / median q(held-out)``: about 1 when samples are no nearer
      the training set than new brains are, well below 1 for a generator that reproduces training
      volumes, 0 for copies.
    - ``mem_frac``: the fraction of samples that look copied, with ``q`` below half the median
      ``q`` of the held-out volumes: at least twice as near a training volume, relative to other
      new brains, as a typical new brain is (about 0 for held-out volumes, 1 for copies).
    - ``mem_median``: ``median a(samples)``, and ``mem_median_heldout``: ``median a(held-out)``.

    Why the ratio to the distance to held-out volumes, and not ``a`` alone: a blurry sample (the
    average brain, say) is close in voxel space to *every* brain, training or not; measured by
    ``a`` alone it would look like memorisation. Voxel space, not feature space, because a copy
    is a copy voxel by voxel, whereas the encoder could map two different brains onto nearby
    features; the cost is that a copy shifted by a voxel no longer looks close. Inputs may also
    be feature arrays (N, F). Needs at least 2 held-out volumes.
    """
    return MemorisationCheck(train, heldout)(samples)


class MemorisationCheck:
    """:func:`memorisation` with the training and held-out volumes fixed: what depends only on them
    (the held-out volumes' ``q``, the normalisation) is computed once, and each call scores one
    set of samples. Use it when many sets are checked against the same real brains."""

    def __init__(self, train: Any, heldout: Any):
        t, h = as_features(train, "train"), as_features(heldout, "heldout")
        if t.shape[1] != h.shape[1]:
            raise ValueError(f"train, heldout: need the same number of voxels per volume, got {t.shape[1]}, {h.shape[1]}")
        self.scale = float(t.std()) * math.sqrt(t.shape[1])               # ||x - y|| -> RMS in units of std
        if self.scale == 0:
            raise ValueError("train: all training voxels are equal, distances cannot be normalised")
        self.train, self.heldout = t, h
        self.a_h = np.sqrt(_sq_dists(h, t).min(1)) / self.scale           # (M,) to the nearest training volume
        self.q_h = self.a_h / np.maximum(self._nearest_other(_sq_dists(h, h)), 1e-12)

    def _nearest_other(self, d2: np.ndarray) -> np.ndarray:              # nearest non-identical volume
        d2 = np.where(d2 <= 1e-12 * self.scale ** 2, np.inf, d2)
        return np.sqrt(d2.min(1)) / self.scale

    def __call__(self, samples: Any) -> dict[str, float]:
        s = as_features(samples, "samples")
        if s.shape[1] != self.train.shape[1]:
            raise ValueError(f"samples: {s.shape[1]} voxels per volume do not match the real volumes' {self.train.shape[1]}")
        a_s = np.sqrt(_sq_dists(s, self.train).min(1)) / self.scale       # (N,) to the nearest training volume
        q_s = a_s / np.maximum(self._nearest_other(_sq_dists(s, self.heldout)), 1e-12)   # over the nearest held-out one
        q_h = np.median(self.q_h)
        return {"mem_ratio": float(np.median(q_s) / max(q_h, 1e-12)), "mem_frac": float((q_s < 0.5 * q_h).mean()),
                "mem_median": float(np.median(a_s)), "mem_median_heldout": float(np.median(self.a_h))}


def memorisation_passed(row: Mapping[str, float], max_frac: float = 0.2, min_ratio: float = 0.8) -> bool:
    """The memorisation check of one row of the table: does the set look like *new* brains?

    It passes when at most ``max_frac`` of the samples look copied (``mem_frac``) and the samples
    are, in the median, at least ``min_ratio`` times as far from the training set (relative to
    new brains) as held-out brains are (``mem_ratio``); see :func:`memorisation`. Held-out real
    brains pass (``mem_ratio`` is 1 by construction); copies of training volumes fail (1 and 0).
    """
    return bool(row["mem_frac"] <= max_frac and row["mem_ratio"] >= min_ratio)
