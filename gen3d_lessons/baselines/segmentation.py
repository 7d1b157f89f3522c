"""Classical segmentation baselines: what a learned segmenter has to beat.

* :func:`threshold_segmentation`: tissue classes from intensity alone, by multi-level Otsu
  thresholds or k-means, inside a brain mask. T1 orders the tissues CSF < GM < WM, so the
  darkest class is CSF and the brightest WM. No anatomy, no training.
* :func:`atlas_segmentation`: carry an atlas's labels onto the subject through an affine map
  fitted to the intensities (:func:`gen3d_lessons.baselines.registration.register_affine`, on the
  global normalised cross-correlation). Anatomy enters through the atlas, but only up to a global affine.
* :func:`heart_intensity_segmentation`: bSSFP blood is bright and muscle dark, so k-means finds
  the blood pools; connected components and the position of the septum tell LV from RV, and a
  ring of dark voxels around the LV is called myocardium.
* :func:`tissue_baselines`: the three brain baselines of chapter 10 (Otsu, k-means, affine atlas)
  on a whole test set.
* :func:`classical_tissue_classifier`: what a classical pipeline does with a real T1 scan and its
  brain mask: a smooth bias field removed (:func:`correct_bias`), a three-class Gaussian mixture
  fitted to the intensities, and a Markov random field (a Potts prior, solved by iterated
  conditional modes) that makes a voxel agree with its neighbours. The reference chapter 10 holds
  its network against on scans that have no expert labels: another method, not ground truth.

Every function takes NumPy arrays in (X, Y, Z) voxel order and returns an integer label map of
the same shape.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..metrics.checks import as_volume
from .registration import register_affine


# 1. Intensity thresholds -----------------------------------------------------------------------

def brain_mask_from_intensity(image: Any) -> np.ndarray:
    """A brain mask from the image alone: above Otsu's threshold, holes filled, largest component.

    Works for skull-stripped volumes (dark outside the brain), as the book's phantoms are.
    """
    from skimage.filters import threshold_otsu

    x = as_volume(image, "image")
    mask = ndimage.binary_fill_holes(x > threshold_otsu(x))
    pieces, n = ndimage.label(mask)
    if n > 1:
        mask = pieces == 1 + int(np.argmax(ndimage.sum(mask, pieces, range(1, n + 1))))
    return mask


def threshold_segmentation(image: Any, mask: Any = None, n_classes: int = 3, method: str = "otsu",
                           seed: int = 0) -> np.ndarray:
    """Split the voxels inside ``mask`` into ``n_classes`` intensity classes, labelled 1 (darkest) .. n.

    ``method="otsu"``: multi-level Otsu thresholds (the cut points that maximise the between-class
    variance of the histogram); ``"kmeans"``: k-means on the intensities (Lloyd's algorithm, the
    same objective without the histogram). ``mask`` defaults to :func:`brain_mask_from_intensity`.
    On T1 this gives 1 CSF, 2 GM, 3 WM.
    """
    x = as_volume(image, "image")
    if mask is None:
        mask = brain_mask_from_intensity(x)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape or not mask.any():
        raise ValueError(f"mask: expected a non-empty boolean map of shape {x.shape}, got {mask.shape}")
    values = x[mask]
    if method == "otsu":
        from skimage.filters import threshold_multiotsu

        cuts = threshold_multiotsu(values, classes=n_classes)
        classes = np.digitize(values, cuts)                               # 0 .. n-1, darkest first
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_classes, n_init=3, random_state=seed).fit(values[:, None])
        rank = np.argsort(np.argsort(km.cluster_centers_[:, 0]))           # cluster -> brightness rank
        classes = rank[km.labels_]
    else:
        raise ValueError(f"method: expected 'otsu' or 'kmeans', got {method!r}")
    out = np.zeros(x.shape, dtype=np.int64)
    out[mask] = classes + 1
    return out


# 2. An atlas, registered by an affine map --------------------------------------------------------

def atlas_segmentation(atlas_image: Any, atlas_probabilities: Any, subject_image: Any,
                       iterations: int = 100) -> np.ndarray:
    """Labels of ``subject_image`` from an atlas: fit an affine map, warp the atlas's class maps, argmax.

    ``atlas_probabilities`` is (X, Y, Z, K) with channel k the probability of label k (background
    first), as :func:`gen3d_lessons.data.brain.brain_template` returns; the probabilities are
    warped (trilinear) and then the most likely label is taken, which keeps boundaries smoother
    than warping a label map with nearest-neighbour interpolation.
    """
    probs = np.asarray(atlas_probabilities, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[:3] != np.shape(atlas_image):
        raise ValueError(f"atlas_probabilities: expected (X, Y, Z, K) matching atlas_image {np.shape(atlas_image)}, "
                         f"got {probs.shape}")
    moving, fixed = (torch.as_tensor(as_volume(v, name), dtype=torch.float32)[None, None]      # (1, 1, *S)
                     for v, name in ((atlas_image, "atlas_image"), (subject_image, "subject_image")))
    # global NCC: the atlas need not share the subject's intensity scale; shrunk twice, since a global
    # map needs no fine detail; affine_grid's normalised coordinates carry the map to the full grid
    theta = register_affine(moving, fixed, similarity="global_ncc", steps=iterations, lr=0.01, blur_vox=0.0,
                            shrink=2, resample="affine_grid").theta
    p = torch.from_numpy(probs).permute(3, 0, 1, 2)[None]                                 # (1, K, *S)
    grid = F.affine_grid(theta, [1, p.shape[1], *np.shape(subject_image)], align_corners=False)
    warped = F.grid_sample(p, grid, align_corners=False)                                  # (1, K, *S)
    return warped[0].argmax(0).numpy().astype(np.int64)


def tissue_baselines(t1: Sequence[Any], masks: Sequence[Any], atlas_image: Any,
                     atlas_probabilities: Any) -> dict[str, list[np.ndarray]]:
    """CSF, GM and WM of every T1 volume by the three classical baselines of chapter 10.

    ``t1`` holds (X, Y, Z) volumes and ``masks`` their brain masks (the thresholds are given the
    mask; the atlas finds the brain itself). Returns ``{"Otsu (T1)": [...], "k-means (T1)": [...],
    "affine atlas": [...]}``, one label map (1 CSF, 2 GM, 3 WM) per volume, computed in that order.
    """
    if len(t1) != len(masks):
        raise ValueError(f"masks: {len(masks)} masks for {len(t1)} volumes")
    return {"Otsu (T1)": [threshold_segmentation(x, m, method="otsu") for x, m in zip(t1, masks)],
            "k-means (T1)": [threshold_segmentation(x, m, method="kmeans") for x, m in zip(t1, masks)],
            "affine atlas": [atlas_segmentation(atlas_image, atlas_probabilities, x) for x in t1]}


# 3. A classical tissue classifier for real T1 scans: bias correction, Gaussian mixture, MRF -------

def _polynomial_basis(shape: tuple[int, ...], order: int) -> np.ndarray:
    """(N, P) monomials x^i y^j z^k, i + j + k <= order, of voxel coordinates scaled to [-1, 1]."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    powers = [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]
    return np.stack([(grid[0] ** i * grid[1] ** j * grid[2] ** k).ravel() for i, j, k in powers], 1)


