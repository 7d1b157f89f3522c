"""Training a segmentation network: one step function per model.

``fit`` (in :mod:`.fit`) knows no model; the chapter binds a step function to its networks with
``functools.partial`` and hands it over; the volumes are read with
:func:`~gen3d_lessons.data.datasets.stack_cases` and served in random crops by
:class:`~gen3d_lessons.data.batches.CropBatches`::

    images, labels = stack_cases(read_dataset(root).split("train"))       # (N, C, *S), (N, 1, *S)
    step = partial(seg_step, model=unet, optimizer=opt, scheduler=one_cycle(opt, 500),
                   loss_fn=DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    history = fit(step, CropBatches(images, labels, crop=16, batch_size=8), max_steps=500, budget_s=...)

Three step functions, one per model of the chapter:

* :func:`seg_step`: the U-Net with a segmentation loss (Dice + cross-entropy);
* :func:`vox2vox_step`: the U-Net as the generator of a conditional GAN, a 3D PatchGAN as its
  discriminator (the survey's Eq. 3, with the segmentation loss in the place of the L1 term);
* :func:`vaereg_step`: the U-Net plus a VAE decoder that reconstructs the input (Myronenko 2019).

and one recipe per model that binds its step to its optimizers and runs ``fit``:
:func:`train_segmenter` (AdamW with a one-cycle learning rate), :func:`train_vox2vox` (the same
for the generator, pix2pix's Adam for the discriminator) and :func:`train_vaereg`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..blocks import one_hot
from ..data.batches import Batch
from ..losses import bce_discriminator_loss, bce_generator_loss, kl_per_voxel
from .fit import History, fit


# 1. Helpers (volumes in memory and their batches live in gen3d_lessons.data) ------------------

def one_cycle(optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The "one cycle" learning rate (Smith & Topin 2019): up to the optimizer's lr in the first
    10 % of ``max_steps``, then down to almost zero. Step it once per update."""
    lr = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max_steps, pct_start=0.1)


# 2. Step functions -----------------------------------------------------------------------------

def seg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loss_fn: Callable, scheduler: Any = None) -> dict[str, float]:
    """One supervised step: ``L_seg(U-Net(x), y)``, e.g. Dice + cross-entropy.

    ``scheduler`` (optional) is stepped after every update, e.g. a one-cycle learning rate.
    """
    # 1. the batch, on the model's device
    device = next(model.parameters()).device
    x, y = batch["image"].to(device), batch["label"].to(device)      # (B, C, *S), (B, 1, *S)
    # 2. forward and loss
    loss = loss_fn(model(x), y)
    # 3. backward and update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item()}


def vox2vox_step(batch: Batch, i: int, *, generator: torch.nn.Module, discriminator: torch.nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss_fn: Callable,
                 adv_weight: float = 0.1, scheduler: Any = None) -> dict[str, float]:
    """One Vox2Vox step: the discriminator, then the generator (the U-Net).

    ``min_G max_D  E[log D(x, y)] + E[log(1 - D(x, G(x)))] + λ L_seg(G(x), y)``: the survey's
    Eq. 3 with the segmentation loss in place of the L1 term; ``adv_weight`` = 1 / λ weighs the
    adversarial term against the segmentation loss instead, so ``adv_weight = 0`` is plain U-Net
    training. ``scheduler`` (optional) steps the generator's learning rate.
    """
    # 1. the batch: image, labels, and the labels one-hot, as the discriminator sees them
    device = next(generator.parameters()).device
    x, y = batch["image"].to(device), batch["label"].to(device)
    logits = generator(x)                                             # (B, K, *S)
    y_real, y_fake = one_hot(y, logits.shape[1]), logits.softmax(1)   # (B, K, *S) each
    # 2. discriminator: expert pairs are real (1), U-Net pairs fake (0); no gradient into G here
    d_real, d_fake = discriminator(x, y_real), discriminator(x, y_fake.detach())
    loss_d = bce_discriminator_loss(d_real, d_fake)                # halved, as in pix2pix
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    # 3. generator: fool the (updated) discriminator and match the labels
    d_fake = discriminator(x, y_fake)
    adv = bce_generator_loss(d_fake)                                  # non-saturating form
    seg = loss_fn(logits, y)
    opt_g.zero_grad(set_to_none=True)
    (seg + adv_weight * adv).backward()
    opt_g.step()
    if scheduler is not None:
        scheduler.step()
    return {"seg": seg.item(), "adv": adv.item(), "loss_d": loss_d.item()}


