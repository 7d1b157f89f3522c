"""Efficient 3D U-Nets compared on one task (chapter 15, the survey's §4.3).

:func:`architecture_row` trains one U-Net built of one kind of block
(:mod:`gen3d_lessons.models.efficient`) with chapter 10's recipe and measures what it costs at
several crop sizes (:func:`~gen3d_lessons.training.benchmark.network_costs`); :func:`extrapolate`
carries the measured costs to a larger grid, and :func:`pick` names the architecture a reader
should choose under a given constraint.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.batches import CropBatches, random_flip
from ..models.efficient import CONVS
from ..models.unet import UNet3D, UNetConfig
from ..training.benchmark import network_costs
from ..training.segmentation import train_segmenter
from .fewshot import TISSUES, tissue_dice
from .segment import predict_labels

NAMES = {"full": "full 3D", "2+1d": "(2+1)D separable", "depthwise": "depthwise separable", "shuffle": "split & shuffle",
         "2.5d": "2.5D (5 slices)"}


def architecture_row(kind: str, cfg: UNetConfig, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, *, loss_fn: Any, steps: int, lr: float, crop: int, batch: int,
                     sizes: Sequence[int] = (32, 64), cost_batch: int = 2, cost_steps: int = 3, seed: int = 0,
                     device: Any = None, budget_s: float | None = None) -> tuple[dict[str, Any], UNet3D]:
    """Train a U-Net of ``kind`` blocks (``cfg`` with ``conv=kind``) and measure it: ``(row, model)``.

    The network starts from ``seed`` and trains ``steps`` steps on random ``crop``³ crops of
    ``images``/``labels`` (chapter 10's recipe: :func:`~gen3d_lessons.training.segmentation.train_segmenter`
    with ``loss_fn`` and ``lr``); it then labels ``test_images``. The row holds ``params``,
    ``GMACs`` (one forward pass of a ``sizes[-1]``³ volume), ``memory_MB`` and ``s_per_step`` at
    every size of ``sizes`` (Adam steps on a batch of ``cost_batch``; see ``network_costs``), the
    training seconds, the seconds to label every test volume, and the mean tissue Dice with each
    tissue's (:func:`~gen3d_lessons.tasks.fewshot.tissue_dice`).
    """
    if kind not in CONVS:
        raise ValueError(f"kind: expected one of {CONVS}, got {kind!r}")
    torch.manual_seed(seed)                                   # the same start for every architecture
    model = UNet3D(replace(cfg, conv=kind)).to(device, memory_format=torch.channels_last_3d)
    crops = CropBatches(images, labels, crop=crop, batch_size=batch, seed=seed, transform=random_flip)
    history = train_segmenter(model, crops, loss_fn, lr=lr, max_steps=steps, budget_s=budget_s, desc=NAMES[kind])
    t0 = time.perf_counter()
    pred = predict_labels(model, test_images, device)
    label_s = time.perf_counter() - t0
    per_class = np.nanmean(tissue_dice(pred, test_labels[:, 0], per_class=True), axis=0)
    row: dict[str, Any] = {"architecture": NAMES[kind], "conv": kind}
    for size in sizes:
        costs = network_costs(model, size, in_channels=cfg.in_channels, classes=cfg.out_channels, batch=cost_batch,
                              steps=cost_steps, device=device)
        row |= {"params": costs["params"], "GMACs": costs["GMACs"], f"memory_MB {size}": costs["memory_MB"],
                f"s_per_step {size}": costs["s_per_step"]}
    model.eval()
    return row | {"training s": history.seconds, "labelling s": label_s, "Dice": float(np.nanmean(per_class)),
                  **{f"Dice {t}": float(v) for t, v in zip(TISSUES, per_class)}}, model


def extrapolate(table: Any, small: int, large: int, target: int) -> Any:
    """Seconds per step and memory at ``target``³ from the measurements at ``small``³ and ``large``³.

    Memory: what autograd keeps grows with the voxels, so the part above the weights' share
    (``16 × params`` bytes) is scaled by ``(target / large)³``. Seconds: the growth measured from
    ``small`` to ``large`` is assumed to go on at the same rate per doubling of the edge. Returns a
    copy of ``table`` (a DataFrame from :func:`architecture_row` rows) with the two columns added.
    """
    for col in (f"s_per_step {small}", f"s_per_step {large}", f"memory_MB {large}", "params"):
        if col not in table.columns:
            raise ValueError(f"table: no column {col!r}; measure at sizes {small} and {large} first")
    out = table.copy()
    doublings = np.log2(target / large) / np.log2(large / small)
    out[f"s_per_step {target} (extrapolated)"] = table[f"s_per_step {large}"] * (
        table[f"s_per_step {large}"] / table[f"s_per_step {small}"]) ** doublings
    weights_mb = 16 * table["params"] / 2 ** 20
    out[f"memory_MB {target} (extrapolated)"] = weights_mb + (table[f"memory_MB {large}"] - weights_mb) * (target / large) ** 3
    return out


def pick(table: Any, by: str, reference: str = "full 3D", tolerance: float = 0.01) -> str:
    """The architecture with the smallest ``by`` among those whose Dice is at most ``tolerance``
    below ``reference``'s (``table`` indexed by architecture, with a ``Dice`` column)."""
    if by not in table.columns or reference not in table.index:
        raise ValueError(f"pick: need a column {by!r} and a row {reference!r}")
    good = table[table["Dice"] >= table.loc[reference, "Dice"] - tolerance]
    return str(good[by].idxmin())


def goal_candidates(table: Any, size: int, reference: str = "full 3D", dice: float = 0.01,
                    ratio: float = 0.5) -> Mapping[str, bool]:
    """For each architecture but ``reference``: is it within ``dice`` of the reference's Dice with
    at most ``ratio`` times its parameters and its seconds per step at ``size``³?"""
    ref = table.loc[reference]
    return {name: bool(row["Dice"] >= ref["Dice"] - dice and row["params"] <= ratio * ref["params"]
                       and row[f"s_per_step {size}"] <= ratio * ref[f"s_per_step {size}"])
            for name, row in table.drop(index=reference).iterrows()}