def _fit_mixture(values: np.ndarray, n_classes: int, iterations: int = 100, start: Any = None):
    """A 1D Gaussian mixture by EM, components sorted darkest first: (means, stds, weights).

    The fit runs on a histogram of the values (512 bins, each weighted by its count): in one
    dimension that loses nothing that matters and makes every EM step cost the same for a small
    volume as for a large one. Started from ``start`` (a previous fit) if given, else from four
    k-means runs (Lloyd's algorithm from spread-out quantiles), each refined by EM; the fit of
    highest likelihood wins. Several starts matter: a histogram with one broad peak has more than
    one local optimum.
    """
    counts, edges = np.histogram(values, bins=512)
    keep = counts > 0
    v, w = ((edges[:-1] + edges[1:]) / 2)[keep], counts[keep].astype(np.float64)
    floor = max(edges[1] - edges[0], 1e-12)                             # no narrower than a bin
    if start is not None:
        return _em(v, w, *start, iterations, floor)[:3]
    cdf = np.cumsum(w) / w.sum()
    best = None
    for qs in ((1 / 6, 1 / 2, 5 / 6), (0.05, 0.5, 0.95), (0.02, 0.3, 0.9), (0.1, 0.7, 0.95)):
        centres = v[np.searchsorted(cdf, np.interp(np.linspace(0, 1, n_classes), np.linspace(0, 1, len(qs)), qs))
                    .clip(0, len(v) - 1)]
        for _ in range(50):
            nearest = np.abs(v[:, None] - centres[None]).argmin(1)
            moved = np.array([np.average(v[nearest == k], weights=w[nearest == k]) if (nearest == k).any() else centres[k]
                              for k in range(n_classes)])
            if np.allclose(moved, centres):
                break
            centres = moved
        stds = np.array([max(np.sqrt(np.average((v[nearest == k] - centres[k]) ** 2, weights=w[nearest == k]))
                             if (nearest == k).any() else v.std(), floor) for k in range(n_classes)])
        weights = np.array([max(w[nearest == k].sum() / w.sum(), 1e-3) for k in range(n_classes)])
        *fit, score = _em(v, w, centres, stds, weights, iterations, floor)
        if best is None or score > best[0]:
            best = (score, fit)
    return tuple(best[1])


