"""Super-resolution of thick slices (chapter 9): a residual 3D CNN that works on the thick grid.

A scanner that takes ``factor`` times thicker slices records, per slab, the mean of ``factor``
fine slices. :class:`SRNet3D` turns such a volume ``(B, 1, D, H, d)`` (slices along the last
axis) into a fine one ``(B, 1, D, H, d · factor)``:

- every convolution runs on the **thick** grid, ``factor`` times fewer voxels than the fine one;
- the last convolution gives ``factor`` channels, one per fine slice inside a slab, which are
  then laid out along the slice axis (a one-axis *pixel shuffle*, the sub-pixel convolution of
  ESPCN and of ESRGAN's upsampler): the network knows where in its slab each fine slice lies;
- the result is added to the linear interpolation of the slabs (a **global residual**) and the
  last layer starts at zero, so an untrained network is linear interpolation, never worse.

The body is a stack of residual blocks (convolution, LeakyReLU, convolution, plus the block's
input), without normalisation, as in EDSR and ESRGAN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SRConfig", "SRNet3D"]


@dataclass(frozen=True)
class SRConfig:
    """Everything that builds an :class:`SRNet3D`."""

    factor: int = 3                 # fine slices per thick slice
    channels: int = 16              # features of the body
    blocks: int = 3                 # residual blocks
    negative_slope: float = 0.1     # LeakyReLU

    def __post_init__(self):
        if isinstance(self.factor, bool) or int(self.factor) != self.factor or self.factor < 2:
            raise ValueError(f"SRConfig.factor: expected an integer of at least 2, got {self.factor!r}")
        if self.channels < 1 or self.blocks < 0:
            raise ValueError(f"SRConfig: channels must be positive and blocks non-negative, got {self}")


class _Block(nn.Module):
    def __init__(self, c: int, slope: float):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.LeakyReLU(slope), nn.Conv3d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRNet3D(nn.Module):
    """``(B, 1, D, H, d) -> (B, 1, D, H, d · factor)``: linear interpolation plus a learned correction."""

    def __init__(self, cfg: SRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SRConfig()
        self.head = nn.Conv3d(1, cfg.channels, 3, padding=1)
        self.body = nn.Sequential(*[_Block(cfg.channels, cfg.negative_slope) for _ in range(cfg.blocks)])
        self.tail = nn.Conv3d(cfg.channels, cfg.factor, 3, padding=1)      # one channel per fine slice of a slab
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, thick: torch.Tensor) -> torch.Tensor:
        if thick.ndim != 5 or thick.shape[1] != 1:
            raise ValueError(f"thick: expected (B, 1, D, H, d) with slices along the last axis, got {tuple(thick.shape)}")
        f = self.cfg.factor
        b, _, d0, d1, d2 = thick.shape
        # 1. the linear interpolation: fine slice j sits at (j - (f - 1) / 2) / f on the slab axis
        base = F.interpolate(thick, size=(d0, d1, d2 * f), mode="trilinear", align_corners=False)
        # 2. the correction on the thick grid, f channels, laid out along the slice axis
        h = self.body(F.leaky_relu(self.head(thick), self.cfg.negative_slope))
        r = self.tail(h)                                                    # (B, f, D, H, d)
        r = r.permute(0, 2, 3, 4, 1).reshape(b, 1, d0, d1, d2 * f)          # slab k, sub-slice s -> k f + s
        return base + r
