"""Step functions of the autoencoder family (chapters 4, 5 and 12): AE / DAE / U-Net, VAE / CVAE.

Each takes one batch and the step number, with the model and its optimizer by name, takes one
optimizer step and returns what it measured; bind the model with :func:`functools.partial` and
hand the result to :func:`~gen3d_lessons.training.fit`::

    fit(partial(vae_step, model=vae, optimizer=opt, beta=1.0), loader, max_steps=..., budget_s=...)
    fit(partial(ae_step, model=ae, optimizer=opt, noise_std=0.1), loader, max_steps=...)   # a DAE

A batch is a dict with ``"image"`` ``(B, C, D, H, W)`` and, for a CVAE, ``"condition"`` ``(B, K)``.

Chapter 4 trains five networks the same way; :func:`train_autoencoder` and :func:`train_vae` are
that recipe (Adam, shuffled and mirrored batches of the training volumes, :func:`fit`), so that
the chapter names only what differs between them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..data.batches import Batches
from ..losses import gaussian_nll, kl_to_standard_normal
from ..models.vae import VAE3D
from .batch import batch_tensor
from .fit import History, fit


def corrupt(x: torch.Tensor, noise_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """T(x) of survey Eq. 9: additive Gaussian noise, ``x + noise_std * eps`` with ``eps ~ N(0, I)``."""
    if not noise_std >= 0:
        raise ValueError(f"noise_std: expected a non-negative number, got {noise_std!r}")
    if noise_std == 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return x + noise_std * eps.to(x.device, x.dtype)


def ae_step(batch: Mapping[str, Any], i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            noise_std: float = 0.0) -> dict[str, float]:
    """One step on the squared reconstruction error of an autoencoder (survey Eq. 6), or of a DAE (Eq. 9).

    ``model`` is any network with ``forward(x) -> x_hat`` of the same shape: the bottleneck
    :class:`~gen3d_lessons.models.autoencoder.Autoencoder3D`, its U-Net version, or a U-Net with
    one output channel. With ``noise_std > 0`` it sees ``T(x)`` (:func:`corrupt`) and must return
    the clean ``x``.
    """
    device = next(model.parameters()).device
    # 1. data, corrupted for a DAE
    x = batch_tensor(batch, "image", device)
    x_in = corrupt(x, noise_std)
    # 2. forward
    model.train()
    x_hat = model(x_in)
    if x_hat.shape != x.shape:
        raise ValueError(f"model: returned shape {tuple(x_hat.shape)} for input {tuple(x.shape)}; an autoencoder "
                         "must return a volume of the input's shape")
    # 3. ||x - D(E(T(x)))||², the mean over voxels
    loss = F.mse_loss(x_hat, x)
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def vae_step(batch: Mapping[str, Any], i: int, *, model: VAE3D, optimizer: torch.optim.Optimizer,
             beta: float = 1.0) -> dict[str, float]:
    """One step on the negative ELBO (survey Eq. 7; Eq. 8 with a condition).

    loss = sum over voxels of (x - x_hat)² / 2  +  beta * KL(q(z | x[, c]) || N(0, I)), per volume.
    The squared error is the log-likelihood of a Gaussian decoder with unit variance; ``beta``
    weighs the KL term (a smaller ``beta`` trades a less regular latent for sharper reconstructions).
    """
    device = next(model.parameters()).device
    # 1. data (and the condition of a CVAE)
    x = batch_tensor(batch, "image", device)
    c = batch["condition"].to(device) if model.cfg.cond_dim > 0 else None
    # 2. forward: encode, sample, decode
    model.train()
    x_hat, mu, logvar = model(x, c)
    # 3. the two terms of the negative ELBO, per volume, averaged over the batch
    recon = gaussian_nll(x, x_hat)
    kl = kl_to_standard_normal(mu, logvar).mean()
    loss = recon + beta * kl
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    n_voxels = x[0].numel()
    return {"loss": loss.item(), "mse": 2 * recon.item() / n_voxels, "kl": kl.item()}


# The recipe of chapter 4 --------------------------------------------------------------------------

def train_autoencoder(model: torch.nn.Module, images: torch.Tensor, *, steps: int, batch: int, lr: float,
                      budget_s: float | None = None, noise_std: float = 0.0, seed: int = 0,
                      desc: str = "AE") -> History:
    """Train an autoencoder (Eq. 6), or a DAE with ``noise_std > 0`` (Eq. 9), on ``images`` (N, C, D, H, W).

    Adam at ``lr`` on :func:`ae_step`, ``steps`` batches of ``batch`` volumes drawn by
    :class:`~gen3d_lessons.data.batches.Batches` (shuffled with ``seed``, mirrored left-right at
    random), through :func:`~gen3d_lessons.training.fit` with its fuse ``budget_s``. Returns the
    :class:`~gen3d_lessons.training.History` (``loss``).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = Batches({"image": images}, batch, seed=seed, augment=("image",))
    return fit(partial(ae_step, model=model, optimizer=optimizer, noise_std=noise_std), batches,
               max_steps=steps, budget_s=budget_s, desc=desc)


def train_vae(model: VAE3D, images: torch.Tensor, condition: torch.Tensor | None = None, *, steps: int, batch: int,
              lr: float, beta: float = 1.0, budget_s: float | None = None, seed: int = 0, desc: str = "VAE") -> History:
    """Train a VAE (Eq. 7), or a CVAE given its ``condition`` (N, K) (Eq. 8), on ``images`` (N, C, D, H, W).

    The recipe of :func:`train_autoencoder` with :func:`vae_step` (the negative ELBO with weight
    ``beta`` on the KL term). Returns the :class:`~gen3d_lessons.training.History` (``loss``,
    ``mse``, ``kl``).
    """
    if (condition is None) != (model.cfg.cond_dim == 0):
        raise ValueError(f"condition: this model has cond_dim={model.cfg.cond_dim}; give a condition (N, K) "
                         "exactly for a CVAE")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = {"image": images} if condition is None else {"image": images, "condition": condition}
    batches = Batches(data, batch, seed=seed, augment=("image",))
    return fit(partial(vae_step, model=model, optimizer=optimizer, beta=beta), batches,
               max_steps=steps, budget_s=budget_s, desc=desc)
