"""A Shape + Texture generator (survey §3.1): a smooth deformation of a learned template, then texture.

Brains differ from one another mostly in *shape* — where the tissues are — and then in
*appearance* — the contrast and noise of a scanner. The survey's Shape+Texture GAN splits the two,
and our phantom cohort is made exactly that way (chapter 1: a random diffeomorphism of the
template, then rendering per site), so the split is the right inductive bias here:

1. **shape**: ``z_shape`` -> a stationary velocity field on a coarse grid (``flow_grid``³, at most
   ``max_velocity`` output voxels long) -> scaling and squaring on that grid
   (:func:`gen3d_lessons.spatial.integrate_velocity`) -> a diffeomorphic displacement ``u``, resized
   to the output grid (a smooth field loses nothing on a coarse grid, and costs 64 times less);
2. the **template** ``T``, a learned volume that starts at the average training brain, is warped:
   ``T(x + u(x))``;
3. **texture**: a small convolutional network adds a residual to the warped template, its
   features scaled and shifted per channel by ``z_texture`` (FiLM); its last layer starts at zero,
   so that a new generator draws the warped template and nothing else.

``z`` (B, Z) is ``[z_shape, z_texture]``, so any GAN step that draws ``z ~ N(0, I)`` trains it
(:func:`gen3d_lessons.training.gan.gan_step`). :meth:`ShapeTextureGenerator3D.deformation` returns
the displacement of a code, to be compared with the deformations that made the real brains.

Shapes: ``z: (B, Z)``, displacements ``(B, 3, D, H, W)`` in voxels, volumes ``(B, C, D, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import spatial
from ..blocks import check_condition, sample_from_prior, set_template

__all__ = ["ShapeTextureConfig", "ShapeTextureGenerator3D"]


@dataclass
class ShapeTextureConfig:
    """Hyperparameters of :class:`ShapeTextureGenerator3D`."""

    z_shape: int = 32                            # code of the deformation
    z_texture: int = 32                          # code of the appearance
    out_channels: int = 1
    size: int = 32                               # edge of the generated cube
    flow_grid: int = 8                           # edge of the grid the velocity field lives on
    flow_channels: int = 32                      # width of the velocity decoder
    max_velocity: float = 4.0                    # |v| <= this many output voxels (a tanh bound)
    init_velocity: float = 1.0                   # std of a new generator's velocities (output voxels)
    texture_channels: int = 16                   # width of the texture network
    integration_steps: int = 7
    output: str = "sigmoid"                      # "sigmoid": intensities in [0, 1] | "none"

    def __post_init__(self):
        if min(self.z_shape, self.z_texture, self.out_channels, self.flow_channels, self.texture_channels) < 1:
            raise ValueError(f"ShapeTextureConfig: codes and widths must be positive, got {self}")
        if self.flow_grid < 4 or self.flow_grid % 4 or self.size < self.flow_grid:
            raise ValueError(f"ShapeTextureConfig: flow_grid must be a multiple of 4, at least 4 and at most size, "
                             f"got flow_grid={self.flow_grid}, size={self.size}")
        if not self.max_velocity > 0 or self.integration_steps < 0 or not 0 < self.init_velocity < self.max_velocity:
            raise ValueError(f"ShapeTextureConfig: 0 < init_velocity < max_velocity and integration_steps >= 0, "
                             f"got {self}")
        if self.output not in ("sigmoid", "none"):
            raise ValueError(f"ShapeTextureConfig.output: expected 'sigmoid' or 'none', got {self.output!r}")

    @property
    def z_dim(self) -> int:
        return self.z_shape + self.z_texture


class ShapeTextureGenerator3D(nn.Module):
    """``z = [z_shape, z_texture]`` -> warp a learned template -> add texture -> volume."""

    def __init__(self, cfg: ShapeTextureConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ShapeTextureConfig()
        c, g = cfg.flow_channels, cfg.flow_grid
        # 1. shape: z_shape -> (c, g/4, g/4, g/4) -> two doublings -> velocity (3, g, g, g)
        self.to_grid = nn.Linear(cfg.z_shape, c * (g // 4) ** 3)
        self.flow = nn.Sequential(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                                  nn.Conv3d(c, c, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                                  nn.Conv3d(c, 3, 3, padding=1))
        # 2. the template, a learned volume (in logits with a sigmoid output)
        self.template = nn.Parameter(torch.zeros(1, cfg.out_channels, cfg.size, cfg.size, cfg.size))
        # 3. texture: conv on the warped template, FiLM by z_texture, conv to a residual (starts at 0)
        t = cfg.texture_channels
        self.texture_in = nn.Conv3d(cfg.out_channels, t, 3, padding=1)
        self.film = nn.Linear(cfg.z_texture, 2 * t)
        self.texture_out = nn.Conv3d(t, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.texture_out.weight), nn.init.zeros_(self.texture_out.bias)
        self._scale_velocities(cfg.init_velocity)

    @torch.no_grad()
    def _scale_velocities(self, std: float) -> None:
        """Scale the velocity decoder's last layer so that codes z ~ N(0, I) give velocities of about
        ``std`` output voxels: a new generator already draws deformations of a plausible size, for
        the critic to correct, instead of a fixed template the critic cannot make vary."""
        cfg, g = self.cfg, self.cfg.flow_grid // 4
        z = torch.randn(64, cfg.z_shape, generator=torch.Generator().manual_seed(0))
        v = self.flow(self.to_grid(z).view(-1, cfg.flow_channels, g, g, g))
        last = self.flow[-1]
        last.weight.mul_(std / float(v.std().clamp_min(1e-8)))
        last.bias.zero_()

    @torch.no_grad()
    def set_template(self, mean_volume: torch.Tensor) -> "ShapeTextureGenerator3D":
        """Start the template at the average training volume (C, D, H, W); returns the generator."""
        set_template(self.template, mean_volume, self.cfg.output == "sigmoid")
        return self

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if z.ndim != 2 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {cfg.z_dim}) = [z_shape, z_texture], got {tuple(z.shape)}")
        return z[:, :cfg.z_shape], z[:, cfg.z_shape:]

    def deformation(self, z: torch.Tensor) -> torch.Tensor:
        """The displacement (B, 3, size, size, size), in output voxels, that code ``z`` applies to the template."""
        cfg = self.cfg
        z_shape, _ = self._split(z)
        g = cfg.flow_grid // 4
        h = self.to_grid(z_shape).view(-1, cfg.flow_channels, g, g, g)                  # (B, c, g/4, g/4, g/4)
        v = cfg.max_velocity * torch.tanh(self.flow(h) / cfg.max_velocity)            # (B, 3, grid³), output voxels
        v = v * (cfg.flow_grid - 1) / (cfg.size - 1)                                   # ... in grid voxels
        u = spatial.integrate_velocity(v, cfg.integration_steps)                       # smooth: integrate coarse
        return spatial.resize_displacement(u, (cfg.size,) * 3)                         # (B, 3, size³), output voxels

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        check_condition(c, z.shape[0] if z.ndim == 2 else -1, 0, "generator")
        _, z_texture = self._split(z)
        u = self.deformation(z)                                                        # (B, 3, size³)
        template = self.template.expand(z.shape[0], -1, -1, -1, -1)
        warped = spatial.warp(template, u, padding_mode="border")                     # (B, C, size³) logits
        scale, shift = self.film(z_texture).chunk(2, dim=1)                            # (B, t) each
        h = F.leaky_relu(self.texture_in(warped), 0.2)
        h = h * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
        x = warped + self.texture_out(F.leaky_relu(h, 0.2))
        return torch.sigmoid(x) if self.cfg.output == "sigmoid" else x

    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes from fresh codes, in evaluation mode and without gradients."""
        return sample_from_prior(self, n, self.cfg.z_dim, c, generator)
