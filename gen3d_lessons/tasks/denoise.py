"""Denoising low-dose volumes, and how chapter 11 weighs denoisers against the classical filters.

A trained denoiser is used through :func:`~gen3d_lessons.models.denoising.denoise` (one volume in,
one volume out, with checks of what it is given). Around it, this module holds the evaluation:

- :func:`volume_arrays`: the (low dose, full dose, brain mask) arrays of dataset items;
- :func:`data_facts`: what a set of pairs contains before any method runs (noise levels, the
  input's PSNR, and the PSNR that the blur alone leaves);
- :func:`denoisers`: every method of the comparison as a function volume → volume: the input
  itself, the two filters, and each network in one pass and as a flip ensemble;
- :func:`score_table`: the mean scores of every method (PSNR, SSIM, RMSE inside the brain, RMSE
  at edges and on flat tissue, sharpness), one row per method;
- :func:`ahead_of`: on which scores one group of methods beats another;
- :func:`added_detail_table`: what one method adds to another, and whether it is really there;
- :func:`steepest_edge`: where to draw a profile across an edge, for a figure.

Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1].
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from torch import nn

from ..baselines.denoising import estimate_noise_sigma, gaussian_denoise, nlm_denoise
from ..metrics.checks import as_volume
from ..metrics.image import added_detail, detail_scores, mean_scores, scores
from ..models.denoising import denoise

# The columns of score_table(); the first five are errors or agreements, "sharpness" is neither.
SCORE_COLUMNS = ("PSNR (dB)", "SSIM", "RMSE", "RMSE at edges", "RMSE on flat tissue", "sharpness")
HIGHER_IS_BETTER = ("PSNR (dB)", "SSIM")
LOWER_IS_BETTER = ("RMSE", "RMSE at edges", "RMSE on flat tissue")


# 1. The data ----------------------------------------------------------------------------------

def volume_arrays(items: Iterable[Mapping[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The low-dose volumes, full-dose volumes and brain masks of dataset items, as three lists of
    (D, H, W) arrays. Each item holds ``lowdose``, ``image`` and ``label`` tensors (1, D, H, W), as
    ``VolumeDataset(..., keys=("lowdose", "image", "label"), channels="T1")`` gives them; the mask
    is every labelled voxel."""
    items = list(items)
    if not items:
        raise ValueError("items: expected at least one dataset item")
    missing = [k for k in ("lowdose", "image", "label") if k not in items[0]]
    if missing:
        raise ValueError(f"items: have no {missing} (they have {sorted(items[0])}); "
                         'read them with keys=("lowdose", "image", "label")')
    return ([it["lowdose"][0].numpy() for it in items], [it["image"][0].numpy() for it in items],
            [it["label"][0].numpy() > 0 for it in items])


def data_facts(lowdose: Sequence[Any], full: Sequence[Any], masks: Sequence[Any], blur: float = 1.0) -> pd.DataFrame:
    """One row per subject: the noise level of each volume (estimated from the volume alone by
    :func:`~gen3d_lessons.baselines.denoising.estimate_noise_sigma`), the PSNR of the low-dose
    input, and the PSNR of the full-dose volume blurred by a Gaussian of ``blur`` voxels, with no
    noise added: the damage of the blur alone, which averaging cannot repair."""
    if not (len(lowdose) == len(full) == len(masks)) or len(full) == 0:
        raise ValueError(f"lowdose, full, masks: expected equal non-zero lengths, got "
                         f"{len(lowdose)}, {len(full)}, {len(masks)}")
    return pd.DataFrame({
        "noise σ, full dose": [estimate_noise_sigma(y) for y in full],
        "noise σ, low dose": [estimate_noise_sigma(x) for x in lowdose],
        "PSNR low dose (dB)": [scores(x, y, m)["psnr"] for x, y, m in zip(lowdose, full, masks)],
        "PSNR of the blur alone (dB)": [scores(ndimage.gaussian_filter(y, blur), y, m)["psnr"]
                                        for y, m in zip(full, masks)]})


# 2. The methods and their scores ----------------------------------------------------------------

def _identity(x: Any) -> Any:
    return x


