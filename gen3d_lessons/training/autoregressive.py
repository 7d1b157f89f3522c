"""Step functions of the autoregressive family (chapters 6 and 12): VQ-VAE and the code transformer.

Each takes the model, the optimizer and one batch, takes one optimizer step and returns what it
measured; :func:`~gen3d_lessons.training.fit` calls it through a lambda::

    fit(lambda batch, i: vqvae_step(vqvae, opt, batch), loader, max_steps=..., budget_s=...)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..models.vqvae import CodeTransformer, VQVAE3D, to_sequence
from .generative import _image


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
