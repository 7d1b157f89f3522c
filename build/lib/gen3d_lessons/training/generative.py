"""Step functions of the autoencoder family (chapters 4, 5 and 12): AE / DAE / U-Net, VAE / CVAE.

Each takes the model(s), the optimizer and one batch, takes one optimizer step and returns what
it measured; :func:`~gen3d_lessons.training.fit` calls it through a lambda::

    fit(lambda batch, i: vae_step(vae, opt, batch, beta=1.0), loader, max_steps=..., budget_s=...)
    fit(lambda batch, i: ae_step(ae, opt, batch, noise_std=0.1), loader, max_steps=...)   # a DAE

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


class ShuffledBatches:
    """Batches ``{"image": (B, C, D, H, W)[, "condition": (B, K)]}`` in a seeded random order, a new order each pass.

    Each volume is mirrored along its first spatial axis (left-right in the brain phantoms) with
    probability 1/2: with a few dozen training volumes, the mirror images are free extra data.
    The last partial batch of a pass is dropped. Iterable again and again, as
    :func:`~gen3d_lessons.training.fit` needs.
    """

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int = 0, condition: torch.Tensor | None = None,
                 flip: bool = True):
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            raise ValueError(f"x: expected volumes (N, C, D, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(x):
            raise ValueError(f"batch_size: expected an integer in [1, {len(x)}], got {batch_size!r}")
        if condition is not None and (condition.ndim != 2 or len(condition) != len(x)):
            raise ValueError(f"condition: expected shape ({len(x)}, K), got {tuple(condition.shape)}")
        self.x, self.condition, self.batch_size, self.flip = x, condition, batch_size, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.x[idx]                                                  # (B, C, D, H, W)
            if self.flip:
                mirror = torch.rand(len(idx), generator=self.generator) < 0.5    # (B,)
                x = torch.where(mirror[:, None, None, None, None], x.flip(2), x)
            yield {"image": x} if self.condition is None else {"image": x, "condition": self.condition[idx]}


def corrupt(x: torch.Tensor, noise_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """T(x) of survey Eq. 9: additive Gaussian noise, ``x + noise_std * eps`` with ``eps ~ N(0, I)``."""
    if not noise_std >= 0:
        raise ValueError(f"noise_std: expected a non-negative number, got {noise_std!r}")
    if noise_std == 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return x + noise_std * eps.to(x.device, x.dtype)


def ae_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
            noise_std: float = 0.0) -> dict[str, float]:
    """One step on the squared reconstruction error of an autoencoder (survey Eq. 6), or of a DAE (Eq. 9).

    ``model`` is any network with ``forward(x) -> x_hat`` of the same shape: the bottleneck
    :class:`~gen3d_lessons.models.autoencoder.Autoencoder3D`, its U-Net version, or a U-Net with
    one output channel. With ``noise_std > 0`` it sees ``T(x)`` (:func:`corrupt`) and must return
    the clean ``x``.
    """
    device = next(model.parameters()).device
    # 1. data, corrupted for a DAE
    x = _image(batch, device)
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
