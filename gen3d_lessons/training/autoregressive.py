"""Step functions of the autoregressive family (chapters 6 and 12): PixelCNN, VQ-VAE and the code transformer.

Each takes one batch and the step number, with the model and its optimizer by name, takes one
optimizer step and returns what it measured; bind the model with :func:`functools.partial` and
hand the result to :func:`~gen3d_lessons.training.fit`::

    loader = Batches({"image": volumes}, batch_size=4, seed=0, augment=("image",))
    fit(partial(vqvae_step, model=vqvae, optimizer=opt), loader, max_steps=..., budget_s=...)

:class:`~gen3d_lessons.data.batches.Batches` serves batches of tensors already in memory (the
cohorts of this book are small enough), in a seeded order, optionally mirrored left-right.
:func:`code_grids` turns volumes into the transformer's data, the VQ-VAE's code indices.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..data.batches import Batches
from ..models.pixelcnn import PixelCNN3D
from ..models.vqvae import CodeTransformer, VQVAE3D, to_sequence
from .batch import batch_tensor


def pixelcnn_step(batch: Mapping[str, Any], i: int, *, model: PixelCNN3D, optimizer: torch.optim.Optimizer,
                  scheduler: Any = None, clip_grad: float | None = 1.0) -> dict[str, float]:
    """One step of maximum likelihood: the mean of ``-log2 p(x_i | x_<i)`` over every voxel.

    ``batch["levels"]``: (B, 1, D, H, W) quantised volumes (:func:`~gen3d_lessons.models.pixelcnn.quantise`).
    All conditionals are trained in parallel (teacher forcing): the masks, not the loop, keep
    each voxel from seeing itself. ``clip_grad`` caps the gradient norm; a learning-rate
    ``scheduler``, if given, steps after the optimizer. Returns the loss in bits per voxel.
    """
    if not isinstance(batch, Mapping) or "levels" not in batch:
        raise ValueError("batch: expected a dict with 'levels' (B, 1, D, H, W) from quantise(...)")
    device = next(model.parameters()).device
    # 1. data, 2. negative log-likelihood of every voxel given the voxels before it
    x = batch["levels"].to(device)
    model.train()
    loss = model.nll_bits(x).mean()
    # 3. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"bits_per_voxel": loss.item()}


def vqvae_step(batch: Mapping[str, Any], i: int, *, model: VQVAE3D, optimizer: torch.optim.Optimizer
               ) -> dict[str, float]:
    """One step of the VQ-VAE: mean squared reconstruction error + commitment loss.

    The codebook is not in the gradient: it follows an exponential moving average of the
    encoder vectors assigned to each code (inside ``model.quantize`` in training mode).
    """
    device = next(model.parameters()).device
    # 1. data, 2. forward (the codebook moves here), 3. loss
    x = batch_tensor(batch, "image", device)
    model.train()
    x_hat, commitment = model(x)
    mse = F.mse_loss(x_hat, x)
    loss = mse + commitment
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "mse": mse.item(), "commitment": commitment.item()}


def transformer_step(batch: Mapping[str, Any], i: int, *, model: CodeTransformer, optimizer: torch.optim.Optimizer,
                     clip_grad: float | None = 1.0) -> dict[str, float]:
    """One step of next-code cross-entropy on raster-ordered codes.

    ``batch["codes"]``: (B, d, h, w) indices from a trained, frozen VQ-VAE (computed once, before
    training the transformer). Returns the loss in nats per code and its perplexity.
    """
    if not isinstance(batch, Mapping) or "codes" not in batch:
        raise ValueError("batch: expected a dict with 'codes' (B, d, h, w) from VQVAE3D.codes")
    device = next(model.parameters()).device
    # 1. codes in raster order, 2. cross-entropy of each code given those before it
    s = to_sequence(batch["codes"].to(device))                   # (B, T)
    model.train()
    loss = model.loss(s)
    # 3. update (clipped: attention logits can spike early in training)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return {"loss": loss.item(), "perplexity": float(torch.exp(loss.detach()))}


@torch.no_grad()
def code_grids(vqvae: VQVAE3D, volumes: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """The code indices of ``volumes`` (N, C, D, H, W) under a trained VQ-VAE: (N, d, h, w) int64, on the CPU.

    This is the transformer's data: computed once, after the VQ-VAE is trained (put it in eval
    mode first) and before the transformer is. With ``mirror``, the codes of the volumes mirrored
    along the first spatial axis (left-right in the brain phantoms, as :class:`Batches` mirrors
    them) follow those of the volumes: (2N, d, h, w), twice the data for free. The volumes are
    encoded on the VQ-VAE's device, all of one set in one batch.
    """
    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        raise ValueError(f"volumes: expected a tensor (N, C, D, H, W), got "
                         f"{tuple(volumes.shape) if isinstance(volumes, torch.Tensor) else type(volumes).__name__}")
    device = next(vqvae.parameters()).device
    sets = (volumes, volumes.flip(2)) if mirror else (volumes,)
    return torch.cat([vqvae.codes(v.to(device)) for v in sets]).cpu()     # (N or 2N, d, h, w)
