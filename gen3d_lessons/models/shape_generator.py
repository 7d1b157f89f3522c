"""New hearts of a class from the few of that class one has (chapter 8): a conditional VAE of deformations.

A VAE that decodes label maps voxel by voxel has to learn to draw a thin myocardium from the
hearts it is given; with a few labelled hearts per class that is a lot to ask. A deformation keeps
the anatomy by construction: a new
heart is a labelled heart of the class, *warped*. What is learned is the distribution of the
warps: how hearts of one class differ from each other. That is a conditional VAE over
deformations, as in Krebs et al. (2019) for registration and Zhao et al. (2019) for
augmentation:

1. **encoder** ``q(z | source, target, c)``: reads two hearts of the same class ``c`` (ED and ES
   label maps, one-hot, on a grid ``train_size``³) and returns the Gaussian of a small code ``z``;
2. **decoder**: the source pooled to a coarse ``flow_grid``³ grid, the class and ``z`` (both
   broadcast over the grid) -> two stationary velocity fields (one for ED, one for ES), integrated
   by scaling and squaring into diffeomorphisms (:func:`gen3d_lessons.spatial.integrate_velocity`),
   brought up to the label grid (:func:`gen3d_lessons.spatial.resize_displacement`) and used to
   warp the source's one-hot labels (:func:`gen3d_lessons.spatial.warp`);
3. **sampling**: a labelled heart of the class, ``z ~ N(0, I)``, decode, argmax: a new heart of
   the class whose shape varies the way the class's hearts vary.

Training pairs every labelled heart with every other heart of its class
(:func:`gen3d_lessons.training.classification.deformation_cvae_step`: cross-entropy and soft Dice of
the warped source against the target, ``beta`` KL, a smoothness penalty on the velocities).

Shapes: one-hot labels ``(B, F * L, D, H, W)`` frame-major (F = 2 frames, L = 4 labels), classes
``(B,)`` int64, codes ``(B, Z)``, velocities ``(B, F * 3, g, g, g)`` in voxels of the coarse grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import spatial
from ..blocks import conv_norm_act
from .shape_classifier import one_hot_hearts

__all__ = ["DeformationCVAEConfig", "DeformationCVAE", "most_likely_labels", "warp_frames"]


@dataclass(frozen=True)
class DeformationCVAEConfig:
    """Everything that builds a :class:`DeformationCVAE`."""

    frames: int = 2                             # ED and ES
    labels: int = 4                             # background, RV, MYO, LV
    classes: int = 5                            # NOR, HCM, DCM, MINF, ARV
    latent_dim: int = 8                         # Z
    channels: tuple[int, ...] = (16, 32, 32)    # the encoder's widths, one stride-2 convolution each
    hidden: int = 32                            # the decoder's width (on the coarse grid)
    train_size: int = 16                        # the grid the encoder reads (the labels are pooled to it)
    flow_grid: int = 8                          # the grid of the velocity fields
    gain: float = 0.5                           # velocities = gain x the decoder's output

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if min(self.frames, self.latent_dim, self.hidden, self.flow_grid) < 1 or self.labels < 2 or self.classes < 1:
            raise ValueError(f"DeformationCVAEConfig: expected positive sizes, labels >= 2 and classes >= 1, got {self}")
        if not self.channels or min(self.channels) < 1 or self.train_size % 2 ** len(self.channels):
            raise ValueError(f"DeformationCVAEConfig: train_size {self.train_size} must be divisible by "
                             f"2^{len(self.channels)} (one halving per encoder channel)")


def most_likely_labels(fractions: torch.Tensor, frames: int = 2) -> torch.Tensor:
    """Label fractions or probabilities (B, F * L, D, H, W) -> label volumes (B, F, D, H, W), the largest per voxel.

    (``argmax`` over a middle dimension is slow on a CPU; the labels are moved last first.)"""
    b, k = fractions.shape[:2]
    x = fractions.reshape(b, frames, k // frames, *fractions.shape[2:])
    return x.movedim(2, -1).contiguous().argmax(-1)


def warp_frames(fractions: torch.Tensor, velocities: torch.Tensor, frames: int = 2) -> torch.Tensor:
    """Warp every frame of one-hot hearts or label fractions (B, F * L, D, H, W) by its own stationary
    velocity field (B, F * 3, g, g, g) (voxels of the coarse grid ``g``³): scaling and squaring on the
    coarse grid, the displacement brought up to the label grid, linear interpolation. Same shape out."""
    b, g = len(fractions), velocities.shape[2:]
    u = spatial.integrate_velocity(velocities.reshape(b * frames, 3, *g))
    u = spatial.resize_displacement(u, fractions.shape[2:])
    return spatial.warp(fractions.reshape(b * frames, -1, *fractions.shape[2:]), u).reshape(fractions.shape)


class DeformationCVAE(nn.Module):
    """``encode(source, target, c) -> (mu, logvar)``; ``decode(source, z, c) -> (warped one-hot, velocities)``;
    ``sample(source_labels, c, generator) -> label volumes``."""

    def __init__(self, cfg: DeformationCVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DeformationCVAEConfig()
        k = cfg.frames * cfg.labels
        widths = (2 * k + cfg.classes, *cfg.channels)
        self.encoder = nn.Sequential(*[conv_norm_act(a, b, stride=2, norm="instance", act=nn.LeakyReLU(0.2))
                                       for a, b in zip(widths[:-1], widths[1:])])
        self.to_stats = nn.Linear(cfg.channels[-1] * (cfg.train_size // 2 ** len(cfg.channels)) ** 3, 2 * cfg.latent_dim)
        self.decoder = nn.Sequential(
            conv_norm_act(k + cfg.classes + cfg.latent_dim, cfg.hidden, norm="instance", act=nn.LeakyReLU(0.2)),
            conv_norm_act(cfg.hidden, cfg.hidden, norm="instance", act=nn.LeakyReLU(0.2)),
            nn.Conv3d(cfg.hidden, 3 * cfg.frames, 3, padding=1))
        nn.init.zeros_(self.decoder[-1].weight)          # start from the identity: no deformation
        nn.init.zeros_(self.decoder[-1].bias)

    def _check(self, x: torch.Tensor, c: torch.Tensor, name: str) -> torch.Tensor:
        k = self.cfg.frames * self.cfg.labels
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != k:
            raise ValueError(f"{name}: expected one-hot hearts (B, {k}, D, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not isinstance(c, torch.Tensor) or c.shape != (len(x),) or c.is_floating_point():
            raise ValueError(f"c: expected one class index per heart, shape ({len(x)},), got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if len(c) and (c.min() < 0 or c.max() >= self.cfg.classes):
            raise ValueError(f"c: expected class indices 0..{self.cfg.classes - 1}, got {int(c.min())}..{int(c.max())}")
        return F.one_hot(c.long(), self.cfg.classes).float()

    @staticmethod
    def _broadcast(h: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, *(v[:, :, None, None, None].expand(-1, -1, *h.shape[2:]) for v in vectors)], 1)

    def encode(self, source: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | source, target, c) on the ``train_size``³ grid: mean and log-variance, (B, Z) each."""
        onehot_c = self._check(source, c, "source")
        self._check(target, c, "target")
        n = self.cfg.train_size
        pair = F.adaptive_avg_pool3d(torch.cat([source, target], 1), n)
        h = self.encoder(self._broadcast(pair, onehot_c)).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-8.0, 4.0)

    def velocities(self, source: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The stationary velocity fields of every frame, (B, F * 3, g, g, g), in voxels of the coarse grid."""
        onehot_c = self._check(source, c, "source")
        if z.ndim != 2 or z.shape != (len(source), self.cfg.latent_dim):
            raise ValueError(f"z: expected codes ({len(source)}, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        coarse = F.adaptive_avg_pool3d(source, self.cfg.flow_grid)
        return self.cfg.gain * self.decoder(self._broadcast(coarse, onehot_c, z))

    def decode(self, source: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp every frame of ``source`` (one-hot or label fractions, (B, F * L, D, H, W)) by its
        deformation: returns the warped fractions (same shape) and the velocities."""
        v = self.velocities(source, z, c)
        return warp_frames(source, v, self.cfg.frames), v

    def forward(self, source: torch.Tensor, target: torch.Tensor, c: torch.Tensor):
        """Training pass on the ``train_size``³ grid: (warped source, target, mu, logvar, velocities)."""
        n = self.cfg.train_size
        source, target = F.adaptive_avg_pool3d(source, n), F.adaptive_avg_pool3d(target, n)
        mu, logvar = self.encode(source, target, c)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        warped, v = self.decode(source, z, c)
        return warped, target, mu, logvar, v

    @torch.no_grad()
    def sample(self, source_labels: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None,
               batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """New hearts: each source heart (B, F, D, H, W) int warped by a deformation with ``z ~ N(0, I)``.

        Returns the label volumes (same shape, the most likely label of every voxel) and the
        velocities (B, F * 3, g, g, g), in batches of ``batch_size``."""
        self.eval()
        device = next(self.parameters()).device
        z = torch.randn(len(source_labels), self.cfg.latent_dim, generator=generator)
        labels, velocities = [], []
        for i in range(0, len(source_labels), batch_size):
            x = one_hot_hearts(source_labels[i:i + batch_size], self.cfg.labels).to(device)
            warped, v = self.decode(x, z[i:i + batch_size].to(device), c[i:i + batch_size].to(device))
            labels.append(most_likely_labels(warped, self.cfg.frames).cpu())
            velocities.append(v.cpu())
        return torch.cat(labels), torch.cat(velocities)
