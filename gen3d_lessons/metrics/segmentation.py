"""Overlap and surface distance of label maps: Dice, HD95, ASSD, and a segmentation's table of them.

- :func:`dice` per label; :func:`hd95` and :func:`assd` per label, in mm;
- :func:`surface_distances`: HD95 and ASSD of two binary masks from one pass of MONAI's boundary
  distances (MONAI handles spacing and surfaces well) — the one implementation behind both;
- :func:`score_segmentation`: one row per named label with Dice, HD95 and ASSD, as chapters 10
  and 13 report them.

``pred`` is what a method produced, ``target`` the reference; both are integer label maps of one
shape, e.g. (D, H, W). A label in neither map gives NaN (nothing to find), a label in only one
map gives an infinite distance.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .checks import as_label_map, as_spacing, same_shape

Labels = Sequence[int] | Mapping[str, int] | None


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


# 1. Overlap ----------------------------------------------------------------------------------

def dice(pred: Any, target: Any, labels: Labels = None) -> dict[Any, float]:
    """Dice overlap per label: ``2 |P ∩ T| / (|P| + |T|)``, 1 is perfect, 0 is no overlap.

    ``pred`` and ``target`` are integer label maps of one shape, e.g. (D, H, W). ``labels`` is
    a list of label values (the result is keyed by value), a dict ``{"LV": 3, ...}`` (keyed by
    name), or None for every non-zero label present in either map.

    A label absent from both maps gives **NaN**, not 1: there was nothing to find, so the
    overlap is undefined (MONAI's ``DiceMetric(ignore_empty=True)`` does the same). Average
    with ``np.nanmean`` to skip such labels.
    """
    pred, target = as_label_map(pred, "pred"), as_label_map(target, "target")
    same_shape(target, pred, "target", "pred")
    out = {}
    for key, value in _labels(labels, pred, target).items():
        p, t = pred == value, target == value
        total = int(p.sum()) + int(t.sum())
        out[key] = math.nan if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


# 2. Surface distances ------------------------------------------------------------------------

def surface_distances(pred: np.ndarray, target: np.ndarray, spacing: Any = None) -> tuple[float, float]:
    """HD95 and ASSD of two binary masks (*S), from one pass of MONAI's surface distances.

    Both come from the distances of each boundary voxel of one mask to the other mask's boundary:
    HD95 is the larger of the two directed 95th percentiles, ASSD the mean over both directions.
    NaN if both masks are empty, infinity if one is. ``spacing``: voxel sizes per axis (voxels
    if None).
    """
    from monai.metrics.utils import get_edge_surface_distance

    p_any, t_any = bool(pred.any()), bool(target.any())
    if not p_any and not t_any:
        return math.nan, math.nan      # nothing to find and nothing found: undefined
    if p_any != t_any:
        return math.inf, math.inf      # one surface is missing: the distance is unbounded
    with warnings.catch_warnings():
        # MONAI warns about a deprecated argument it passes itself
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        _, (d_pt, d_tp), _ = get_edge_surface_distance(torch.as_tensor(pred), torch.as_tensor(target), symmetric=True,
                                                       spacing=None if spacing is None else list(spacing))
    # HD95: the larger of the two directed 95th percentiles; ASSD: the mean over both directions
    hd = max(float(torch.quantile(d.float(), 0.95)) if d.numel() else 0.0 for d in (d_pt, d_tp))
    return hd, float(torch.cat([d_pt, d_tp]).float().mean())


def _surface_metric(pred: Any, target: Any, labels: Labels, spacing: Any, kind: str) -> dict[Any, float]:
    """Shared body of hd95 and assd: :func:`surface_distances` of each chosen label."""
    pred, target = as_label_map(pred, "pred"), as_label_map(target, "target")
    same_shape(target, pred, "target", "pred")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred: expected a 2D or 3D label map such as (D, H, W), got shape {pred.shape}")
    spacing = as_spacing(spacing, pred.ndim)
    out: dict[Any, float] = {}
    for key, value in _labels(labels, pred, target).items():
        hd, mean_distance = surface_distances(pred == value, target == value, spacing)
        out[key] = hd if kind == "hd95" else mean_distance
    return out


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


# 3. The table of a segmentation ----------------------------------------------------------------

def _box(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of everything non-zero in ``masks``, grown by ``margin`` voxels."""
    ijk = np.argwhere(np.logical_or.reduce([m != 0 for m in masks]))
    if len(ijk) == 0:
        return tuple(slice(None) for _ in masks[0].shape)
    return tuple(slice(max(int(lo) - margin, 0), int(hi) + margin + 1) for lo, hi in zip(ijk.min(0), ijk.max(0)))


def score_segmentation(pred: Any, target: Any, labels: dict[str, int], spacing: Any = None) -> list[dict]:
    """Dice, HD95 and ASSD (mm) of each named label: one row ``{"class", "Dice", "HD95", "ASSD"}`` per label.

    ``pred`` and ``target`` are label maps (*S) of one volume; ``spacing`` the voxel size (mm,
    one number or one per axis). Both maps are cut to the box around their non-zero voxels
    first: the distances do not change, and the distance transforms get much cheaper when the
    structure fills a small part of the volume (a heart in a chest).
    """
    pred, target = as_label_map(pred, "pred"), as_label_map(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {pred.shape} does not match target shape {target.shape}")
    spacing = as_spacing(spacing, pred.ndim)
    box = _box(pred, target)
    pred, target = pred[box], target[box]
    overlap = dice(pred, target, labels=labels)
    rows = []
    for name, value in labels.items():
        hd, mean_distance = surface_distances(pred == value, target == value, spacing)
        rows.append({"class": name, "Dice": overlap[name], "HD95": hd, "ASSD": mean_distance})
    return rows
