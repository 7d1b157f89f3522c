"""Segmentation with 1, 2, 5 or 10 labelled brains (chapter 14, the survey's §4.1 and §4.2).

One *draw* fixes a random order of the training brains; with a budget of k labels, the first k
are labelled and every training brain stays available without its labels. For each budget,
:func:`few_label_draw` trains and scores, on the same labelled brains:

* ``"from scratch"``: chapter 10's U-Net and recipe on the labelled brains only;
* ``"pretrained"``: the same, started from a network trained on a pretext task on every
  training brain without labels (:func:`~gen3d_lessons.training.fewshot.train_pretext`);
* ``"semi-supervised GAN"``: Mondal et al.'s few-shot GAN (:mod:`gen3d_lessons.training.fewshot`);
* ``"atlas registration"``: no training; each labelled brain is registered to each test brain
  by chapter 13's optimiser (:func:`multi_atlas_labels`), and the carried labels vote.

Every method is scored by :func:`tissue_dice`: the mean Dice of CSF, GM and WM over the test
brains, with lesions counted as white matter (a lesion lies in it, and the atlas of a brain
without lesions cannot know of one).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import spatial
from ..data.batches import CropBatches, random_flip
from ..metrics.segmentation import dice
from ..models.fewshot import CropGenerator3D, CropGeneratorConfig, WithoutFake, transfer_weights
from ..models.unet import UNet3D, UNetConfig
from ..training.fewshot import train_semisup_gan
from ..training.registration import RegistrationLoss
from ..training.segmentation import train_segmenter
from .register import register_iterative
from .segment import predict_labels, tissue_map

METHODS = ("from scratch", "pretrained", "semi-supervised GAN", "atlas registration")


def label_orders(n_volumes: int, draws: int, seed: int = 0) -> list[list[int]]:
    """One random order of ``n_volumes`` training volumes per draw: with a budget of k labels a
    draw labels the first k of its order, so a larger budget keeps the smaller one's volumes."""
    if n_volumes < 1 or draws < 1:
        raise ValueError(f"label_orders: expected at least one volume and one draw, got {n_volumes} and {draws}")
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_volumes, generator=g).tolist() for _ in range(draws)]


TISSUES = {"CSF": 1, "GM": 2, "WM": 3}


def tissue_dice(pred: Any, target: Any, per_class: bool = False) -> np.ndarray:
    """Mean Dice of CSF, GM and WM (labels 1-3) per volume, lesions (4) counted as WM in both maps.

    ``pred`` and ``target``: label maps (N, *S), the same shape. ``per_class=True`` returns the
    Dice of each tissue instead, (N, 3) in the order of :data:`TISSUES` (NaN: absent from both maps).
    """
    pred, target = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target))
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)}: expected the same shape")
    scores = np.array([list(dice(tissue_map(p).numpy(), tissue_map(t).numpy(), labels=TISSUES).values())
                       for p, t in zip(pred, target)])
    return scores if per_class else np.nanmean(scores, axis=1)


def multi_atlas_labels(atlas_images: torch.Tensor, atlas_labels: torch.Tensor, targets: torch.Tensor,
                       loss_fn: RegistrationLoss | None = None, *, steps: int = 40, grid: int = 8, lr: float = 0.1,
                       pool: int = 2, num_classes: int = 5, device: Any = None) -> torch.Tensor:
    """Labels of ``targets`` (N, C, *S) carried over from labelled ``atlas_images`` (A, C, *S).

    Each atlas's first channel (T1) is registered to every target's by chapter 13's optimiser
    (:func:`~gen3d_lessons.tasks.register.register_iterative`: a velocity on a ``grid``³ control
    grid, ``steps`` Adam steps on ``loss_fn``, by default local NCC), on images averaged over
    ``pool``³ voxels for speed; the field is brought back to the full grid, every atlas's one-hot
    ``atlas_labels`` (A, 1, *S) are warped with it, and the class with the largest summed
    probability wins (majority voting; one atlas: its labels). The optimiser runs on ``device``.
    Returns (N, *S) int64, on the CPU.
    """
    if atlas_images.ndim != 5 or targets.ndim != 5 or atlas_images.shape[1:] != targets.shape[1:]:
        raise ValueError(f"multi_atlas_labels: expected atlases (A, C, *S) and targets (N, C, *S) on one grid, got "
                         f"{tuple(atlas_images.shape)} and {tuple(targets.shape)}")
    if atlas_labels.shape != (len(atlas_images), 1, *atlas_images.shape[2:]):
        raise ValueError(f"atlas_labels: expected shape {(len(atlas_images), 1, *atlas_images.shape[2:])}, "
                         f"got {tuple(atlas_labels.shape)}")
    loss_fn = loss_fn or RegistrationLoss("ncc", smoothness=0.01, ncc_window=7)
    shape, small = targets.shape[2:], lambda x: F.avg_pool3d(x[:, :1], pool) if pool > 1 else x[:, :1]  # noqa: E731
    fixed, votes = small(targets.to(device)), torch.zeros(len(targets), num_classes, *shape, device=device)
    for image, labels in zip(atlas_images.to(device), atlas_labels.to(device)):
        moving = small(image[None]).expand(len(targets), -1, -1, -1, -1)
        u = register_iterative(moving, fixed, loss_fn, steps=steps, grid=grid, lr=lr)
        one_hot = F.one_hot(labels[0].long(), num_classes).movedim(-1, 0).float()[None]
        votes += spatial.warp(one_hot.expand(len(targets), -1, -1, -1, -1), spatial.resize_displacement(u, shape))
    return votes.argmax(1).cpu()


