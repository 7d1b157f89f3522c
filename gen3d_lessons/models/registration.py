"""VoxelMorph-style learned registration (Balakrishnan et al. 2019; Dalca et al. 2019).

A small U-Net looks at the moving and the fixed image side by side and predicts, in one pass, a
deformation field; a spatial transformer (:func:`gen3d_lessons.spatial.warp`) pulls the moving image
through it. Two choices set the variant:

- ``diffeomorphic=False``: the network's output *is* the displacement ``u``;
- ``diffeomorphic=True``: the output is a stationary velocity field ``v`` and the displacement is
  its exponential ``phi = exp(v)``, computed by scaling and squaring
  (:func:`gen3d_lessons.spatial.integrate_velocity`), which cannot fold space.

The field can live on a coarser grid than the images (``flow_level``: half the size per level):
anatomy moves smoothly, so a 16³ field upsampled to 32³ loses little, cuts the decoder's work
and acts as a built-in smoothness prior.

Two options make the network learn faster on a small budget (both off by default, which is the
published VoxelMorph):

- ``force_input``: besides the two images, the network sees the *force* that pulls the moving image
  towards the fixed one, the negative gradient of their squared difference with respect to the
  displacement, ``(f - m) ∇m`` (Thirion's demons force), raw and demons-normalised
  (:func:`similarity_force`). Turning a force into a smooth field is a local, nearly linear job that
  convolutions learn in a few hundred steps; discovering the product ``(f - m) ∇m`` on their own
  takes them thousands;
- ``cascade``: the network is applied ``cascade`` times with shared weights, each pass registering
  the moving image *as warped so far* and composing its field with the previous ones (the recursive
  cascades of VTN, Zhao et al. 2019). Later passes see smaller residual motions, which are easier.

Conventions follow :mod:`gen3d_lessons.spatial`: images (B, C, D, H, W), fields (B, 3, D, H, W) in
voxels, ``warped(x) = moving(x + u(x))``, so ``u`` lives on the fixed image's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import spatial
from ..blocks import conv_norm_act


@dataclass(frozen=True)
class RegistrationConfig:
    in_channels: int = 1                      # channels of *each* image; the network sees 2 * in_channels
    features: tuple[int, ...] = (16, 32, 32, 32)  # encoder width per level; level k runs at size / 2**k
    flow_level: int = 1                       # the field is predicted at level k: a grid of size / 2**k
    diffeomorphic: bool = False               # predict a velocity v and integrate it: phi = exp(v)
    integration_steps: int = 7                # scaling and squaring: v / 2**steps, then squared steps times
    norm: bool = False                        # instance normalisation after every convolution (VoxelMorph has none)
    force_input: bool = False                 # also feed the demons force (f - m) ∇m: 6 more input channels
    cascade: int = 1                          # passes of the same network, each on the moving image warped so far

    def __post_init__(self):
        if self.in_channels < 1:
            raise ValueError(f"in_channels: expected a positive integer, got {self.in_channels}")
        if len(self.features) < 2 or min(self.features) < 1:
            raise ValueError(f"features: expected at least two positive widths, got {self.features}")
        if not 0 <= self.flow_level < len(self.features):
            raise ValueError(f"flow_level: expected 0..{len(self.features) - 1} (a level of the U-Net), "
                             f"got {self.flow_level}")
        if self.integration_steps < 0:
            raise ValueError(f"integration_steps: expected >= 0, got {self.integration_steps}")
        if self.cascade < 1:
            raise ValueError(f"cascade: expected at least one pass, got {self.cascade}")


class RegistrationOutput(NamedTuple):
    field: torch.Tensor          # what the network predicts in its last pass, (B, 3, *S / 2**flow_level): v or u
    displacement: torch.Tensor   # u on the fixed image's grid (all passes composed), (B, 3, D, H, W), voxels
    warped: torch.Tensor         # moving(x + u(x)), (B, C, D, H, W)


def similarity_force(moving: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The pull of ``fixed`` on ``moving``, (B, C, *S) each -> (B, 6, *S): raw, then demons-normalised.

    For ``E(u) = ½ Σ_c (f_c(x) - m_c(x + u))²`` the steepest descent direction at ``u = 0`` is
    ``F = Σ_c (f_c - m_c) ∇m_c`` (3 channels): move where the moving image's edges must go to
    match. Demons divides it by ``|∇m|² + (f - m)²`` (Thirion 1998), which turns it into a
    displacement of at most half a voxel per unit of intensity difference: 3 more channels.
    """
    grad = torch.stack(torch.gradient(moving, dim=tuple(range(2, moving.ndim))), dim=2)   # (B, C, 3, *S)
    diff = fixed - moving                                                                # (B, C, *S)
    force = (diff.unsqueeze(2) * grad).sum(dim=1)                                        # (B, 3, *S)
    denominator = grad.pow(2).sum(dim=(1, 2)) + diff.pow(2).sum(dim=1) + eps             # (B, *S)
    return torch.cat([force, force / denominator.unsqueeze(1)], dim=1)                   # (B, 6, *S)


