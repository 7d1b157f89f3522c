"""Step functions of chapter 11: a denoiser trained with MSE, and its RED-WGAN fine-tuning.

Both take a batch of :class:`~gen3d_lessons.data.datasets.VolumeDataset` items, with the
degraded volume under ``inputs`` (default ``"lowdose"``) and the full-dose reference under
``target`` (default ``"image"``), both ``(B, 1, D, H, W)``. Bind the models and optimizers
with :func:`functools.partial` and hand the result to :func:`~gen3d_lessons.training.fit`::

    step = partial(mse_step, model=red, opt=opt, device=run.device)
    history = fit(step, loader, max_steps=run.max_steps, budget_s=run.budget_s)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import gradient_penalty


def random_flips(item: Mapping[str, Any], keys: tuple[str, ...] = ("lowdose", "image", "label")) -> dict[str, Any]:
    """Augmentation for ``VolumeDataset(transform=...)``: flip every volume in ``keys`` the same
    way along each spatial axis with probability 1/2 (noise and blur are isotropic, so a
    flipped pair is as valid a training pair as the original). Uses torch's global generator,
    which :func:`~gen3d_lessons.profiles.setup` seeds."""
    axes = [a for a in (1, 2, 3) if torch.rand(()) < 0.5]        # item volumes are (C, D, H, W)
    out = dict(item)
    if axes:
        for key in keys:
            if key in out:
                out[key] = out[key].flip(axes)
    return out


def mse_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, opt: torch.optim.Optimizer,
             device: torch.device | str = "cpu", inputs: str = "lowdose", target: str = "image") -> dict[str, float]:
    """One step of the denoising autoencoder objective (survey Eq. 9): ``E ||y − G(x)||²``."""
    x, y = batch[inputs].to(device), batch[target].to(device)   # (B, 1, D, H, W) low dose, full dose
    model.train()
    # 1. denoise
    y_hat = model(x)
    # 2. voxel-wise squared error against the full-dose volume
    loss = F.mse_loss(y_hat, y)
    # 3. update
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"mse": loss.item()}


def red_wgan_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, critic: nn.Module,
                  opt_g: torch.optim.Optimizer, opt_c: torch.optim.Optimizer, device: torch.device | str = "cpu",
                  lambda_adv: float = 1e-3, lambda_gp: float = 10.0, n_critic: int = 1,
                  inputs: str = "lowdose", target: str = "image") -> dict[str, float]:
    """One RED-WGAN step (Ran et al. 2019): a WGAN-GP critic update, then every ``n_critic``
    steps a generator update with ``MSE + lambda_adv · (−D(G(x)))``.

    The critic sees full-dose volumes (real) and denoised ones (fake), not the low-dose input:
    it judges whether a volume *looks* full-dose. The MSE term keeps the output tied to this
    subject's anatomy; the adversarial term pulls it towards full-dose texture.
    """
    x, y = batch[inputs].to(device), batch[target].to(device)   # (B, 1, D, H, W)
    generator.train(), critic.train()
    # 1. critic: maximise D(real) − D(fake), i.e. minimise its negative, plus the gradient penalty
    with torch.no_grad():
        fake = generator(x)
    w_dist = critic(y).mean() - critic(fake).mean()             # estimate of the Wasserstein-1 distance
    gp = gradient_penalty(critic, y, fake)
    opt_c.zero_grad(set_to_none=True)
    (-w_dist + lambda_gp * gp).backward()
    opt_c.step()
    out = {"w_dist": w_dist.item(), "gp": gp.item()}
    # 2. generator: stay close to the reference (MSE) and fool the critic (adversarial term)
    if i % n_critic == 0:
        critic.requires_grad_(False)                            # no critic gradients needed here
        y_hat = generator(x)
        mse = F.mse_loss(y_hat, y)
        adv = -critic(y_hat).mean()
        opt_g.zero_grad(set_to_none=True)
        (mse + lambda_adv * adv).backward()
        opt_g.step()
        critic.requires_grad_(True)
        out.update(mse=mse.item(), adv=adv.item())
    return out
