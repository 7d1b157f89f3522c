"""Losses of chapter 11 that are not plain MSE: the WGAN-GP gradient penalty.

Kept in a file of its own so that the chapter does not depend on a shared ``losses`` module.
Pure functions of tensors, shapes ``(B, C, D, H, W)``.
"""

from __future__ import annotations

from typing import Callable

import torch


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017, their Eq. 3): ``E[(||∇_x̃ D(x̃)||₂ − 1)²]``.

    ``x̃ = ε real + (1 − ε) fake`` with one ``ε ~ U(0, 1)`` per sample, on the straight lines
    between real and generated volumes, where a 1-Lipschitz optimal critic has gradient norm 1.
    The graph is kept (``create_graph``) so that the penalty can be backpropagated into the critic.
    """
    if real.shape != fake.shape:
        raise ValueError(f"fake: shape {tuple(fake.shape)} does not match real {tuple(real.shape)}")
    # 1. random points between real and fake: eps is (B, 1, 1, 1, 1), broadcast over C, D, H, W
    eps = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), device=real.device, dtype=real.dtype)
    x_tilde = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    # 2. gradient of the critic's scores with respect to those points
    (grad,) = torch.autograd.grad(critic(x_tilde).sum(), x_tilde, create_graph=True)
    # 3. distance of each sample's gradient norm from 1
    norms = grad.flatten(1).norm(dim=1)                          # (B,)
    return ((norms - 1) ** 2).mean()
