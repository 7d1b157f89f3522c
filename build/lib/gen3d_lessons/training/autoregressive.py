"""Step functions of the autoregressive family (chapters 6 and 12): PixelCNN, VQ-VAE and the code transformer.

Each takes the model, the optimizer and one batch, takes one optimizer step and returns what it
measured; :func:`~gen3d_lessons.training.fit` calls it through a lambda::

    loader = ShuffledBatches({"image": volumes}, batch_size=4, seed=0, flip=("image",))
    fit(lambda batch, i: vqvae_step(vqvae, opt, batch), loader, max_steps=..., budget_s=...)

:class:`ShuffledBatches` serves batches of tensors already in memory (the cohorts of this book
are small enough), in a seeded order, optionally mirrored left-right.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from ..models.pixelcnn import PixelCNN3D
from ..models.vqvae import CodeTransformer, VQVAE3D, to_sequence
from .generative import _image


class ShuffledBatches:
    """Batches ``{key: tensor[idx]}`` of a dict of equally long tensors, in a seeded random order.

    A fresh order every pass (one pass = one epoch for :func:`~gen3d_lessons.training.fit`); the
    last partial batch is dropped. With ``flip`` set, each item's tensors named in it are mirrored
    along spatial axis ``flip_axis`` (0 = D) with probability 1/2 — for the brain phantoms, axis 0
    is left-right, so this is a free augmentation.
    """

    def __init__(self, data: Mapping[str, torch.Tensor], batch_size: int, seed: int = 0,
                 flip: tuple[str, ...] = (), flip_axis: int = 0):
        if not isinstance(data, Mapping) or not data:
            raise ValueError("data: expected a non-empty dict {name: tensor (N, ...)}")
        n = {len(v) for v in data.values()}
        if len(n) != 1 or 0 in n:
            raise ValueError(f"data: every tensor needs the same, non-zero length N, got {sorted(n)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        unknown = set(flip) - set(data)
        if unknown:
            raise ValueError(f"flip: {sorted(unknown)} are not keys of data ({sorted(data)})")
        self.data, self.n = dict(data), n.pop()
        self.batch_size = min(batch_size, self.n)
        self.flip, self.flip_axis = tuple(flip), flip_axis
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(self.n, generator=self.g)
        for s in range(0, self.n - self.batch_size + 1, self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = {k: v[idx] for k, v in self.data.items()}
            mirrored = torch.rand(len(idx), generator=self.g) < 0.5                          # (B,)
            for key in self.flip:
                x = batch[key]                                                                # (B, C, D, H, W)
                where = mirrored.view(-1, *([1] * (x.ndim - 1)))
                batch[key] = torch.where(where, x.flip(2 + self.flip_axis), x)
            yield batch


def pixelcnn_step(model: PixelCNN3D, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
                  clip: float | None = 1.0, scheduler: Any = None) -> dict[str, float]:
    """One step of maximum likelihood: the mean of ``-log2 p(x_i | x_<i)`` over every voxel.

    ``batch["levels"]``: (B, 1, D, H, W) quantised volumes (:func:`~gen3d_lessons.models.pixelcnn.quantise`).
    All conditionals are trained in parallel (teacher forcing): the masks, not the loop, keep
    each voxel from seeing itself. A learning-rate ``scheduler``, if given, steps after the
    optimizer. Returns the loss in bits per voxel.
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
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"bits_per_voxel": loss.item()}


def vqvae_step(model: VQVAE3D, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any]) -> dict[str, float]:
    """One step of the VQ-VAE: mean squared reconstruction error + commitment loss.

    The codebook is not in the gradient: it follows an exponential moving average of the
    encoder vectors assigned to each code (inside ``model.quantize`` in training mode).
    """
    device = next(model.parameters()).device
    # 1. data, 2. forward (the codebook moves here), 3. loss
    x = _image(batch, device)
    model.train()
    x_hat, commitment = model(x)
    mse = F.mse_loss(x_hat, x)
    loss = mse + commitment
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "mse": mse.item(), "commitment": commitment.item()}


def transformer_step(model: CodeTransformer, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
                     clip: float | None = 1.0) -> dict[str, float]:
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
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return {"loss": loss.item(), "perplexity": float(torch.exp(loss.detach()))}
