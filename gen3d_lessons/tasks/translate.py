"""How chapter 9 weighs cross-modality synthesis: image scores, lesions, and a downstream segmenter.

A trained translator is used through :func:`~gen3d_lessons.models.translation.translate`. Around
it, this module holds the evaluation. Every function takes the methods' outputs as
``{method: [(T, D, H, W) per subject]}``, the true targets as ``[(T, D, H, W)]`` and the names of
the ``T`` target contrasts:

- :func:`tissue_means`: what the data hold before any method runs, the mean intensity of every
  label in every contrast;
- :func:`image_table`: PSNR, SSIM and NMSE inside the brain mask, the edge error (mean absolute
  difference of the Sobel gradient magnitudes, what Ea-GAN's edge term minimises) and the
  sharpness (mean gradient magnitude over the true image's), per method and contrast;
- :func:`lesion_table`: how much of a lesion's contrast against the white matter around it each
  method reproduces (a synthesis that erases lesions can still score a high PSNR);
- :func:`segmenter_table`: the mean tissue Dice of one segmenter on each method's synthetic
  images, beside its Dice on the real ones: does the synthetic image do the job of the real one?
- :func:`translation_metrics`: all of these as the flat numbers that ``record`` keeps;
- :func:`load_paired_models`: the pix2pix translator and the T2 segmenter that the first page of
  chapter 9 saves, for the unpaired page to measure CycleGAN against.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from ..losses import sobel_magnitude
from ..metrics.image import detail_scores, nmse, scores
from ..metrics.segmentation import dice

__all__ = ["tissue_means", "edge_error", "image_table", "lesion_table", "segmenter_table", "translation_metrics",
           "load_paired_models"]


def _check(outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any], contrasts: Sequence[str]) -> None:
    if not outputs or not len(targets):
        raise ValueError("outputs, targets: expected at least one method and one subject")
    for name, volumes in outputs.items():
        if len(volumes) != len(targets):
            raise ValueError(f"outputs[{name!r}]: {len(volumes)} subjects for {len(targets)} targets")
        for i, (v, t) in enumerate(zip(volumes, targets)):
            if np.shape(v) != np.shape(t) or np.shape(t)[0] != len(contrasts):
                raise ValueError(f"outputs[{name!r}][{i}]: shape {np.shape(v)}, expected {np.shape(t)} with "
                                 f"{len(contrasts)} contrasts {list(contrasts)} first")


def tissue_means(images: Any, labels: Any, contrasts: Sequence[str], classes: Sequence[str]) -> pd.DataFrame:
    """The mean intensity of every label in every contrast: one row per contrast (channel of
    ``images`` (N, C, D, H, W), named by ``contrasts``), one column per label value ``0 ..
    len(classes) − 1`` of ``labels`` (N, 1, D, H, W), named by ``classes``; NaN for a label absent."""
    x, y = np.asarray(images), np.asarray(labels)[:, 0]
    if x.ndim != 5 or x.shape[1] != len(contrasts) or y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"images {x.shape}, labels {np.shape(labels)}: expected (N, {len(contrasts)}, D, H, W) "
                         "and (N, 1, D, H, W)")
    return pd.DataFrame({name: [float(x[:, c][y == j].mean()) if (y == j).any() else float("nan")
                                for c in range(len(contrasts))] for j, name in enumerate(classes)}, index=list(contrasts))


def edge_error(pred: Any, target: Any, mask: Any) -> float:
    """Mean ``|S(pred) − S(target)|`` inside ``mask``, with ``S`` the Sobel gradient magnitude of
    :func:`~gen3d_lessons.losses.sobel_magnitude`: how far the edges of ``pred`` are from the
    target's (0: the same edges, as strong). Volumes (D, H, W)."""
    pair = torch.as_tensor(np.stack([np.asarray(pred), np.asarray(target)])[:, None], dtype=torch.float32)
    s = sobel_magnitude(pair)[:, 0].numpy()
    m = np.asarray(mask, dtype=bool)
    return float(np.abs(s[0] - s[1])[m].mean())


