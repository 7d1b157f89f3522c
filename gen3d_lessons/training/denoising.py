"""Step functions of chapter 11: a denoiser trained with MSE, and its RED-WGAN fine-tuning.

Both take a batch of :class:`~gen3d_lessons.data.datasets.VolumeDataset` items, with the
degraded volume under ``inputs`` (default ``"lowdose"``) and the full-dose reference under
``target`` (default ``"image"``), both ``(B, C, D, H, W)``. Bind the models and optimizers
with :func:`functools.partial` and hand the result to :func:`~gen3d_lessons.training.fit`::

    step = partial(mse_step, model=red, optimizer=opt, scheduler=scheduler)
    history = fit(step, loader, max_steps=run.max_steps, budget_s=run.budget_s)

Both read the device from the model: the batch is moved to it. :func:`train_mse` and
:func:`train_red_wgan` are the chapter's two recipes (the optimizers, the learning-rate schedule
and ``fit``), and :func:`tenths` reads a run's curve at its start and at its end.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import discriminator_loss, generator_loss, gradient_penalty
from ..profiles import step_cap
from .fit import History, fit
from .segmentation import one_cycle

PAIR_KEYS = ("lowdose", "image", "label")


# 1. Augmentation: random patches and flips ----------------------------------------------------

def augment(item: Mapping[str, Any], patch: int | None = None, keys: tuple[str, ...] = PAIR_KEYS) -> dict[str, Any]:
    """For ``VolumeDataset(transform=partial(augment, patch=24))``: cut the same random
    ``patch``³ box out of every volume in ``keys`` (None: keep the whole volume), then flip them
    all the same way along each spatial axis with probability 1/2.

    Both are valid for denoising: noise and blur are the same everywhere and in every direction,
    so a flipped or cropped pair is as true a training pair as the original, and a convolutional
    network applies to the whole volume what it learned on patches. Small patches give more,
    more varied samples per second of CPU. Uses torch's global generator, which
    :func:`~gen3d_lessons.profiles.setup` seeds.
    """
    out = dict(item)
    present = [k for k in keys if k in out]
    if not present:
        raise ValueError(f"augment: none of the keys {keys} is in the item (it has {sorted(out)})")
    shape = out[present[0]].shape[1:]                            # item volumes are (C, D, H, W)
    # 1. a random box, the same for every key
    if patch is not None:
        if not isinstance(patch, int) or not 1 <= patch <= min(shape):
            raise ValueError(f"patch: expected an integer edge in 1..{min(shape)} for volumes {tuple(shape)}, got {patch!r}")
        corner = [int(torch.randint(0, n - patch + 1, ())) for n in shape]
        box = (slice(None), *(slice(c, c + patch) for c in corner))
        for key in present:
            out[key] = out[key][box]
    # 2. random flips, the same for every key
    axes = [a for a in (1, 2, 3) if torch.rand(()) < 0.5]
    if axes:
        for key in present:
            out[key] = out[key].flip(axes)
    return out


# 2. The denoising autoencoder objective ---------------------------------------------------------

def mse_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any = None, inputs: str = "lowdose", target: str = "image") -> dict[str, float]:
    """One step of the denoising autoencoder objective (survey Eq. 9): ``E ||y − G(x)||²``.

    ``scheduler`` is an optional learning-rate scheduler, stepped once per step.
    """
    device = next(model.parameters()).device
    x, y = batch[inputs].to(device), batch[target].to(device)   # (B, C, D, H, W) low dose, full dose
    model.train()
    # 1. denoise
    y_hat = model(x)
    # 2. voxel-wise squared error against the full-dose volume
    loss = F.mse_loss(y_hat, y[:, : y_hat.shape[1]])
    # 3. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"mse": loss.item()}


# 3. RED-WGAN: the same objective plus a Wasserstein critic ------------------------------------

def red_wgan_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, discriminator: nn.Module,
                  opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, adv_weight: float = 1e-3,
                  gp_weight: float = 10.0, n_critic: int = 1, critic_warmup: int = 0, inputs: str = "lowdose",
                  target: str = "image") -> dict[str, float]:
    """One RED-WGAN step (Ran et al. 2019): a WGAN-GP critic update (``discriminator`` is the
    critic, ``gp_weight`` weighs its gradient penalty), then every ``n_critic`` steps a generator
    update with ``MSE + adv_weight · (−D(G(x)))``.

    During the first ``critic_warmup`` steps only the critic learns: a generator that starts
    from MSE-trained weights would otherwise follow the gradients of a critic that still
    knows nothing.

    The critic sees full-dose volumes (real) and denoised ones (fake), not the low-dose input:
    it judges whether a volume *looks* full-dose. The MSE term keeps the output tied to this
    subject's anatomy; the adversarial term pulls it towards full-dose texture.
    """
    critic = discriminator
    device = next(generator.parameters()).device
    x, y = batch[inputs].to(device), batch[target].to(device)   # (B, C, D, H, W)
    generator.train(), critic.train()
    update_g = i >= critic_warmup and (i - critic_warmup) % n_critic == 0
    # 0. denoise once; keep the graph only if the generator learns this step
    with torch.set_grad_enabled(update_g):
        y_hat = generator(x)                                     # (B, C, D, H, W)
    y = y[:, : y_hat.shape[1]]
    # 1. critic: maximise D(real) − D(fake), i.e. minimise its negative, plus the gradient penalty
    fake = y_hat.detach()
    d_loss = discriminator_loss(critic(y), critic(fake), "wgan")   # −(estimate of the Wasserstein-1 distance)
    gp = gradient_penalty(critic, y, fake)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + gp_weight * gp).backward()
    opt_d.step()
    out = {"w_dist": -d_loss.item(), "gp": gp.item()}
    # 2. generator: stay close to the reference (MSE) and fool the critic (adversarial term)
    if update_g:
        critic.requires_grad_(False)                            # no critic gradients needed here
        mse = F.mse_loss(y_hat, y)
        adv = generator_loss(critic(y_hat), "wgan")               # −E[D(G(x))]
        opt_g.zero_grad(set_to_none=True)
        (mse + adv_weight * adv).backward()
        opt_g.step()
        critic.requires_grad_(True)
        out.update(mse=mse.item(), adv=adv.item())
    return out


# 4. The chapter's two recipes, and how a run's curve moved -------------------------------------

def train_mse(model: nn.Module, batches: Any, *, lr: float, max_steps: int, budget_s: float | None = None,
              desc: str = "RED (MSE)", inputs: str = "lowdose", target: str = "image") -> History:
    """Adam with a one-cycle learning rate that peaks at ``lr`` (it warms up over the first 10 %
    of ``max_steps``, then anneals), and :func:`fit` over :func:`mse_step`. ``model`` trains in
    place; returns the history (``mse`` per step). ``budget_s`` is ``fit``'s fuse; ``inputs``
    and ``target`` name the batch's tensors (chapter 9's super-resolution: ``"thick"``)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = one_cycle(optimizer, max_steps)
    step = partial(mse_step, model=model, optimizer=optimizer, scheduler=scheduler, inputs=inputs, target=target)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_red_wgan(generator: nn.Module, critic: nn.Module, batches: Any, *, max_steps: int, lr_g: float = 5e-5,
                   lr_c: float = 1e-3, betas: tuple[float, float] = (0.5, 0.9), adv_weight: float = 1e-3,
                   gp_weight: float = 10.0, critic_warmup: int = 0, budget_s: float | None = None,
                   desc: str = "RED-WGAN", inputs: str = "lowdose", target: str = "image") -> History:
    """One Adam each for ``generator`` and ``critic`` (WGAN-GP's ``betas``), and :func:`fit` over
    :func:`red_wgan_step`: the critic learns alone for ``critic_warmup`` steps, then both.
    Both networks train in place; returns the history (``w_dist`` and ``gp`` every step, ``mse``
    and ``adv`` at the generator's steps). ``budget_s`` is ``fit``'s fuse; ``inputs`` and
    ``target`` name the batch's tensors."""
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=betas)
    opt_c = torch.optim.Adam(critic.parameters(), lr=lr_c, betas=betas)
    critic_warmup = max(min(critic_warmup, step_cap(max_steps) - 1), 0)   # a dry run's cap still leaves G a step
    step = partial(red_wgan_step, generator=generator, discriminator=critic, opt_g=opt_g, opt_d=opt_c,
                   adv_weight=adv_weight, gp_weight=gp_weight, critic_warmup=critic_warmup, inputs=inputs, target=target)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def tenths(history: History, key: str) -> tuple[float, float]:
    """The mean of ``key`` over the first and over the last tenth of a run's steps (at least one
    step each), skipping steps that did not record it: where a noisy curve started and ended.
    NaN for a key the run never recorded (e.g. ``mse`` while RED-WGAN's critic warms up)."""
    if not isinstance(history, History):
        raise ValueError(f"history: expected a training History, got {type(history).__name__}")
    if key not in history.values:
        return float("nan"), float("nan")
    n = max(history.steps // 10, 1)                              # steps in a tenth of the run
    first = np.asarray(history.values[key][:n], dtype=float)
    return float(np.nanmean(first)) if np.isfinite(first).any() else float("nan"), history.mean_last(key, n)