def _em(v: np.ndarray, w: np.ndarray, means: np.ndarray, stds: np.ndarray, weights: np.ndarray, iterations: int,
        floor: float):
    """EM on values ``v`` with counts ``w`` until the means stop moving: (means, stds, weights,
    log-likelihood), sorted darkest first."""
    for _ in range(iterations):
        ll = _log_likelihoods(v, means, stds, weights)
        post = np.exp(ll - ll.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        post *= w[:, None]
        n_k = post.sum(0) + 1e-9
        previous, means = means, (post * v[:, None]).sum(0) / n_k
        stds = np.maximum(np.sqrt((post * (v[:, None] - means) ** 2).sum(0) / n_k), floor)
        weights = n_k / n_k.sum()
        if np.abs(means - previous).max() < 1e-4 * floor:
            break
    ll = _log_likelihoods(v, means, stds, weights)
    top = ll.max(1)
    score = float((w * (top + np.log(np.exp(ll - top[:, None]).sum(1)))).sum())
    order = np.argsort(means)
    return means[order], stds[order], weights[order], score


def _log_likelihoods(values: np.ndarray, means: np.ndarray, stds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, K) log of weight_k * N(value | mean_k, std_k)."""
    z = (values[:, None] - means[None]) / stds[None]
    return np.log(weights)[None] - np.log(stds)[None] - 0.5 * z ** 2


def correct_bias(image: Any, mask: Any, order: int = 1, iterations: int = 4, n_classes: int = 3,
                 seed: int = 0) -> np.ndarray:
    """Divide a smooth multiplicative bias field out of ``image`` inside ``mask``.

    In log intensities the bias is an additive smooth field ``b``, modelled as a polynomial of
    degree ``order`` in the voxel coordinates, as parametric bias correction does (Styner et al.
    2000). The default, a linear field, is stable on a scan whose field of view is a small box:
    a polynomial of higher degree can bend to follow anatomy there (white matter in the middle,
    grey matter at the edges) and the fit then depends on where it starts. Each iteration fits a Gaussian mixture to the corrected
    log intensities, takes each voxel's residual from the mean of its tissue (weighted by the
    posterior), and fits the polynomial to the residuals by least squares: a polynomial this
    smooth cannot draw anatomy, so what it explains is called bias. Returns the corrected image
    (outside the mask unchanged), scaled so that the mean log intensity inside the mask is kept.
    """
    x, m = as_volume(image, "image"), np.asarray(mask, dtype=bool)
    if m.shape != x.shape or not m.any():
        raise ValueError(f"mask: expected a non-empty boolean map of shape {x.shape}, got {m.shape}")
    if (x[m] <= 0).mean() > 0.5:
        raise ValueError("image: most voxels inside the mask are <= 0; a T1 magnitude image is positive there")
    if order < 0 or iterations < 0:
        raise ValueError(f"order and iterations: expected >= 0, got {order}, {iterations}")
    log_x = np.log(np.maximum(x, max(np.quantile(x[m], 0.01), 1e-6)))
    basis = _polynomial_basis(x.shape, order)[m.ravel()]                # (N, P) inside the mask
    rows = np.random.default_rng(seed).choice(len(basis), size=min(len(basis), 100_000), replace=False)
    bias, fit = np.zeros(int(m.sum())), None
    for _ in range(iterations):
        v = np.exp(log_x[m] - bias)                                     # the mixture lives on intensities
        fit = means, stds, weights = _fit_mixture(v, n_classes, start=fit)
        ll = _log_likelihoods(v, means, stds, weights)
        post = np.exp(ll - ll.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        log_means = (post * (log_x[m] - bias)[:, None]).sum(0) / (post.sum(0) + 1e-9)
        residual = log_x[m] - post @ log_means                          # what the tissue means do not explain
        coef, *_ = np.linalg.lstsq(basis[rows], residual[rows], rcond=None)
        bias = basis @ coef
        bias -= bias.mean()
    out = x.copy()
    out[m] = np.exp(log_x[m] - bias)
    return out


def classical_tissue_classifier(image: Any, mask: Any, beta: float = 0.4, icm_iterations: int = 5,
                                bias_order: int = 1, seed: int = 0) -> np.ndarray:
    """CSF, GM and WM of a T1 scan inside a brain mask, the classical way; labels 1 CSF, 2 GM, 3 WM.

    1. intensities clipped to their 0.5th-99.5th percentiles inside the mask (a handful of very
       bright voxels, vessels or fat, would otherwise take a class of their own), then
       :func:`correct_bias` removes a smooth gain;
    2. a three-class Gaussian mixture of the corrected intensities, darkest class CSF (T1 orders
       the tissues CSF < GM < WM);
    3. a Potts Markov random field: each voxel takes the class that minimises
       ``-log(w_k N(x | mu_k, s_k)) + beta * (number of its 6 neighbours of another class)``,
       updated for every voxel at once, ``icm_iterations`` times (iterated conditional modes).
       ``beta = 0`` is the mixture alone.

    Nothing is learned from labels; it is the kind of answer FAST or SPM gives, much simplified.
    """
    x, m = as_volume(image, "image"), np.asarray(mask, dtype=bool)
    if m.shape != x.shape or not m.any():
        raise ValueError(f"mask: expected a non-empty boolean map of shape {x.shape}, got {m.shape}")
    if beta < 0 or icm_iterations < 0:
        raise ValueError(f"beta and icm_iterations: expected >= 0, got {beta}, {icm_iterations}")
    lo, hi = np.quantile(x[m], [0.005, 0.995])
    x = np.clip(x, lo, hi)                          # a few very bright voxels (vessels, fat) must not get a class
    corrected = correct_bias(x, m, order=bias_order, seed=seed)
    v = corrected[m]
    means, stds, weights = _fit_mixture(v, 3)
    unary = -_log_likelihoods(v, means, stds, weights)                 # (N, 3)
    classes = unary.argmin(1)
    kernel = ndimage.generate_binary_structure(3, 1).astype(np.float64)
    kernel[1, 1, 1] = 0.0                                               # the 6 face neighbours
    labels = np.zeros(x.shape, dtype=np.int64)
    for _ in range(icm_iterations if beta > 0 else 0):
        labels[m] = classes + 1
        same = np.stack([ndimage.convolve((labels == k + 1).astype(np.float64), kernel, mode="constant")[m]
                         for k in range(3)], 1)                          # neighbours of each class
        total = same.sum(1, keepdims=True)
        classes = (unary + beta * (total - same)).argmin(1)
    labels[m] = classes + 1
    return labels


# 4. The heart: k-means on intensity, components, a ring of muscle ---------------------------------

def heart_intensity_segmentation(image: Any, spacing: Any, wall_mm: float = 9.0, seed: int = 0) -> np.ndarray:
    """A classical short-axis segmentation: 1 RV, 2 MYO, 3 LV from intensities and simple geometry.

    1. k-means (k = 3) on the intensities of the central region, where the heart is: the brightest
       class is blood, the darkest is mostly myocardium (air and lung are darker still);
    2. blood pools: bright voxels, opened in-plane to cut thin bridges (partial volumes across the
       septum), split into 3D components; the two largest that reach the central region are the
       ventricles. In this book's phantoms (and on a standard short-axis view) the RV lies towards
       -x of the LV, so the pool with the larger mean x is the LV;
    3. the myocardium is every voxel within ``wall_mm`` of the LV pool that is neither blood nor
       air / lung (below half the darkest class).
    """
    from sklearn.cluster import KMeans

    x = as_volume(image, "image")
    sp = np.asarray(spacing, dtype=float).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.size != 3 or (sp <= 0).any():
        raise ValueError(f"spacing: expected three positive voxel sizes (mm), got {spacing!r}")
    # 1. intensity classes, fitted in the central half of the field of view where the heart is
    centre = tuple(slice(s // 4, s - s // 4) for s in x.shape)
    rng = np.random.default_rng(seed)
    sample = rng.choice(x[centre].ravel(), size=min(20000, x[centre].size), replace=False)
    km = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(sample[:, None])
    centres = np.sort(km.cluster_centers_[:, 0])
    bright = x > 0.5 * (centres[1] + centres[2])                 # above the mid-point of the top two
    air = x < 0.5 * centres[0]
    # 2. blood pools: erode in-plane (slices are thick) until thin bridges across the septum break,
    #    keep the two largest pieces that reach the centre, then grow them back over the bright voxels
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    cores = ndimage.binary_erosion(bright, in_plane, iterations=2)
    pieces, n = ndimage.label(cores)
    out = np.zeros(x.shape, dtype=np.int64)
    if n == 0:
        return out
    sizes = ndimage.sum(cores, pieces, range(1, n + 1))
    central = set(np.unique(pieces[centre]).tolist()) - {0}
    ranked = [k + 1 for k in np.argsort(sizes)[::-1] if k + 1 in central][:2]
    if not ranked:
        return out
    markers = np.where(np.isin(pieces, ranked), pieces, 0)
    dist, (i, j, k) = ndimage.distance_transform_edt(markers == 0, return_indices=True)
    grown = np.where(bright & (dist <= 3), markers[i, j, k], 0)         # nearest core, 3 voxels at most
    pools = [grown == k for k in ranked]
    if len(pools) == 2:
        mean_x = [np.argwhere(p)[:, 0].mean() for p in pools]
        lv, rv = (pools[0], pools[1]) if mean_x[0] > mean_x[1] else (pools[1], pools[0])
        out[rv] = 1
    else:
        lv = pools[0]
    out[lv] = 3
    # 3. myocardium: not blood, not air, within wall_mm of the LV pool (distances in mm: thick slices)
    dist_mm = ndimage.distance_transform_edt(~lv, sampling=sp)
    ring = (dist_mm > 0) & (dist_mm <= wall_mm) & (out == 0) & ~bright & ~air
    out[ring] = 2
    return out
