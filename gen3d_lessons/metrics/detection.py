"""Detection of anomalies, judged voxel by voxel and volume by volume (chapter 12).

An anomaly map gives every voxel a score (higher = more anomalous); a lesion mask says where the
anomalies really are. Maps, lesion masks and brain masks are (N, D, H, W), judged inside the brain:

- :func:`voxel_metrics`: voxel-level AUROC, AUPRC (average precision) and the best Dice any
  threshold reaches (:func:`best_dice`), all brain voxels of all volumes pooled;
- :func:`volume_scores`: one score per volume (the mean of its highest voxel scores), from which
  :func:`evaluate` adds a volume-level AUROC (healthy vs lesioned subjects);
- :func:`lesion_volumes` and :func:`small_lesions`: the lesions as connected pieces, and the masks
  that score a map on the small ones only;
- :func:`detection_table`: every method's numbers in one table, small lesions included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.io import check_volume


def _numpy(a: Any, name: str) -> np.ndarray:
    """A checked NumPy array (tensors moved to the CPU, boolean masks as 0/1)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if hasattr(a, "dtype") and a.dtype == np.bool_:
        a = a.astype(np.uint8)              # masks may be boolean; check_volume wants numbers
    check_volume(a, name)
    return np.asarray(a)


def _pooled(maps: Any, lesions: Any, brains: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 truth of every voxel inside the brain masks, all volumes pooled."""
    a = _numpy(maps, "maps").astype(np.float64)
    y = _numpy(lesions, "lesions")
    m = _numpy(brains, "brains")
    if a.shape != y.shape or a.shape != m.shape:
        raise ValueError(f"maps {a.shape}, lesions {y.shape} and brains {m.shape} must have one shape")
    for arr, name in ((y, "lesions"), (m, "brains")):
        if not np.isin(np.unique(arr), (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (0/1 or bool), found values {np.unique(arr)[:6]}")
    inside = m.astype(bool)
    if not inside.any():
        raise ValueError("brains: the masks select no voxel")
    return a[inside], y[inside].astype(bool)


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The highest Dice of ``scores >= t`` over all thresholds t, and that t.

    Dice = 2 TP / (2 TP + FP + FN) = 2 P R / (P + R): the best point of the precision-recall curve.
    An upper bound on what a threshold chosen without labels can reach.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(truth, scores)
    dice = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if not len(thresholds):
        return 0.0, float("nan")
    i = int(np.argmax(dice[:-1]))
    return float(dice[i]), float(thresholds[i])


def voxel_metrics(maps: Any, lesions: Any, brains: Any) -> dict[str, float]:
    """Voxel-level AUROC, AUPRC (average precision) and best Dice, all brain voxels pooled.

    ``maps``, ``lesions`` (0/1) and ``brains`` (0/1): same shape, e.g. (N, D, H, W).
    The AUPRC of a random map is the lesion fraction, reported as ``lesion_fraction``.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _pooled(maps, lesions, brains)
    if y.all() or not y.any():
        raise ValueError("lesions: need both lesion and healthy voxels inside the brains to score a map")
    dice, threshold = best_dice(s, y)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "best_dice": dice, "best_threshold": threshold, "lesion_fraction": float(y.mean())}


def volume_scores(maps: Any, brains: Any, top: float = 0.002) -> np.ndarray:
    """One number per volume: the mean of its ``top`` fraction of highest in-brain scores, (N,)."""
    a = _numpy(maps, "maps").astype(np.float64)
    m = _numpy(brains, "brains").astype(bool)
    if a.shape != m.shape or a.ndim < 2:
        raise ValueError(f"maps {a.shape} and brains {m.shape}: expected one shape (N, D, H, W)")
    if not 0 < top <= 1:
        raise ValueError(f"top: expected a fraction in (0, 1], got {top}")
    out = []
    for ai, mi in zip(a, m):
        v = np.sort(ai[mi])[::-1]
        if v.size == 0:
            raise ValueError("brains: a volume's mask selects no voxel")
        out.append(v[: max(1, int(round(top * v.size)))].mean())
    return np.asarray(out)


def evaluate(maps: Any, lesions: Any, brains: Any, has_lesion: Sequence[bool] | None = None,
             top: float = 0.002) -> dict[str, float]:
    """The chapter's four numbers for one method: voxel AUROC, AUPRC, best Dice, volume AUROC.

    ``maps``, ``lesions``, ``brains``: (N, D, H, W) over the test volumes (healthy ones included:
    their false positives count). ``has_lesion``: (N,) for the volume-level AUROC (by default
    whether a volume's lesion mask is non-empty).
    """
    from sklearn.metrics import roc_auc_score

    out = voxel_metrics(maps, lesions, brains)
    y = _numpy(lesions, "lesions")
    has = (y.reshape(len(y), -1).any(1) if has_lesion is None else np.asarray(has_lesion, dtype=bool))
    if has.shape != (len(y),):
        raise ValueError(f"has_lesion: expected {len(y)} values, got shape {has.shape}")
    if has.all() or not has.any():
        out["volume_auroc"] = float("nan")         # needs healthy and lesioned volumes
    else:
        out["volume_auroc"] = float(roc_auc_score(has, volume_scores(maps, brains, top)))
    return out