def image_table(outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any], masks: Sequence[Any],
                contrasts: Sequence[str]) -> pd.DataFrame:
    """One row per method, columns ``(contrast, score)`` with scores ``PSNR (dB)``, ``SSIM``,
    ``NMSE`` (inside the mask, intensities in [0, 1]), ``edge error`` (:func:`edge_error`) and
    ``sharpness``; means over subjects."""
    _check(outputs, targets, contrasts)
    rows = {}
    for name, volumes in outputs.items():
        row = {}
        for c, contrast in enumerate(contrasts):
            per = [scores(v[c], t[c], m) | {"nmse": nmse(v[c], t[c], m), "edges": edge_error(v[c], t[c], m),
                                            "sharpness": detail_scores(v[c], t[c], m)["sharpness"]}
                   for v, t, m in zip(volumes, targets, masks)]
            for key, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("nmse", "NMSE"), ("edges", "edge error"),
                               ("sharpness", "sharpness")):
                row[(contrast, label)] = float(np.mean([p[key] for p in per]))
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def lesion_table(outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any], labels: Sequence[Any],
                 contrasts: Sequence[str], contrast: str = "FLAIR", lesion: int = 4, wm: int = 3,
                 ring: int = 2) -> pd.DataFrame:
    """The lesions' contrast in ``contrast``: mean intensity in the lesion minus the mean in the
    white matter within ``ring`` voxels of it, per method, over the subjects that have lesions.

    One row per method plus ``"real"`` first; columns ``lesion − WM`` and ``share of the real
    contrast`` (1: the lesion stands out as much as in the real image; 0: erased). Where no
    subject has a lesion there is nothing to measure, and every value is NaN.
    """
    _check(outputs, targets, contrasts)
    if contrast not in contrasts:
        raise ValueError(f"contrast: {contrast!r} is not one of {list(contrasts)}")
    c = list(contrasts).index(contrast)
    regions = []
    for y in labels:
        y = np.asarray(y)
        spot = y == lesion
        around = (y == wm) & ndimage.binary_dilation(spot, iterations=ring)
        regions.append((spot, around) if spot.any() and around.any() else None)
    if len(regions) != len(targets):
        raise ValueError(f"labels: {len(regions)} label maps for {len(targets)} subjects")

    def contrast_of(volumes: Sequence[Any]) -> float:
        if all(r is None for r in regions):
            return float("nan")
        return float(np.mean([np.asarray(v)[c][s].mean() - np.asarray(v)[c][a].mean()
                              for v, r in zip(volumes, regions) if r is not None for s, a in [r]]))

    real = contrast_of(targets)
    values = {"real": real} | {name: contrast_of(volumes) for name, volumes in outputs.items()}
    return pd.DataFrame({"lesion − WM": values, "share of the real contrast": {k: v / real for k, v in values.items()}})


def segmenter_table(segment: Any, outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any],
                    labels: Sequence[Any], contrasts: Sequence[str], contrast: str = "T2",
                    classes: Mapping[str, int] | None = None, device: Any = None) -> pd.DataFrame:
    """One segmenter on the real ``contrast`` images and on every method's synthetic ones.

    ``segment`` is a segmentation network (run by
    :func:`~gen3d_lessons.tasks.segment.predict_labels` on ``device``) or any function from a
    batch of volumes (N, 1, D, H, W) to label maps (N, D, H, W); ``labels`` are the true tissue maps and ``classes`` names
    their labels (default CSF 1, GM 2, WM 3). One row per image source (``"real"`` first);
    columns: the Dice of each class and their mean (means over subjects), and ``mean − real``.
    """
    _check(outputs, targets, contrasts)
    if contrast not in contrasts:
        raise ValueError(f"contrast: {contrast!r} is not one of {list(contrasts)}")
    c, classes = list(contrasts).index(contrast), dict(classes or {"CSF": 1, "GM": 2, "WM": 3})
    if isinstance(segment, torch.nn.Module):
        from .segment import predict_labels

        segment = partial(predict_labels, segment, device=device)
    truth = [np.asarray(y) for y in labels]
    if len(truth) != len(targets):
        raise ValueError(f"labels: {len(truth)} label maps for {len(targets)} subjects")

    def row(volumes: Sequence[Any]) -> dict[str, float]:
        batch = torch.as_tensor(np.stack([np.asarray(v)[c] for v in volumes])[:, None], dtype=torch.float32)
        per = [dice(p, t, labels=classes) for p, t in zip(np.asarray(segment(batch)), truth)]
        out = {name: float(np.nanmean([d[name] for d in per])) for name in classes}
        return out | {"mean": float(np.mean(list(out.values())))}

    table = pd.DataFrame.from_dict({"real": row(targets)} | {name: row(v) for name, v in outputs.items()}, orient="index")
    table["mean − real"] = table["mean"] - table.loc["real", "mean"]
    return table


def translation_metrics(images: pd.DataFrame, segmenter: pd.DataFrame, lesions: pd.DataFrame,
                        histories: Mapping[str, Any]) -> dict[str, float]:
    """The numbers chapter 9 keeps beside its checks, flat ``{name: value}`` for ``record``: every
    cell of :func:`image_table`, the segmenter's mean Dice per image source, the lesions' share of
    the real contrast, and the seconds of every training run (a ``History`` per name)."""
    out = {f"{contrast} {score}, {name}": float(v) for (contrast, score), column in images.items()
           for name, v in column.items()}
    out |= {f"T2 segmenter Dice, {name}": float(v) for name, v in segmenter["mean"].items()}
    out |= {f"FLAIR lesion contrast share, {name}": float(v) for name, v in lesions["share of the real contrast"].items()}
    return out | {f"training s, {name}": float(h.seconds) for name, h in histories.items()}


def load_paired_models(folder: str | Path, suffix: str = "", device: Any = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The pix2pix translator and the T2 tissue segmenter that chapter 9's first page
    (``ch09_translation``) saves as ``folder/ch09_pix2pix{suffix}.pt`` and
    ``folder/ch09_t2_segmenter{suffix}.pt``, rebuilt in eval mode. A missing file raises a
    ``FileNotFoundError`` that says which page makes it."""
    from ..models.translation import Translator, TranslatorConfig
    from ..models.unet import UNet3D, UNetConfig
    from ..training import load_model

    builds = {"pix2pix": lambda c: Translator(TranslatorConfig(**c)), "t2_segmenter": lambda c: UNet3D(UNetConfig(**c))}
    models = []
    for name, build in builds.items():
        path = Path(folder) / f"ch09_{name}{suffix}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; chapter 9's first page saves it: run it first "
                                    f"(gen3d run ch09_translation)")
        models.append(load_model(path, build, device))
    return models[0], models[1]
