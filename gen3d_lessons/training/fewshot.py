"""Training a segmenter with few labels (chapter 14): a pretext task, and a semi-supervised GAN.

* :func:`pretext_step` / :func:`train_pretext`: a U-Net with as many outputs as image channels
  learns to restore crops that :func:`corrupt` damaged (cubes blanked out, noise added), on
  volumes without labels; its weights then start the segmenter
  (:func:`~gen3d_lessons.models.fewshot.transfer_weights`), which
  :func:`~gen3d_lessons.training.segmentation.train_segmenter` fine-tunes;
* :func:`semisup_gan_step` / :func:`train_semisup_gan`: Mondal et al.'s (2018) few-shot GAN. The
  segmenter has K + 1 outputs (the K classes and "fake"); each step it learns the classes of
  labelled voxels, that unlabelled real voxels are not fake and that generated voxels are; the
  generator learns to match the mean bottleneck features of real crops (feature matching,
  Salimans et al. 2016).

Both streams are :class:`~gen3d_lessons.data.batches.CropBatches`; the GAN reads a labelled and an
unlabelled stream side by side (:func:`zip_streams`).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Batch
from .fit import History, fit
from .segmentation import one_cycle, seg_step


# 1. The pretext task ---------------------------------------------------------------------------

def corrupt(x: torch.Tensor, generator: torch.Generator, *, cubes: int = 4, size: int = 6,
            noise: float = 0.1) -> torch.Tensor:
    """A damaged copy of crops ``x`` (B, C, *S): ``cubes`` cubes of side ``size`` set to zero in
    every channel, at random places in each crop, then Gaussian noise of standard deviation
    ``noise`` added everywhere. ``generator`` makes the damage reproducible."""
    if x.ndim != 5:
        raise ValueError(f"x: expected crops (B, C, D, H, W), got shape {tuple(x.shape)}")
    if size > min(x.shape[2:]) or cubes < 0 or noise < 0:
        raise ValueError(f"corrupt: need 0 <= cubes, 0 <= noise and size <= the crop's side, got "
                         f"cubes={cubes}, size={size}, noise={noise} for crops {tuple(x.shape[2:])}")
    out = x.clone()
    for b in range(len(x)):
        for _ in range(cubes):
            c = [int(torch.randint(s - size + 1, (), generator=generator)) for s in x.shape[2:]]
            out[b, :, c[0]:c[0] + size, c[1]:c[1] + size, c[2]:c[2] + size] = 0.0
    return out + noise * torch.randn(x.shape, generator=generator).to(x.device)


def pretext_step(batch: Batch, i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, scheduler: Any = None, **damage: Any) -> dict[str, float]:
    """One step of the pretext task: ``|| U-Net(corrupt(x)) - x ||²`` (no label is read).

    :func:`~gen3d_lessons.training.segmentation.seg_step` with the damaged crop as the image, the
    crop as it was as the target and a squared error as the loss. ``damage`` goes to
    :func:`corrupt` (``cubes``, ``size``, ``noise``).
    """
    x = batch["image"]
    return seg_step({"image": corrupt(x, generator, **damage), "label": x}, i, model=model, optimizer=optimizer,
                    loss_fn=F.mse_loss, scheduler=scheduler)


def train_pretext(model: nn.Module, batches: Iterable[Batch], *, lr: float, max_steps: int, seed: int = 0,
                  budget_s: float | None = None, desc: str = "pretext", **damage: Any) -> History:
    """Train ``model`` (in channels = out channels) on the pretext task: AdamW, one-cycle learning
    rate, one :func:`pretext_step` per batch (``damage``: see :func:`corrupt`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    step = partial(pretext_step, model=model, optimizer=optimizer, scheduler=one_cycle(optimizer, max_steps),
                   generator=torch.Generator().manual_seed(seed), **damage)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


# 2. The semi-supervised GAN (Mondal et al. 2018) -------------------------------------------------

@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside this block, batch normalisation still normalises with the batch's own statistics but
    its running averages (used at test time) are put back as they were on exit: generated crops
    must not shift the statistics the segmenter applies to real scans."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [{name: getattr(m, name) for name in names} for m in norms]
    try:
        for m in norms:                 # without running averages, a training-mode norm uses the batch's only
            for name in names:
                setattr(m, name, None)
        yield
    finally:
        for m, buffers in zip(norms, saved):
            for name, value in buffers.items():
                setattr(m, name, value)


def zip_streams(labelled: Iterable[Batch], unlabelled: Iterable[Batch]) -> Iterator[Batch]:
    """One batch per step from two endless streams: the labelled batch, plus ``"unlabelled"``, the
    image crops of the other stream (their labels, if any, are never read)."""
    for lab, unl in zip(labelled, unlabelled):
        yield {**lab, "unlabelled": unl["image"]}


def semisup_gan_step(batch: Batch, i: int, *, segmenter: nn.Module, generator: nn.Module,
                     opt_s: torch.optim.Optimizer, opt_g: torch.optim.Optimizer, loss_fn: Callable,
                     noise: torch.Generator, unsup_weight: float = 1.0, scheduler: Any = None) -> dict[str, float]:
    """One step of the few-shot GAN: the segmenter (K + 1 outputs, the last one "fake"), then the generator.

    Segmenter: ``loss_fn`` on the labelled crops' first K logits, plus ``unsup_weight`` times the
    mean over voxels of ``-log(1 - p_fake)`` on unlabelled crops and ``-log p_fake`` on generated
    ones. Generator: the squared distance between the mean bottleneck features of the unlabelled
    crops and of its own (feature matching). Generated crops never move batch normalisation's
    running averages (:func:`frozen_running_stats`).
    """
    # 1. the three kinds of crops
    device = next(segmenter.parameters()).device
    x, y, x_unl = batch["image"].to(device), batch["label"].to(device), batch["unlabelled"].to(device)
    z = torch.randn(len(x_unl), generator.cfg.z_dim, generator=noise).to(device)
    fake = generator(z)
    # 2. segmenter: classes of labelled voxels, real against fake elsewhere
    logits = segmenter(x)
    sup = loss_fn(logits[:, :-1], y)
    real_or_fake = lambda lg: (torch.logsumexp(lg[:, :-1], 1), lg[:, -1])   # noqa: E731  log-odds parts
    real, fake_logit = real_or_fake(segmenter(x_unl))
    l_unl = F.softplus(fake_logit - real).mean()                           # -log(1 - p_fake)
    with frozen_running_stats(segmenter):
        real_f, fake_f = real_or_fake(segmenter(fake.detach()))
    l_fake = F.softplus(real_f - fake_f).mean()                            # -log p_fake
    loss_s = sup + unsup_weight * (l_unl + l_fake)
    opt_s.zero_grad(set_to_none=True)
    loss_s.backward()
    opt_s.step()
    if scheduler is not None:
        scheduler.step()
    # 3. generator: feature matching at the segmenter's bottleneck
    with frozen_running_stats(segmenter):
        with torch.no_grad():
            target = segmenter.encode(x_unl)[-1].mean((0, 2, 3, 4))
        matched = segmenter.encode(fake)[-1].mean((0, 2, 3, 4))
    loss_g = F.mse_loss(matched, target)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return {"seg": sup.item(), "unlabelled": l_unl.item(), "fake": l_fake.item(), "feature_match": loss_g.item()}


def train_semisup_gan(segmenter: nn.Module, generator: nn.Module, labelled: Iterable[Batch],
                      unlabelled: Iterable[Batch], loss_fn: Callable, *, lr: float, max_steps: int,
                      lr_g: float = 1e-3, unsup_weight: float = 1.0, seed: int = 0, budget_s: float | None = None,
                      desc: str = "semi-supervised GAN") -> History:
    """Train the few-shot GAN: the segmenter with chapter 10's recipe (AdamW, one-cycle learning
    rate), the generator with Adam (``lr_g``, betas 0.5, 0.999); one :func:`semisup_gan_step` per step."""
    if segmenter.cfg.out_channels < 2:
        raise ValueError("train_semisup_gan: the segmenter needs K + 1 outputs (the classes and 'fake')")
    opt_s = torch.optim.AdamW(segmenter.parameters(), lr=lr, weight_decay=1e-4)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=(0.5, 0.999))
    step = partial(semisup_gan_step, segmenter=segmenter, generator=generator, opt_s=opt_s, opt_g=opt_g,
                   loss_fn=loss_fn, noise=torch.Generator().manual_seed(seed), unsup_weight=unsup_weight,
                   scheduler=one_cycle(opt_s, max_steps))
    return fit(step, zip_streams(labelled, unlabelled), max_steps=max_steps, budget_s=budget_s, desc=desc)
