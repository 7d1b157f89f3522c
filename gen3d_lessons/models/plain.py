"""A plain encoder–decoder, written once for 2D and 3D: chapter 1 measures what the third
dimension costs on it (with :mod:`gen3d_lessons.training.benchmark`).

Shapes: ``x: (B, C, H, W)`` (``dims=2``) or ``(B, C, D, H, W)`` (``dims=3``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PlainNetConfig", "PlainEncoderDecoder"]


@dataclass(frozen=True)
class PlainNetConfig:
    dims: int = 3            # 2 for images, 3 for volumes
    in_channels: int = 1
    width: int = 16          # channels of the first level; doubled at each downsampling
    levels: int = 3          # number of resolution levels
    out_channels: int = 1


class PlainEncoderDecoder(nn.Module):
    """A small U-shaped conv net without skips, written once for 2D and 3D.

    The same code builds both, so the comparison isolates the one thing that changes: a k×k kernel
    becomes k×k×k, and a feature map of n² pixels becomes one of n³ voxels.
    """

    def __init__(self, cfg: PlainNetConfig):
        super().__init__()
        if cfg.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {cfg.dims}")
        conv = nn.Conv2d if cfg.dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if cfg.dims == 2 else nn.ConvTranspose3d
        norm = nn.InstanceNorm2d if cfg.dims == 2 else nn.InstanceNorm3d
        widths = [cfg.width * 2 ** i for i in range(cfg.levels)]
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for i, w in enumerate(widths):                      # encoder: conv, then halve the size
            layers += [conv(c_in, w, 3, padding=1), norm(w, affine=True), nn.LeakyReLU(0.2)]
            if i < len(widths) - 1:
                layers += [conv(w, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = w
        for w in reversed(widths[:-1]):                     # decoder: double the size, conv
            layers += [up(c_in, w, 2, stride=2), conv(w, w, 3, padding=1), norm(w, affine=True), nn.LeakyReLU(0.2)]
            c_in = w
        layers.append(conv(c_in, cfg.out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, C, H, W) or (B, C, D, H, W)
        return self.net(x)
