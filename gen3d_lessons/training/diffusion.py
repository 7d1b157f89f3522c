"""The step function of the diffusion family (chapter 5): one optimizer step on ``L_simple``.

Bind the network, its schedule and optimizer with :func:`functools.partial` and hand the result
to :func:`~gen3d_lessons.training.fit`; ``ema`` comes from :func:`~gen3d_lessons.training.ema.ema_of`::

    fit(partial(diffusion_step, model=net, schedule=schedule, optimizer=opt, ema=ema), loader, max_steps=...)

A batch is ``x_0`` itself — volumes ``(B, C, D, H, W)`` or latent vectors ``(B, Z)`` —, a one-element
list holding it (as a ``DataLoader`` over a ``TensorDataset`` yields), or a dict holding it under
``key`` (``"image"`` by default, as :class:`~gen3d_lessons.data.datasets.VolumeDataset` serves volumes).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..models.diffusion import NoiseSchedule


def _x0(batch: Any, key: str, device: torch.device) -> torch.Tensor:
    if isinstance(batch, (list, tuple)) and len(batch) == 1:       # a DataLoader over a TensorDataset
        batch = batch[0]
    x0 = batch[key] if isinstance(batch, Mapping) and key in batch else batch
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"batch: expected x_0 as a tensor (B, ...) or a dict with key {key!r}, "
                         f"got {type(batch).__name__}")
    return x0.to(device)


def diffusion_step(batch: Any, i: int, *, model: nn.Module, schedule: NoiseSchedule,
                   optimizer: torch.optim.Optimizer, ema: AveragedModel | None = None, key: str = "image",
                   clip_grad: float | None = 1.0) -> dict[str, float]:
    """One step on ``L_simple = || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||²``.

    Ho et al. (2020) Eq. 14: the variational bound of Eq. 10 with its per-step weights dropped,
    which trains better. ``ema`` (:func:`~gen3d_lessons.training.ema.ema_of` of ``model``) is
    updated after the step; sample with ``ema.module``: an exponential moving average of the
    weights gives smoother samples than the last, noisy iterate. ``clip_grad`` caps the gradient norm.
    """
    device = next(model.parameters()).device
    # 1. data x_0, a random step t ~ U{0..T-1} and noise eps ~ N(0, I) per sample
    x0 = _x0(batch, key, device)
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=device)
    eps = torch.randn_like(x0)
    # 2. forward process in one jump: x_t ~ q(x_t | x_0)
    x_t = schedule.q_sample(x0, t, eps)
    # 3. L_simple: how well the network recovers the noise
    model.train()
    loss = F.mse_loss(model(x_t, t), eps)
    # 4. update (and the moving average of the weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if ema is not None:
        ema.update_parameters(model)
    return {"loss": loss.item()}


__all__ = ["diffusion_step"]