def _conv(c_in: int, c_out: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    """3x3x3 convolution and LeakyReLU(0.2), VoxelMorph's only building block; optionally normalised."""
    return conv_norm_act(c_in, c_out, 3, stride, norm="instance" if norm else "none", act=nn.LeakyReLU(0.2))


class VoxelMorph(nn.Module):
    """U-Net (encoder to ``size / 2**(L-1)``, decoder back to ``size / 2**flow_level``) + field head."""

    def __init__(self, cfg: RegistrationConfig = RegistrationConfig()):
        super().__init__()
        self.cfg = cfg
        f = cfg.features
        c_in = 2 * cfg.in_channels + (6 if cfg.force_input else 0)
        # encoder: level 0 at full size, every further level halves the grid with a strided conv
        self.down = nn.ModuleList([_conv(c_in, f[0], norm=cfg.norm)] +
                                  [_conv(f[k - 1], f[k], stride=2, norm=cfg.norm) for k in range(1, len(f))])
        # decoder: from the deepest level up to flow_level, each step upsamples and joins the skip
        self.up = nn.ModuleList([_conv(f[k + 1] + f[k], f[k], norm=cfg.norm)
                                 for k in reversed(range(cfg.flow_level, len(f) - 1))])
        # field head: starts near zero so that training begins from the identity map (as VoxelMorph)
        self.head = nn.Conv3d(f[cfg.flow_level], 3, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise if a (D, H, W) grid cannot be halved ``len(features) - 1`` times."""
        k = 2 ** (len(self.cfg.features) - 1)
        if len(shape) != 3 or any(s % k for s in shape):
            raise ValueError(f"VoxelMorph: the spatial shape must be 3D with every side divisible by {k} "
                             f"(this network halves the grid {len(self.cfg.features) - 1} times), got {tuple(shape)}")

    def predict_field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The network alone: v (or u) on the coarse grid, (B, 3, *S / 2**flow_level), in coarse voxels."""
        # 1. encoder on the pair stacked along channels: (B, 2C, D, H, W), or (B, 2C + 6, ...) with the force
        inputs = [moving, fixed] + ([similarity_force(moving, fixed)] if self.cfg.force_input else [])
        x = torch.cat(inputs, dim=1)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        # 2. decoder: upsample x2, concatenate the encoder's map of that size, convolve
        for block, skip in zip(self.up, reversed(skips[self.cfg.flow_level:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        # 3. three output channels: one displacement (or velocity) component per axis
        return self.head(x)

    def field_to_displacement(self, field: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """u on the image grid: integrate ``exp(v)`` on the coarse grid if diffeomorphic, then upsample."""
        if self.cfg.diffeomorphic:
            field = spatial.integrate_velocity(field, self.cfg.integration_steps)
        if tuple(field.shape[2:]) != tuple(shape):
            field = spatial.resize_displacement(field, shape)  # also rescales coarse voxels to fine ones
        return field

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` (B, C, D, H, W) to ``fixed`` (same shape); u lives on fixed's grid."""
        if moving.shape != fixed.shape or moving.ndim != 5 or moving.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VoxelMorph: expected moving and fixed of one shape (B, {self.cfg.in_channels}, D, H, W), "
                             f"got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        shape = tuple(fixed.shape[2:])
        self.check_shape(shape)
        u, warped = None, moving
        for _ in range(self.cfg.cascade):
            # 1. predict a field for what is left to register, and turn it into a displacement
            field = self.predict_field(warped, fixed)
            du = self.field_to_displacement(field, shape)
            # 2. compose with the passes before: warp(warp(m, u), du) = warp(m, u ∘ du)
            u = du if u is None else spatial.compose(u, du)
            # 3. the spatial transformer: resample the *original* moving image once, through all passes
            warped = spatial.warp(moving, u)
        return RegistrationOutput(field, u, warped)
