"""The α-GAN pieces of 3D-α-WGAN-GP (Kwon et al. 2019; survey §3.1): an encoder and a code critic.

α-GAN (Rosca et al. 2017) joins a VAE-like autoencoder and a GAN. Four networks:

- the **generator** ``G(z)`` (any :class:`~gen3d_lessons.models.gan.Generator3D`) decodes codes to volumes;
- the **encoder** ``E(x)`` (:class:`VolumeEncoder`) maps a volume to a code, and ``G(E(x))`` must
  reconstruct ``x`` (an L1 loss): every training brain has a code that gives it back, which keeps
  the generator from dropping modes;
- the **critic** ``D(x)`` (a :class:`~gen3d_lessons.models.gan.Discriminator3D`) scores volumes,
  real ones high, both random samples ``G(z)`` and reconstructions ``G(E(x))`` low (WGAN-GP): the
  adversarial loss keeps the reconstructions and samples sharp, where an L1 loss alone would blur;
- the **code critic** ``C(z)`` (:class:`CodeCritic`) scores codes, random ones ``z ~ N(0, I)``
  high and encoded ones ``E(x)`` low: it replaces a VAE's KL term, pushing the encoded codes to
  look like the prior, so that random codes decode to brains.

Kwon et al. trained it on 3D brain MRI with WGAN-GP losses for both critics. The step function
is :func:`gen3d_lessons.training.gan.alpha_gan_step`.

Shapes: volumes ``(B, C, D, H, W)``, codes ``(B, Z)``, scores ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["VolumeEncoderConfig", "VolumeEncoder", "CodeCritic"]


@dataclass
class VolumeEncoderConfig:
    """Hyperparameters of :class:`VolumeEncoder`. ``channels[k]`` is the width after the k-th halving."""

    in_channels: int = 1                         # C
    size: int = 32                               # edge of the encoded cube
    channels: tuple[int, ...] = (16, 32, 64)     # 32³ -> 16³ -> 8³ -> 4³
    z_dim: int = 64                              # Z

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if min(self.in_channels, self.size, self.z_dim) < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"VolumeEncoderConfig: sizes and channels must be positive, got {self}")
        if self.size % 2 ** len(self.channels):
            raise ValueError(f"VolumeEncoderConfig: size {self.size} must be a multiple of 2**len(channels) = "
                             f"{2 ** len(self.channels)}")


class VolumeEncoder(nn.Module):
    """Volume (B, C, size³) -> code (B, Z): strided 4×4×4 convolutions (GroupNorm, LeakyReLU), then a
    linear layer. GroupNorm, not BatchNorm: each volume is encoded on its own."""

    def __init__(self, cfg: VolumeEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VolumeEncoderConfig()
        widths = (cfg.in_channels, *cfg.channels)
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv3d(a, b, 4, stride=2, padding=1), nn.GroupNorm(min(8, b), b), nn.LeakyReLU(0.2))
            for a, b in zip(widths[:-1], widths[1:])])
        self.to_code = nn.Linear(cfg.channels[-1] * (cfg.size // 2 ** len(cfg.channels)) ** 3, cfg.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != (cfg.size,) * 3:
            raise ValueError(f"x: expected shape (B, {cfg.in_channels}, {cfg.size}, {cfg.size}, {cfg.size}), "
                             f"got {tuple(x.shape)}")
        return self.to_code(self.features(x).flatten(1))                            # (B, Z)


class CodeCritic(nn.Module):
    """Code (B, Z) -> score (B,): an MLP of ``depth`` hidden layers of ``width`` units (LeakyReLU)."""

    def __init__(self, z_dim: int = 64, width: int = 256, depth: int = 2):
        super().__init__()
        if min(z_dim, width, depth) < 1:
            raise ValueError(f"CodeCritic: z_dim, width and depth must be positive, got {z_dim}, {width}, {depth}")
        self.z_dim = z_dim
        layers, a = [], z_dim
        for _ in range(depth):
            layers += [nn.Linear(a, width), nn.LeakyReLU(0.2)]
            a = width
        self.net = nn.Sequential(*layers, nn.Linear(a, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z: expected shape (B, {self.z_dim}), got {tuple(z.shape)}")
        return self.net(z)[:, 0]                                                      # (B,)
