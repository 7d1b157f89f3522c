"""The 3D U-Net (Ronneberger et al. 2015; Çiçek et al. 2016), written out so it can be read.

An encoder halves the grid ``len(features) - 1`` times while it doubles the channels; a decoder
brings the grid back up, and at every level it concatenates the encoder's features of the same
size (the *skip connections*), so that fine detail lost by pooling is available again where
boundaries are drawn. A 1×1×1 convolution turns the last features into one score (logit) per
class and voxel::

    x (B, C_in, D, H, W)
      └ block(f0) ─────────────────────────────── skip ─┐
          └ pool, block(f1) ────────────── skip ─┐       │
              └ pool, block(f2) ─ skip ─┐        │       │
                  └ pool, block(f3)  → up, cat, block(f2) → up, cat, block(f1) → up, cat, block(f0)
                      (bottleneck)                                                   └ 1×1×1 conv
                                                                          logits (B, C_out, D, H, W)

``D``, ``H`` and ``W`` must be divisible by ``2 ** (len(features) - 1)``: :func:`pad_to_multiple`
pads a volume that is not. MONAI's ``BasicUNet`` is the same design with fixed five levels;
this one takes any number of levels and exposes :meth:`UNet3D.encode` and :meth:`UNet3D.decode`
separately, because the chapter's VAE-regularised U-Net hangs a second decoder on the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .efficient import CONVS, conv_block, neighbour_slices


@dataclass(frozen=True)
class UNetConfig:
    """Everything that builds a :class:`UNet3D` (saved with its weights).

    ``norm``: instance normalisation (the default) computes its statistics over the input it is
    given, which suits a network that sees whole volumes in training and at test time. A network
    trained on small crops and then run on whole volumes needs ``norm="batch"``: a crop inside the
    brain has other statistics than a volume that is mostly background, and batch normalisation
    keeps running averages from training and uses those at test time (chapter 10).
    """

    in_channels: int = 1                      # image channels, e.g. 2 for (T1, FLAIR)
    out_channels: int = 4                     # classes, background included
    features: tuple[int, ...] = (8, 16, 32, 64)   # channels per level, top to bottom (the last is the bottleneck)
    norm: str = "instance"                    # "instance" | "batch" | "none" (see above)
    dropout: float = 0.0                      # dropout in the bottleneck block
    conv: str = "full"                        # the blocks' unit: "full" 3×3×3, or a cheaper one (models/efficient.py)
    slices: int = 2                           # conv="2.5d" only: neighbouring slices on each side, stacked as channels

    def __post_init__(self):
        # a config loaded back from a file holds lists: keep it hashable and equal to the original
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"UNetConfig: in_channels and out_channels must be >= 1, got "
                             f"{self.in_channels} and {self.out_channels}")
        if len(self.features) < 2 or min(self.features) < 1:
            raise ValueError(f"UNetConfig.features: expected at least two positive channel counts, got {self.features}")
        if self.norm not in ("instance", "batch", "none"):
            raise ValueError(f"UNetConfig.norm: expected 'instance', 'batch' or 'none', got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout: expected a value in [0, 1), got {self.dropout}")
        if self.conv not in CONVS or self.slices < 0:
            raise ValueError(f"UNetConfig.conv: expected one of {CONVS} (and slices >= 0), got {self.conv!r}, "
                             f"slices={self.slices}")

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this: one halving per level below the top."""
        return 2 ** (len(self.features) - 1)


class UNet3D(nn.Module):
    """A 3D U-Net: ``forward(x)`` maps ``(B, C_in, D, H, W)`` images to ``(B, C_out, D, H, W)`` logits.

    Every level's ``block`` is a :class:`~gen3d_lessons.blocks.ConvBlock3d` (``cfg.conv="full"``) or
    one of the cheaper blocks of :mod:`gen3d_lessons.models.efficient` (chapter 15).
    """

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        f = cfg.features
        last = len(f) - 1
        block = lambda c_in, c_out, dropout=0.0: conv_block(cfg.conv, c_in, c_out, cfg.norm, dropout)   # noqa: E731
        # a 2.5D network pools within slices only, and sees each slice with its neighbours as channels
        self.pool = (1, 2, 2) if cfg.conv == "2.5d" else (2, 2, 2)
        c_in = cfg.in_channels * (2 * cfg.slices + 1) if cfg.conv == "2.5d" else cfg.in_channels
        # encoder: level 0 at full size, level k at 1 / 2**k
        self.down = nn.ModuleList([block(c_in, f[0])] + [block(f[k - 1], f[k], cfg.dropout if k == last else 0.0)
                                                          for k in range(1, len(f))])
        # decoder, from the bottleneck up: a 2×2×2 transposed convolution doubles the grid and maps
        # f[k] -> f[k-1] channels; after concatenation with the skip there are 2 f[k-1]
        self.up = nn.ModuleList([nn.ConvTranspose3d(f[k], f[k - 1], self.pool, stride=self.pool) for k in range(last, 0, -1)])
        self.merge = nn.ModuleList([block(2 * f[k - 1], f[k - 1]) for k in range(last, 0, -1)])
        self.head = nn.Conv3d(f[0], cfg.out_channels, 1)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected shape (B, {self.cfg.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.cfg.divisor for s in x.shape[2:]):
            raise ValueError(f"x: spatial shape {tuple(x.shape[2:])} must be divisible by {self.cfg.divisor} "
                             f"({len(self.cfg.features) - 1} halvings); pad with pad_to_multiple first")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features of every level, top first: ``[(B, f0, D, H, W), ..., (B, f_last, D/2^L, ...)]``.

        The last entry is the bottleneck.
        """
        self._check(x)
        feats = [self.down[0](neighbour_slices(x, self.cfg.slices) if self.cfg.conv == "2.5d" else x)]
        for block in self.down[1:]:
            feats.append(block(F.max_pool3d(feats[-1], self.pool)))   # halve the grid, then convolve
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, C_out, D, H, W)`` from the features that :meth:`encode` returned."""
        h = feats[-1]
        for up, merge, skip in zip(self.up, self.merge, reversed(feats[:-1])):
            h = merge(torch.cat([up(h), skip], dim=1))         # (B, 2 f_k, ...) -> (B, f_k, ...)
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial sides of ``(B, C, *S)`` up to multiples of ``multiple``.

    Returns the padded tensor and the slices that cut the original region back out of any
    ``(B, C', *S_padded)`` output: ``model(xp)[(..., *crop)]``.
    """
    spatial = x.shape[2:]
    extra = [(-s) % multiple for s in spatial]
    pad: list[int] = []
    for e in reversed(extra):              # F.pad wants the last axis first
        pad += [e // 2, e - e // 2]
    crop = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, spatial))
    return (F.pad(x, pad) if any(extra) else x), crop