def denoisers(nets: Mapping[str, nn.Module], gaussian: Mapping[str, Any],
              nlm: Mapping[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """Every method of the comparison, as ``{name: function(volume) -> volume}``, in table order:
    ``"low dose"`` (the input itself), ``"Gaussian"`` and ``"non-local means"`` with the parameters
    chosen on validation subjects, then for each of ``nets`` (``{name: RED3D}``) ``"<name>, one
    pass"`` and ``"<name>"``, its flip ensemble (the mean over the eight mirror images, eight passes)."""
    if not isinstance(nets, Mapping) or not nets:
        raise ValueError("nets: expected a non-empty dict {name: trained denoiser}")
    methods = {"low dose": _identity, "Gaussian": partial(gaussian_denoise, **gaussian),
               "non-local means": partial(nlm_denoise, **nlm)}
    for name, net in nets.items():
        methods[f"{name}, one pass"] = partial(denoise, net)
        methods[name] = partial(denoise, net, flips=True)
    return methods


def score_table(outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any], masks: Sequence[Any]) -> pd.DataFrame:
    """The mean over subjects of every method's scores, one row per method of ``outputs``
    (``{name: [volume per subject]}``), columns :data:`SCORE_COLUMNS`: PSNR, SSIM and RMSE inside
    the brain (:func:`~gen3d_lessons.metrics.image.mean_scores`), then where the error is and
    how sharp the result is (:func:`~gen3d_lessons.metrics.image.detail_scores`)."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError("outputs: expected a non-empty dict {method: [volume per subject]}")
    table = pd.DataFrame({name: {**mean_scores(p, targets, masks),
                                 **pd.DataFrame([detail_scores(q, y, m) for q, y, m in zip(p, targets, masks)]).mean()}
                          for name, p in outputs.items()}).T
    table.columns = list(SCORE_COLUMNS)
    return table


def ahead_of(table: pd.DataFrame, better: Sequence[str], worse: Sequence[str],
             columns: Sequence[str] = HIGHER_IS_BETTER + LOWER_IS_BETTER) -> dict[str, bool]:
    """For each score of ``columns``: is every method of ``better`` ahead of every method of
    ``worse``? (Its worst value beats their best: higher for PSNR and SSIM, lower for an RMSE.)"""
    rows = [*better, *worse]
    unknown = [r for r in rows if r not in table.index]
    if unknown or not better or not worse:
        raise ValueError(f"better, worse: expected non-empty lists of the table's methods "
                         f"({', '.join(map(str, table.index))}), got {list(better)} and {list(worse)}")
    out = {}
    for col in columns:
        if col in HIGHER_IS_BETTER:
            out[col] = bool(table.loc[list(better), col].min() > table.loc[list(worse), col].max())
        elif col in LOWER_IS_BETTER:
            out[col] = bool(table.loc[list(better), col].max() < table.loc[list(worse), col].min())
        else:
            raise ValueError(f"columns: {col!r} is not a score with a better direction; "
                             f"expected some of {HIGHER_IS_BETTER + LOWER_IS_BETTER}")
    return out


# 3. Sharpening or invention? -------------------------------------------------------------------

ADDED_COLUMNS = ("added RMS at edges", "correlation with the missing detail at edges",
                 "added RMS on flat tissue", "correlation with the missing detail on flat tissue")


def added_detail_table(preds: Sequence[Any], bases: Sequence[Any], targets: Sequence[Any], masks: Sequence[Any],
                       name: str = "mean over subjects") -> pd.DataFrame:
    """One row, ``name``: the mean over subjects of :func:`~gen3d_lessons.metrics.image.added_detail`,
    what each of ``preds`` adds to the matching ``bases`` (e.g. adversarial minus MSE-only output)
    and how it correlates with what the base missed, at the edges and on flat tissue
    (columns :data:`ADDED_COLUMNS`)."""
    if not (len(preds) == len(bases) == len(targets) == len(masks)) or len(preds) == 0:
        raise ValueError(f"preds, bases, targets, masks: expected equal non-zero lengths, got "
                         f"{len(preds)}, {len(bases)}, {len(targets)}, {len(masks)}")
    rows = pd.DataFrame([added_detail(p, b, y, m) for p, b, y, m in zip(preds, bases, targets, masks)])
    table = rows.mean().to_frame(name).T
    table.columns = list(ADDED_COLUMNS)
    return table


class Edge(NamedTuple):
    """A line across an edge of an axial slice: its ``center`` voxel (i, j, k), its ``start`` and
    ``end`` points (voxel coordinates, for :func:`~gen3d_lessons.metrics.image.line_profile`), and
    a ``box`` of slices that zooms on it (the whole volume along the slice axis)."""

    center: tuple[int, int, int]
    start: np.ndarray
    end: np.ndarray
    box: tuple[slice, slice, slice]


def steepest_edge(volume: Any, mask: Any, index: int, reach: float = 6.0, smooth: float = 1.0, erode: int = 3,
                  margin: int = 7) -> Edge:
    """The steepest edge of axial slice ``index`` inside ``mask`` (away from its rim): the voxel
    where the in-plane gradient of ``volume``, smoothed by a Gaussian of ``smooth`` voxels so that
    noise does not count, is largest, inside the mask eroded ``erode`` times. The line runs
    ``reach`` voxels to either side along that gradient, and the box reaches ``margin`` voxels
    around the centre in the slice's plane."""
    volume = as_volume(volume, "volume")
    mask = np.asarray(mask) != 0
    if mask.shape != volume.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match the volume's {volume.shape}")
    if not 0 <= index < volume.shape[2]:
        raise ValueError(f"index: expected an axial slice in 0..{volume.shape[2] - 1}, got {index!r}")
    g = np.stack(np.gradient(ndimage.gaussian_filter(volume, smooth)))[:2, :, :, index]   # in-plane gradient, (2, D, H)
    deep = ndimage.binary_erosion(mask, iterations=erode)[:, :, index]                  # inside, not the rim
    if not deep.any():
        raise ValueError(f"mask: nothing of slice {index} is left after {erode} erosions; choose another slice")
    i, j = np.unravel_index((np.linalg.norm(g, axis=0) * deep).argmax(), g.shape[1:])
    direction = np.r_[g[:, i, j] / np.linalg.norm(g[:, i, j]), 0]                       # across the edge
    center = np.array([i, j, index])
    box = (slice(max(i - margin, 0), i + margin + 1), slice(max(j - margin, 0), j + margin + 1), slice(None))
    return Edge((int(i), int(j), int(index)), center - reach * direction, center + reach * direction, box)
