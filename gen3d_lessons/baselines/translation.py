"""Classical baselines of cross-modality synthesis (chapter 9): nothing here is a neural network.

- :class:`TissueRemap`: classify the source (T1) voxels into CSF, GM and WM with the classical
  tissue classifier, then give each tissue the target contrast's mean, and its spread around the
  mean along the line that best fits the training subjects' voxels of that tissue,
  ``y = mu_t(k) + b(k) · (x − mu_s(k))`` with ``b(k) = cov(x, y) / var(x)`` within tissue ``k``
  (negative where the contrast is inverted, as from T1 to T2): what a radiologist means by "T2 is
  T1 with the tissues' brightness swapped";
- :class:`VoxelRegression`: a gradient-boosted regression from each voxel's source intensity, and
  its Gaussian-smoothed neighbourhood at two scales, to the target intensities.

Both are fitted on training subjects (``fit(sources, targets, masks)``) and called on one subject
(``model(source, mask)``). Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1];
targets are ``(T, D, H, W)``, one channel per target contrast, or ``(D, H, W)`` for one.
Outside the mask both return the training targets' mean background.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..metrics.checks import as_volume
from .segmentation import classical_tissue_classifier

__all__ = ["TissueRemap", "VoxelRegression"]

TISSUES = {1: "CSF", 2: "GM", 3: "WM"}


def _checked_set(sources: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any]
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The training set as lists of (D, H, W) sources, (T, D, H, W) targets and boolean masks."""
    if not (len(sources) == len(targets) == len(masks)) or not len(sources):
        raise ValueError(f"sources, targets, masks: expected equal non-zero lengths, got "
                         f"{len(sources)}, {len(targets)}, {len(masks)}")
    xs = [as_volume(x, f"sources[{i}]") for i, x in enumerate(sources)]
    ys = [np.asarray(y, dtype=np.float64) for y in targets]
    ys = [y[None] if y.ndim == 3 else y for y in ys]
    ms = [np.asarray(m, dtype=bool) for m in masks]
    for i, (x, y, m) in enumerate(zip(xs, ys, ms)):
        if y.ndim != 4 or y.shape[1:] != x.shape or m.shape != x.shape:
            raise ValueError(f"subject {i}: expected target (T, *S) and mask (*S) on the source grid {x.shape}, "
                             f"got {y.shape} and {m.shape}")
        if not np.isfinite(y).all():
            raise ValueError(f"targets[{i}]: contains NaN or infinite values")
        if not m.any():
            raise ValueError(f"masks[{i}]: is empty")
    if len({y.shape[0] for y in ys}) != 1:
        raise ValueError(f"targets: expected one number of target contrasts, got {sorted({y.shape[0] for y in ys})}")
    return xs, ys, ms


class _Fitted:
    """What both baselines share: the background value, and the check of one subject."""

    background: np.ndarray | None = None

    def _fit_background(self, ys: list[np.ndarray], ms: list[np.ndarray]) -> None:
        self.background = np.mean([y[:, ~m].mean(1) for y, m in zip(ys, ms)], 0)   # (T,)

    def _subject(self, source: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.background is None:
            raise ValueError(f"{type(self).__name__}: call fit(sources, targets, masks) first")
        x, m = as_volume(source, "source"), np.asarray(mask, dtype=bool)
        if m.shape != x.shape or not m.any():
            raise ValueError(f"mask: expected a non-empty mask of the source's shape {x.shape}, got {m.shape}")
        out = np.broadcast_to(self.background[:, None, None, None], (len(self.background), *x.shape)).copy()
        return x, m, out


class TissueRemap(_Fitted):
    """Tissue-wise intensity remapping (see the module's docstring). ``table`` holds, after
    :meth:`fit`, each tissue's mean in the source and in every target, and the slope of each."""

    def __init__(self, seed: int = 0):
        self.seed, self.stats, self.table = seed, None, None

    def fit(self, sources: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any]) -> "TissueRemap":
        import pandas as pd

        xs, ys, ms = _checked_set(sources, targets, masks)
        labels = [classical_tissue_classifier(x, m, seed=self.seed) for x, m in zip(xs, ms)]
        stats = {}
        for k in TISSUES:
            src = np.concatenate([x[lab == k] for x, lab in zip(xs, labels)])
            tgt = np.concatenate([y[:, lab == k] for y, lab in zip(ys, labels)], 1)    # (T, n)
            mu_s, mu_t = src.mean(), tgt.mean(1)
            slope = ((tgt - mu_t[:, None]) * (src - mu_s)).mean(1) / max(src.var(), 1e-12)   # (T,)
            stats[k] = (mu_s, mu_t, slope)
        self.stats = stats
        self._fit_background(ys, ms)
        self.table = pd.DataFrame({TISSUES[k]: {"source mean": s[0], **{f"target {t} mean": s[1][t] for t in range(len(s[1]))},
                                                **{f"target {t} slope": s[2][t] for t in range(len(s[2]))}}
                                   for k, s in stats.items()}).T
        return self

    def __call__(self, source: Any, mask: Any) -> np.ndarray:
        """``(T, D, H, W)`` targets of one subject from its source volume and brain mask."""
        x, m, out = self._subject(source, mask)
        labels = classical_tissue_classifier(x, m, seed=self.seed)
        for k, (mu_s, mu_t, slope) in self.stats.items():
            sel = labels == k
            out[:, sel] = mu_t[:, None] + slope[:, None] * (x[sel] - mu_s)[None]
        return out.astype(np.float32)


class VoxelRegression(_Fitted):
    """Gradient-boosted trees from ``(x, G_1 * x, G_2 * x)`` at each voxel (the intensity and its
    Gaussian-smoothed neighbourhood at ``scales`` voxels) to each target intensity, fitted on the
    voxels inside the training masks."""

    def __init__(self, scales: tuple[float, ...] = (1.0, 2.0), max_iter: int = 100, seed: int = 0):
        self.scales, self.max_iter, self.seed, self.models = tuple(scales), max_iter, seed, None

    def _features(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        return np.stack([x[m]] + [ndimage.gaussian_filter(x, s)[m] for s in self.scales], 1)   # (n, 1 + scales)

    def fit(self, sources: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any]) -> "VoxelRegression":
        from sklearn.ensemble import HistGradientBoostingRegressor

        xs, ys, ms = _checked_set(sources, targets, masks)
        features = np.concatenate([self._features(x, m) for x, m in zip(xs, ms)])
        values = np.concatenate([y[:, m] for y, m in zip(ys, ms)], 1)                 # (T, n)
        self.models = [HistGradientBoostingRegressor(max_iter=self.max_iter, random_state=self.seed).fit(features, v)
                       for v in values]
        self._fit_background(ys, ms)
        return self

    def __call__(self, source: Any, mask: Any) -> np.ndarray:
        """``(T, D, H, W)`` targets of one subject from its source volume and brain mask."""
        x, m, out = self._subject(source, mask)
        features = self._features(x, m)
        for t, model in enumerate(self.models):
            out[t, m] = model.predict(features)
        return out.astype(np.float32)
