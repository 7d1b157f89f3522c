"""Denoising networks for chapter 11: a residual encoder–decoder (RED) and a small 3D WGAN critic.

The generator follows the residual encoder–decoder idea of RED-CNN (Chen et al. 2017) and its
3D MRI descendant RED-WGAN (Ran et al. 2019): convolutions that go down in resolution, transposed
convolutions that come back up, and *shortcuts* that add each encoder feature map to the decoder
feature map of the same size. Two more choices make it train fast on a CPU:

- a **global residual**: the network predicts the correction ``r = f(x)`` and returns
  ``x + r``, so it only has to learn what the degradation did (noise and blur), not the anatomy;
- the last layer starts at **zero**, so an untrained network is the identity and its first
  PSNR is that of the low-dose input, never worse.

With ``shortcuts=False`` and ``residual=False`` the same class is a plain denoising autoencoder
(survey Eq. 9): everything has to pass through the coarsest feature map.

The critic is the discriminator of a Wasserstein GAN: no sigmoid, no batch norm (the gradient
penalty is computed per sample, which batch statistics would mix), a score per volume.

:func:`denoise` runs a trained network on one volume, with checks of what it is given.

Shapes: ``(B, C, D, H, W)`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn

from ..blocks import conv_norm_act
from .apply import checked_volume, run_on_volume

NORMS = ("group", "batch", "instance", "none")


# 1. The generator: residual encoder–decoder ---------------------------------------------------

@dataclass
class REDConfig:
    """Hyperparameters of :class:`RED3D`. ``channels[k]`` is the width at level ``k`` (level 0
    is full resolution; each further level halves the edge)."""

    in_channels: int = 1
    out_channels: int | None = None  # None: as many as in_channels. Fewer: the first out_channels
                                     # inputs are denoised, the others only inform (e.g. a 2nd contrast)
    channels: tuple[int, ...] = (16, 32, 64)
    shortcuts: bool = True           # add encoder features to the decoder (RED); False: plain DAE
    residual: bool = True            # return x + f(x) (predict the correction) instead of f(x)
    negative_slope: float = 0.1      # LeakyReLU
    unshuffle: int = 1               # space-to-depth factor applied to the input first (1: none)
    norm: str = "group"              # "group" | "batch" | "instance" | "none"

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"REDConfig: in_channels and every channel count must be positive, got {self}")
        if self.out_channels is not None and not 1 <= self.out_channels <= self.in_channels:
            raise ValueError(f"REDConfig.out_channels: expected None or 1..in_channels={self.in_channels}, "
                             f"got {self.out_channels}")
        if self.unshuffle < 1:
            raise ValueError(f"REDConfig: unshuffle must be a positive integer, got {self.unshuffle}")
        if self.norm not in NORMS:
            raise ValueError(f"REDConfig.norm: expected one of {NORMS}, got {self.norm!r}")

    @property
    def n_out(self) -> int:
        """Channels of the output volume."""
        return self.out_channels or self.in_channels


def _conv(c_in: int, c_out: int, slope: float, norm: str, stride: int = 1) -> nn.Sequential:
    """3×3×3 convolution (stride 2 halves the edge) + normalisation + LeakyReLU.

    ``norm="group"`` uses at most 4 groups: statistics per sample, the same in training and use.
    """
    return conv_norm_act(c_in, c_out, 3, stride, norm=norm, groups=min(4, c_out), act=nn.LeakyReLU(slope))


def _up(c_in: int, c_out: int, slope: float, norm: str) -> nn.Sequential:
    """2×2×2 transposed convolution with stride 2: doubles the edge exactly (no checkerboard overlap)."""
    return conv_norm_act(c_in, c_out, 2, stride=2, padding=0, transposed=True, norm=norm, groups=min(4, c_out),
                         act=nn.LeakyReLU(slope))


class RED3D(nn.Module):
    """Residual encoder–decoder: ``x_hat = x + f(x)`` with additive shortcuts at every level.

    Input edges must be divisible by :attr:`multiple` (:func:`denoise` pads any volume).
    """

    def __init__(self, cfg: REDConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or REDConfig()
        ch, s, n = cfg.channels, cfg.negative_slope, cfg.norm
        c_in = cfg.in_channels * cfg.unshuffle ** 3                # channels after space-to-depth
        self.stem = _conv(c_in, ch[0], s, n)
        self.down = nn.ModuleList(                               # level k -> k+1: halve, widen, refine
            nn.Sequential(_conv(ch[k], ch[k + 1], s, n, stride=2), _conv(ch[k + 1], ch[k + 1], s, n))
            for k in range(len(ch) - 1))
        self.up = nn.ModuleList(_up(ch[k + 1], ch[k], s, n) for k in reversed(range(len(ch) - 1)))
        self.refine = nn.ModuleList(_conv(ch[k], ch[k], s, n) for k in reversed(range(len(ch) - 1)))
        self.head = nn.Conv3d(ch[0], cfg.n_out * cfg.unshuffle ** 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)                         # start as the identity map
        nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        """Every input edge must be a multiple of this."""
        return self.cfg.unshuffle * 2 ** (len(self.cfg.channels) - 1)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
        # 0. space-to-depth: every p×p×p block of voxels becomes p³ channels of one coarser voxel
        p = self.cfg.unshuffle                                   # (FFDNet's reversible downsampling)
        x = rearrange(x, "b c (d p) (h q) (w r) -> b (c p q r) d h w", p=p, q=p, r=p)
        # 1. encoder: keep every level's features for the shortcuts
        h = self.stem(x)                                         # (B, ch0, D/p, H/p, W/p)
        skips = [h]
        for down in self.down:
            h = down(h)                                          # (B, ch[k+1], D/2^(k+1), ...)
            skips.append(h)
        # 2. decoder: up one level, add the encoder's features there (the RED shortcut), refine
        skips.pop()                                              # the bottleneck is h itself
        for up, refine in zip(self.up, self.refine):
            h = up(h)                                            # (B, ch[k], 2x the edge)
            skip = skips.pop()
            h = refine(h + skip if self.cfg.shortcuts else h)
        # 3. back to image channels, and depth-to-space
        r = self.head(h)                                         # (B, C_out p³, D/p, H/p, W/p)
        return rearrange(r, "b (c p q r) d h w -> b c (d p) (h q) (w r)", p=p, q=p, r=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised volumes (B, C_out, D, H, W) from degraded ones (B, C_in, D, H, W)."""
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"RED3D: expected (B, {self.cfg.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        if any(n % self.multiple for n in x.shape[2:]):
            raise ValueError(f"RED3D: every edge of {tuple(x.shape[2:])} must be a multiple of {self.multiple}")
        r = self.correction(x)
        return x[:, : self.cfg.n_out] + r if self.cfg.residual else r