def lesion_fraction(lesions: Any, brains: Any) -> float:
    """The share of brain voxels that are lesion: the voxel AUPRC of a random map."""
    y, m = _numpy(lesions, "lesions"), _numpy(brains, "brains")
    if y.shape != m.shape:
        raise ValueError(f"lesions {y.shape} and brains {m.shape} must have one shape")
    inside = m.astype(bool)
    if not inside.any():
        raise ValueError("brains: the masks select no voxel")
    return float(y[inside].astype(bool).mean())


def lesion_volumes(lesions: Any) -> tuple[torch.Tensor, np.ndarray]:
    """Each voxel's lesion volume in voxels (N, D, H, W) int64, 0 outside lesions, and the volume of
    every lesion (L,). A lesion is a connected component (26-neighbourhood) of one volume's mask."""
    from scipy import ndimage

    y = _numpy(lesions, "lesions")
    if y.ndim != 4 or not np.isin(np.unique(y), (0, 1)).all():
        raise ValueError(f"lesions: expected binary masks (N, D, H, W), got shape {y.shape}")
    per_voxel, volumes = np.zeros(y.shape, dtype=np.int64), []
    for i, mask in enumerate(y.astype(bool)):
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        counts = np.bincount(labels.ravel())
        per_voxel[i], volumes = np.where(mask, counts[labels], 0), volumes + counts[1:].tolist()
    return torch.from_numpy(per_voxel), np.array(volumes)


@dataclass
class SmallLesions:
    """The masks that score a map on the small lesions only (see :func:`small_lesions`)."""

    lesion: torch.Tensor        # (N, D, H, W) bool: voxels of the lesions below ``below``, the positives
    brain: torch.Tensor         # (N, D, H, W) bool: the brain without the larger lesions' voxels
    volumes: np.ndarray         # (L,) the volume of every lesion, in voxels
    below: float                # the volume bound, in voxels (by default the median lesion volume)

    @property
    def count(self) -> int:
        """How many lesions are below the bound."""
        return int((self.volumes < self.below).sum())


def small_lesions(lesions: Any, brains: Any, below: float | None = None) -> SmallLesions:
    """Positives and brain masks for scoring the lesions smaller than ``below`` voxels (default: the median).

    The voxels of the larger lesions are left out (neither positive nor healthy), every healthy
    voxel stays in: a map is judged on whether it finds the small lesions among healthy tissue.
    """
    size_of, volumes = lesion_volumes(lesions)
    if not len(volumes):
        raise ValueError("lesions: the masks hold no lesion")
    below = float(np.median(volumes)) if below is None else float(below)
    brain = torch.from_numpy(_numpy(brains, "brains").astype(bool))         # (N, D, H, W)
    if tuple(brain.shape) != tuple(size_of.shape):
        raise ValueError(f"lesions {tuple(size_of.shape)} and brains {tuple(brain.shape)} must have one shape")
    return SmallLesions(lesion=(size_of > 0) & (size_of < below), brain=brain & (size_of < below),
                        volumes=volumes, below=below)


DETECTION_COLUMNS = ("auroc", "auprc", "best_dice", "volume_auroc")


def detection_table(maps: Mapping[str, Any], lesions: Any, brains: Any, has_lesion: Sequence[bool] | None = None,
                    *, top: float = 0.002, small: SmallLesions | None = None):
    """One row per method (a ``pandas.DataFrame`` indexed by ``method``): :func:`evaluate`'s voxel
    AUROC, AUPRC, best Dice and volume AUROC, and with ``small`` the voxel AUROC and AUPRC on the
    small lesions only (``auroc_small``, ``auprc_small``).

    ``maps``: ``{method: (N, D, H, W) map}`` over the same volumes as ``lesions`` and ``brains``.
    """
    import pandas as pd

    if not isinstance(maps, Mapping) or not maps:
        raise ValueError("maps: expected a non-empty dict {method: (N, D, H, W) map}")
    rows = []
    for name, a in maps.items():
        row = {"method": name, **evaluate(a, lesions, brains, has_lesion, top=top)}
        if small is not None:
            on_small = voxel_metrics(a, small.lesion, small.brain)
            row |= {"auroc_small": on_small["auroc"], "auprc_small": on_small["auprc"]}
        rows.append(row)
    columns = list(DETECTION_COLUMNS) + (["auroc_small", "auprc_small"] if small is not None else [])
    return pd.DataFrame(rows).set_index("method")[columns]
