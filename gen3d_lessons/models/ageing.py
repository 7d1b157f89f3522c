"""Counterfactual ageing by deformation (chapter 9), in the spirit of CounterSynth (Pombo et al. 2023).

:class:`AgeingNet` answers "this brain, at another age": a U-Net sees the volume, its age and the
age asked for, and returns a smooth **deformation** of the volume plus a small **intensity
change**. A deformation can only move tissue that is there, so the answer keeps the subject's
anatomy, scanner and noise by construction; what the network learns is where tissue moves as
a brain ages (the ventricles widen, the cortex thins).

How the output is built, for a change of ``Δ = target − age`` years:

1. the U-Net's first three output channels, smoothed by a Gaussian (``smooth_vox``), are a
   velocity field ``w``; with ``keep_outline`` it is multiplied by the smoothed brain mask, so
   that the outline of the brain stays where it is (the skull does not move with age), and the
   intensity change below is zero outside the mask;
2. the velocity is ``v = (Δ / years_unit) · w`` and the displacement its exponential,
   ``φ = exp(v)`` (scaling and squaring, :func:`~gen3d_lessons.spatial.integrate_velocity`):
   a diffeomorphism, and no change at all for ``Δ = 0``;
3. the fourth channel, bounded by ``tanh``, is an intensity change
   ``δ = (Δ / years_unit) · max_intensity · tanh(h)`` (``max_intensity = 0``: deformation only);
4. the answer is ``x' = clamp(x ∘ φ + δ, 0, 1)``.

Both the field and the intensity change are linear in ``Δ`` at the output, so asking for the
observed age returns the volume untouched, whatever the network has learned. The ages enter
the U-Net standardised (``age_mean``, ``age_std``), as two constant channels.

Shapes: ``x, mask: (B, 1, D, H, W)``, ``age, target: (B,)`` in years; sides divisible by
``2 ** (len(features) - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import spatial
from .unet import UNet3D, UNetConfig

__all__ = ["AgeingConfig", "AgeingOutput", "AgeingNet"]


@dataclass(frozen=True)
class AgeingConfig:
    """Everything that builds an :class:`AgeingNet` (saved with its weights)."""

    features: tuple[int, ...] = (8, 16, 32)   # the U-Net's channels per level
    smooth_vox: float = 1.5                   # Gaussian smoothing of the velocity, in voxels
    integration_steps: int = 5                # scaling and squaring steps of exp(v)
    max_intensity: float = 0.02               # largest intensity change per years_unit (0: deformation only)
    keep_outline: bool = True                 # nothing moves or changes outside the brain mask
    years_unit: float = 20.0                  # Δ at which the field is the U-Net's output itself
    age_mean: float = 50.0                    # ages enter the U-Net as (age - age_mean) / age_std
    age_std: float = 20.0

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.smooth_vox < 0 or self.integration_steps < 0 or self.max_intensity < 0:
            raise ValueError(f"AgeingConfig: smooth_vox, integration_steps and max_intensity must be >= 0, got "
                             f"{self.smooth_vox}, {self.integration_steps}, {self.max_intensity}")
        if self.years_unit <= 0 or self.age_std <= 0:
            raise ValueError(f"AgeingConfig: years_unit and age_std must be positive, got {self.years_unit}, "
                             f"{self.age_std}")


class AgeingOutput(NamedTuple):
    image: torch.Tensor          # x' (B, 1, D, H, W)
    displacement: torch.Tensor   # φ - id (B, 3, D, H, W), voxels
    velocity: torch.Tensor       # v (B, 3, D, H, W), voxels
    intensity: torch.Tensor      # δ (B, 1, D, H, W)


def _years(a: Any, name: str, n: int, device: torch.device) -> torch.Tensor:
    a = torch.as_tensor(a, dtype=torch.float32, device=device).reshape(-1)
    if a.numel() == 1 and n > 1:
        a = a.expand(n)
    if a.numel() != n or not torch.isfinite(a).all():
        raise ValueError(f"{name}: expected {n} finite ages in years (one per volume), got {a.numel()} values"
                         + ("" if torch.isfinite(a).all() else " with NaN or inf"))
    return a


class AgeingNet(nn.Module):
    """``(x, age, target, mask) -> AgeingOutput``: the volume ``x`` as it would look at ``target``."""

    def __init__(self, cfg: AgeingConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AgeingConfig()
        self.unet = UNet3D(UNetConfig(in_channels=3, out_channels=4, features=cfg.features, norm="instance"))
        # the head starts at zero: an untrained network changes nothing (as VoxelMorph's field head)
        nn.init.zeros_(self.unet.head.weight)
        nn.init.zeros_(self.unet.head.bias)

    def forward(self, x: torch.Tensor, age: Any, target: Any, mask: torch.Tensor | None = None) -> AgeingOutput:
        cfg = self.cfg
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != 1 or not x.is_floating_point():
            raise ValueError(f"x: expected a float tensor (B, 1, D, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if cfg.keep_outline and (not isinstance(mask, torch.Tensor) or mask.shape != x.shape):
            raise ValueError(f"mask: keep_outline needs the brain mask, a tensor of shape {tuple(x.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        age, target = (_years(a, n, len(x), x.device) for a, n in ((age, "age"), (target, "target")))
        # 1. the U-Net on the volume and both ages (standardised, constant channels)
        chan = lambda a: ((a - cfg.age_mean) / cfg.age_std).view(-1, 1, 1, 1, 1).expand_as(x)  # noqa: E731
        h = self.unet(torch.cat([x, chan(age), chan(target)], dim=1))                         # (B, 4, D, H, W)
        # 2. velocity, smoothed, inside the brain, scaled by the years asked for; its exponential
        scale = ((target - age) / cfg.years_unit).view(-1, 1, 1, 1, 1)
        w = spatial.gaussian_blur(h[:, :3], cfg.smooth_vox) if cfg.smooth_vox > 0 else h[:, :3]
        if cfg.keep_outline:
            w = w * spatial.gaussian_blur(mask.to(x.dtype), 1.0)
        v = scale * w
        u = spatial.integrate_velocity(v, steps=cfg.integration_steps)
        # 3. a bounded intensity change, scaled the same way; 4. warp, add, clamp
        delta = scale * cfg.max_intensity * torch.tanh(h[:, 3:])
        if cfg.keep_outline:
            delta = delta * mask.to(x.dtype)                                  # nothing changes outside the brain
        return AgeingOutput((spatial.warp(x, u) + delta).clamp(0.0, 1.0), u, v, delta)

    @torch.no_grad()
    def counterfactual(self, x: torch.Tensor, age: Any, target: Any, mask: torch.Tensor | None = None,
                       batch_size: int = 8) -> torch.Tensor:
        """The answers alone, ``(B, 1, D, H, W)`` on ``x``'s device, in batches, in eval mode."""
        self.eval()
        device = next(self.parameters()).device
        n = len(x)
        age, target = (_years(a, k, n, torch.device("cpu")) for a, k in ((age, "age"), (target, "target")))
        out = [self(x[i:i + batch_size].to(device), age[i:i + batch_size], target[i:i + batch_size],
                    None if mask is None else mask[i:i + batch_size].to(device)).image.to(x.device)
               for i in range(0, n, batch_size)]
        return torch.cat(out)
