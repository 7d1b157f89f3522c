"""Step function of the yardstick's multi-task encoder (:mod:`gen3d_lessons.tasks.yardstick`).

The encoder (:class:`~gen3d_lessons.models.encoder.Encoder3D`) learns to predict age, site,
lesions and tissue volumes from a brain; its features are the space in which the yardstick
compares generated volumes with real ones. Bind the encoder and its optimizer with
:func:`functools.partial` and hand the step to :func:`~gen3d_lessons.training.fit`::

    loader = Batches(train, batch_size=8, seed=0, augment=("image",), shift=2, gain=0.1)
    fit(partial(encoder_step, model=encoder, optimizer=opt), loader, max_steps=1500)

A batch is a dict with ``"image"`` (B, C, D, H, W), ``"age"`` (B,) and ``"volumes"`` (B, 3)
standardised, ``"site"`` (B,) int64 and ``"lesion"`` (B,) in {0, 1}.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["encoder_step"]


def encoder_step(batch: Mapping[str, torch.Tensor], i: int, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict[str, float]:
    """One multi-task step: age, volumes (MSE on standardised values), site (CE), lesion (BCE).

    ``model`` maps images to the dict of heads ``{"age", "site", "lesion", "volumes"}`` (an
    :class:`~gen3d_lessons.models.encoder.Encoder3D`). The four losses are summed with weight 1:
    with standardised regression targets each starts near 1, like the classification losses.
    ``scheduler``, if given, takes one step after each update.
    """
    device = next(model.parameters()).device
    # 1. data
    b = {k: v.to(device) for k, v in batch.items()}
    # 2. forward: every head from the same features
    model.train()
    out = model(b["image"])
    # 3. one loss per task
    losses = {"age": F.mse_loss(out["age"], b["age"]),
              "site": F.cross_entropy(out["site"], b["site"]),
              "lesion": F.binary_cross_entropy_with_logits(out["lesion"], b["lesion"]),
              "volumes": F.mse_loss(out["volumes"], b["volumes"])}
    loss = sum(losses.values())
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