def vaereg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable, recon_weight: float = 0.1, kl_weight: float = 0.1,
                scheduler: Any = None) -> dict[str, float]:
    """One step of the VAE-regularised U-Net: ``L_seg + 0.1 L_L2 + 0.1 L_KL`` (Myronenko 2019).

    ``L_L2`` is the mean squared error of the reconstructed input; ``L_KL`` the KL divergence of
    ``N(mu, sigma²)`` from ``N(0, I)``, divided by the number of voxels as in the paper.
    """
    # 1. the batch, on the model's device
    device = next(model.parameters()).device
    x, y = batch["image"].to(device), batch["label"].to(device)
    # 2. one shared encoder, two decoders
    logits, recon, mu, logvar = model.forward_train(x)
    seg = loss_fn(logits, y)
    l2 = F.mse_loss(recon, x)
    kl = kl_per_voxel(mu, logvar, x[0, 0].numel())
    # 3. backward and update
    loss = seg + recon_weight * l2 + kl_weight * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"seg": seg.item(), "l2": l2.item(), "kl": kl.item()}


# 3. The recipes: optimizers, a one-cycle learning rate, the step, fit ------------------------------

def train_segmenter(model: torch.nn.Module, batches: Iterable[Batch], loss_fn: Callable, *, lr: float,
                    max_steps: int, budget_s: float | None = None, weight_decay: float = 1e-4,
                    desc: str = "U-Net") -> History:
    """Train a segmentation network on ``batches`` with ``loss_fn``: the recipe of chapter 10.

    AdamW (``lr``, ``weight_decay``) with a one-cycle learning rate over ``max_steps``
    (:func:`one_cycle`), one :func:`seg_step` per batch, run by ``fit`` (``budget_s`` is its fuse).
    ``model`` is trained in place; returns the :class:`~gen3d_lessons.training.History`.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step = partial(seg_step, model=model, optimizer=optimizer, scheduler=one_cycle(optimizer, max_steps),
                   loss_fn=loss_fn)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_vox2vox(generator: torch.nn.Module, discriminator: torch.nn.Module, batches: Iterable[Batch],
                  loss_fn: Callable, *, lr: float, max_steps: int, adv_weight: float = 0.1, lr_d: float = 1e-3,
                  budget_s: float | None = None, weight_decay: float = 1e-4, desc: str = "Vox2Vox") -> History:
    """Train a U-Net as the generator of Vox2Vox against a PatchGAN ``discriminator``: :func:`vox2vox_step`.

    The generator as in :func:`train_segmenter` (AdamW, one cycle over ``max_steps``); the
    discriminator with pix2pix's Adam (``lr_d``, betas 0.5 and 0.999) at a constant rate. Both
    networks are trained in place; returns the History (``seg``, ``adv``, ``loss_d`` per step).
    """
    opt_g = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, betas=(0.5, 0.999))
    step = partial(vox2vox_step, generator=generator, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d,
                   loss_fn=loss_fn, adv_weight=adv_weight, scheduler=one_cycle(opt_g, max_steps))
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_vaereg(model: torch.nn.Module, batches: Iterable[Batch], loss_fn: Callable, *, lr: float, max_steps: int,
                 budget_s: float | None = None, weight_decay: float = 1e-4, desc: str = "VAE-reg") -> History:
    """Train a VAE-regularised U-Net (:func:`vaereg_step`) as :func:`train_segmenter` trains a U-Net.

    Returns the History (``seg``, ``l2``, ``kl`` per step); ``model`` is trained in place.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step = partial(vaereg_step, model=model, optimizer=optimizer, loss_fn=loss_fn, scheduler=one_cycle(optimizer, max_steps))
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
