"""Step functions of the autoencoder family (chapters 4, 5 and 12): VAE / CVAE.

Each takes the model(s), the optimizer and one batch, takes one optimizer step and returns what
it measured; :func:`~gen3d_lessons.training.fit` calls it through a lambda::

    fit(lambda batch, i: vae_step(vae, opt, batch, beta=1.0), loader, max_steps=..., budget_s=...)

A batch is a dict with ``"image"`` ``(B, C, D, H, W)`` and, for a CVAE, ``"condition"`` ``(B, K)``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..losses import kl_to_standard_normal
from ..models.vae import VAE3D


def _image(batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise ValueError("batch: expected a dict with an 'image' tensor (B, C, D, H, W)")
    return batch["image"].to(device)


def vae_step(model: VAE3D, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
             beta: float = 1.0) -> dict[str, float]:
    """One step on the negative ELBO (survey Eq. 7; Eq. 8 with a condition).

    loss = sum over voxels of (x - x_hat)² / 2  +  beta * KL(q(z | x[, c]) || N(0, I)), per volume.
    The squared error is the log-likelihood of a Gaussian decoder with unit variance; ``beta``
    weighs the KL term (a smaller ``beta`` trades a less regular latent for sharper reconstructions).
    """
    device = next(model.parameters()).device
    # 1. data (and the condition of a CVAE)
    x = _image(batch, device)
    c = batch["condition"].to(device) if model.cfg.cond_dim > 0 else None
    # 2. forward: encode, sample, decode
    model.train()
    x_hat, mu, logvar = model(x, c)
    # 3. the two terms of the negative ELBO, per volume, averaged over the batch
    recon = 0.5 * (x_hat - x).pow(2).flatten(1).sum(1).mean()
    kl = kl_to_standard_normal(mu, logvar).mean()
    loss = recon + beta * kl
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    n_voxels = x[0].numel()
    return {"loss": loss.item(), "mse": 2 * recon.item() / n_voxels, "kl": kl.item()}
