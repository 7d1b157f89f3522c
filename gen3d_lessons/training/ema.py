"""Exponential moving averages of a network's weights: ``θ_ema ← decay · θ_ema + (1 − decay) · θ``.

Samples from the averaged weights are usually smoother and more stable than from the last,
noisy iterate (Yazıcı et al. 2019). Two forms, one per way a chapter sets the decay:

- :func:`ema_update` moves a plain copy of the network (``copy.deepcopy(G).requires_grad_(False)``)
  with a decay given at each call, so the caller can warm it up (the GANs of chapter 3: an
  average that forgets the random initial weights within a few steps). Buffers (BatchNorm
  statistics) are copied.
- :func:`ema_of` wraps the network in torch's ``AveragedModel`` with a fixed decay; the first
  update copies the weights, later ones average (the diffusion models of chapter 5; the step
  calls ``ema.update_parameters(model)`` and samples with ``ema.module``).

Both are kept as they are: each chapter's recorded numbers come from its own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["ema_update", "ema_of"]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``θ_ema ← decay · θ_ema + (1 − decay) · θ`` for every parameter of a copy ``ema`` of ``model``;
    buffers (BatchNorm statistics) are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_of(model: nn.Module, decay: float = 0.999) -> AveragedModel:
    """An exponential moving average of ``model``'s weights: ``w_ema <- decay w_ema + (1 - decay) w``."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay: expected a value in (0, 1), got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