def brain_mask(images: torch.Tensor) -> torch.Tensor:
    """Where the brain is, from the images alone: (N, 1, *S) int64, 1 where any channel is non-zero.

    Serves :class:`~gen3d_lessons.data.batches.CropBatches` as a "label" to centre crops of
    unlabelled volumes on the brain; no label is read."""
    if images.ndim != 5:
        raise ValueError(f"images: expected (N, C, D, H, W), got shape {tuple(images.shape)}")
    return (images.abs().sum(1, keepdim=True) > 0).long()


def _segmenter(cfg: UNetConfig, seed: int, device: Any) -> UNet3D:
    torch.manual_seed(seed)                             # the same initial weights for every arm of a draw
    return UNet3D(cfg).to(device, memory_format=torch.channels_last_3d)


def few_label_draw(order: Sequence[int], budget: int, images: torch.Tensor, labels: torch.Tensor,
                   test_images: torch.Tensor, test_labels: torch.Tensor, *, pretext: nn.Module | None,
                   cfg: UNetConfig, loss_fn: Any, steps: int, lr: float, crop: int, batch: int, seed: int = 0,
                   atlas: dict | None = None, methods: Sequence[str] = METHODS, device: Any = None,
                   budget_s: float | None = None) -> list[dict[str, Any]]:
    """Train and score every method of ``methods`` with the first ``budget`` volumes of ``order`` labelled.

    ``images`` (N, C, *S) and ``labels`` (N, 1, *S) are the training brains (all of them serve as
    unlabelled crops for the GAN); ``pretext`` the network trained on the pretext task (needed for
    ``"pretrained"``); ``cfg``, ``loss_fn``, ``steps``, ``lr``, ``crop`` and ``batch`` chapter 10's
    recipe, the same for every network; ``atlas``: options of :func:`multi_atlas_labels`.
    Returns one row per method: ``{"labelled volumes", "method", "Dice", "Dice CSF", "Dice GM",
    "Dice WM", "seconds"}`` (Dice: the mean over the test volumes; "Dice" the mean of the three).
    """
    unknown = set(methods) - set(METHODS)
    if unknown or not 1 <= budget <= len(order) or len(order) > len(images):
        raise ValueError(f"few_label_draw: methods must be among {METHODS} and 1 <= budget <= {len(order)} volumes, "
                         f"got {sorted(unknown) or budget}")
    if "pretrained" in methods and pretext is None:
        raise ValueError("few_label_draw: 'pretrained' needs the pretext network (pretext=...)")
    chosen = list(order[:budget])
    x, y = images[chosen], labels[chosen]
    crops = lambda s: CropBatches(x, y, crop=crop, batch_size=batch, seed=s, transform=random_flip)   # noqa: E731
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        name = f"{method}, {budget} labelled"
        if method == "atlas registration":
            pred = multi_atlas_labels(x, y, test_images, **({"device": device} | (atlas or {})))
        elif method == "semi-supervised GAN":
            net = _segmenter(replace(cfg, out_channels=cfg.out_channels + 1), seed, device)
            gen = CropGenerator3D(CropGeneratorConfig(channels=images.shape[1], crop=crop)).to(device)
            unlabelled = CropBatches(images, brain_mask(images), crop=crop, batch_size=max(batch // 2, 1), seed=seed + 1,
                                     transform=random_flip)                 # every training brain, centred on the brain
            train_semisup_gan(net, gen, crops(seed), unlabelled, loss_fn, lr=lr, max_steps=steps, seed=seed,
                              budget_s=budget_s, desc=name)
            pred = predict_labels(WithoutFake(net), test_images, device)
        else:
            net = _segmenter(cfg, seed, device)
            if method == "pretrained":
                transfer_weights(pretext, net)
            train_segmenter(net, crops(seed), loss_fn, lr=lr, max_steps=steps, budget_s=budget_s, desc=name)
            pred = predict_labels(net, test_images, device)
        per_class = np.nanmean(tissue_dice(pred, test_labels[:, 0], per_class=True), axis=0)
        rows.append({"labelled volumes": budget, "method": method, "Dice": float(np.nanmean(per_class)),
                     **{f"Dice {tissue}": float(v) for tissue, v in zip(TISSUES, per_class)},
                     "seconds": time.perf_counter() - t0})
    return rows