# 2. The critic of the Wasserstein GAN ----------------------------------------------------------

@dataclass
class CriticConfig:
    """Hyperparameters of :class:`Critic3D`: strided convolutions of these widths, then a score."""

    in_channels: int = 1
    channels: tuple[int, ...] = (8, 16, 32)
    negative_slope: float = 0.2

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"CriticConfig: in_channels and every channel count must be positive, got {self}")


class Critic3D(nn.Module):
    """WGAN critic: (B, C, D, H, W) -> (B,) unbounded scores; higher means "looks like full dose".

    Each stage halves the edge; a global average of the last features keeps the critic
    independent of the input size, then one linear layer scores them.
    """

    def __init__(self, cfg: CriticConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CriticConfig()
        widths = (cfg.in_channels, *cfg.channels)
        self.features = nn.Sequential(*(
            nn.Sequential(nn.Conv3d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(cfg.negative_slope))
            for a, b in zip(widths[:-1], widths[1:])))
        self.score = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)                                     # (B, ch[-1], D/2^n, H/2^n, W/2^n)
        h = h.flatten(2).mean(-1)                                # (B, ch[-1])
        return self.score(h).squeeze(-1)                         # (B,)


# 3. Using a trained denoiser on one volume -----------------------------------------------------

@torch.no_grad()
def denoise(model: nn.Module, volume: Any, device: torch.device | str | None = None, flips: bool = False,
            intensity_range: tuple[float, float] = (-0.25, 1.25)) -> np.ndarray:
    """Denoise one volume with a trained :class:`RED3D` and return it as a float32 array.

    ``volume`` is a NumPy array or tensor of intensities scaled like the training data ([0, 1]):
    ``(D, H, W)`` for a one-channel network, ``(C, D, H, W)`` with ``C = cfg.in_channels``
    otherwise. Any edge length works: the volume is padded by edge replication to a multiple
    the network accepts, and cropped back. The result is ``(D, H, W)`` for a one-channel output,
    else ``(C_out, D, H, W)``. With ``flips=True`` the result is the mean over the 8 mirror
    images of the volume (each flipped, denoised, flipped back): the noise the network leaves
    differs between them and partly averages out, at 8 times the cost. Raises ``ValueError`` for a 2D image, a batch, the wrong number of
    channels, an integer/boolean/complex dtype, NaN or infinite values, or intensities outside
    ``intensity_range`` (the sign that the volume was not scaled to [0, 1]).
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, REDConfig):
        raise ValueError(f"model: expected a RED3D denoiser, got {type(model).__name__}")
    # 1. check and convert; 2. pad, denoise, crop back (see gen3d_lessons.models.apply)
    x = checked_volume(volume, cfg.in_channels, *intensity_range)              # (C, D, H, W)
    y = run_on_volume(model, x, model.multiple, device, flips, who="denoise")  # (C_out, D, H, W)
    return y[0] if cfg.n_out == 1 else y
