"""Cheaper units of work for the 3D U-Net (chapter 15, the survey's §4.3).

A :class:`~gen3d_lessons.models.unet.UNet3D` is built of blocks of two 3×3×3 convolutions. A full
3D convolution from ``c_in`` to ``c_out`` channels has ``27 c_in c_out`` weights and as many
multiply-adds per voxel; each unit here replaces it by something cheaper, and
``UNetConfig(conv=...)`` picks one for every block of the network:

* ``"full"``: the 3×3×3 convolution itself (:class:`~gen3d_lessons.blocks.ConvBlock3d`);
* ``"2+1d"``: a 1×3×3 convolution within each slice, then a 3×1×1 one across slices, each followed
  by normalisation and activation: the factorisation of S3D-style networks (the survey's
  S3D-UNet), ``9 c_in c_out + 3 c_out²`` weights;
* ``"depthwise"``: a 3×3×3 convolution of each channel on its own, then a 1×1×1 convolution that
  mixes the channels (depthwise separable, as in MobileNets), ``27 c_in + c_in c_out`` weights;
* ``"shuffle"``: after a 1×1×1 convolution to ``c_out`` channels, half of the channels pass
  untouched and the other half go through a 3×3×3 convolution; a channel shuffle then interleaves
  the halves, so the next unit convolves a mix of both (the channel split and shuffle of
  ShuffleNet v2, which Split&Shuffle-GAN carried to 3D), ``c_in c_out + 27 (c_out/2)²`` weights;
* ``"2.5d"``: 1×3×3 convolutions only, and pooling within slices, on an input that stacks each
  slice with its ``slices`` neighbours on either side as channels (:func:`neighbour_slices`): a
  2D network that sees a little of the third dimension, run on every slice at once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import ConvBlock3d, conv_norm_act

CONVS = ("full", "2+1d", "depthwise", "shuffle", "2.5d")


def _conv(c_in: int, c_out: int, kernel: tuple[int, int, int], norm: str) -> list[nn.Module]:
    """:func:`~gen3d_lessons.blocks.conv_norm_act` with "same" padding and the U-Net's LeakyReLU, as a
    list of its three layers (no bias before a norm)."""
    return list(conv_norm_act(c_in, c_out, kernel, padding=tuple(k // 2 for k in kernel), norm=norm, bias=norm == "none",
                              act=nn.LeakyReLU(0.01, inplace=True)))


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` groups of channels: (B, g·n, ...) → the channels reordered n-major."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x.view(b, self.groups, c // self.groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class SplitShuffleUnit(nn.Module):
    """Half of the channels through a 3×3×3 convolution, the other half untouched, then a shuffle."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        if channels % 2:
            raise ValueError(f"SplitShuffleUnit: expected an even number of channels, got {channels}")
        self.half = channels // 2
        self.conv = nn.Sequential(*_conv(self.half, self.half, (3, 3, 3), norm))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, changed = x[:, :self.half], x[:, self.half:]
        return self.shuffle(torch.cat([kept, self.conv(changed)], dim=1))


def conv_block(kind: str, c_in: int, c_out: int, norm: str = "instance", dropout: float = 0.0) -> nn.Module:
    """The U-Net's block of two convolutions, ``c_in`` → ``c_out`` channels, built of ``kind`` units
    (one of :data:`CONVS`; see the module's docstring)."""
    if kind == "full":
        return ConvBlock3d(c_in, c_out, norm, dropout)
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        if kind == "2+1d":
            layers += _conv(c, c_out, (1, 3, 3), norm) + _conv(c_out, c_out, (3, 1, 1), norm)
        elif kind == "depthwise":
            layers += [nn.Conv3d(c, c, 3, padding=1, groups=c, bias=False)] + _conv(c, c_out, (1, 1, 1), norm)
        elif kind == "shuffle":
            layers += (_conv(c, c_out, (1, 1, 1), norm) if c != c_out else []) + [SplitShuffleUnit(c_out, norm)]
        elif kind == "2.5d":
            layers += _conv(c, c_out, (1, 3, 3), norm)
        else:
            raise ValueError(f"conv: expected one of {CONVS}, got {kind!r}")
    if dropout > 0:
        layers.append(nn.Dropout3d(dropout))
    return nn.Sequential(*layers)


def neighbour_slices(x: torch.Tensor, slices: int) -> torch.Tensor:
    """Stack every slice (first spatial axis) with its ``slices`` neighbours on each side as channels.

    (B, C, D, H, W) → (B, C (2 slices + 1), D, H, W); the edges repeat the first and last slice.
    Channel block ``j`` holds the volume shifted by ``j - slices`` slices.
    """
    if x.ndim != 5:
        raise ValueError(f"x: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    if slices == 0:
        return x
    padded = torch.cat([x[:, :, :1].expand(-1, -1, slices, -1, -1), x, x[:, :, -1:].expand(-1, -1, slices, -1, -1)], 2)
    depth = x.shape[2]
    return torch.cat([padded[:, :, j:j + depth] for j in range(2 * slices + 1)], dim=1)
