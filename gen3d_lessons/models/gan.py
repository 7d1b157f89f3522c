"""GANs in 3D (survey §2.3): a generator, a discriminator / critic, and the pieces of pix2pix and CycleGAN.

A GAN (Goodfellow et al. 2014) is two networks in a game. The **generator** ``G`` maps a random
code ``z ~ N(0, I)`` to a volume ``G(z)``; the **discriminator** ``D`` scores volumes, high for
real ones and low for generated ones. Each is trained against the other (the losses and step
functions are in :mod:`gen3d_lessons.training.gan`). Everything here is a plain network:

- :class:`Generator3D` — ``z`` (and a condition ``c``, survey Eq. 2) to a volume. It grows a
  4³ grid to the output size by *upsampling then convolving*, not by transposed convolutions:
  a stride-2 transposed 3×3×3 or 4×4×4 kernel covers some output voxels more often than others,
  which prints a checkerboard on the volume (Odena et al. 2016).
- :class:`Discriminator3D` — a volume (and ``c``) to one score per volume: a logit for the
  vanilla GAN (Eq. 1), an unbounded *critic* value for the WGAN-GP (Eq. 5). No batch norm: the
  gradient penalty is computed per sample, and batch statistics would mix the samples. A
  condition enters by **projection** (Miyato & Koyama 2018: ``D(x, c) = ψ(φ(x)) + <E c, φ(x)>``)
  or by **concatenation** as constant extra input channels (Mirza & Osindero 2014).
- pix2pix (Eq. 3) and CycleGAN (Eq. 4) reuse the book's :class:`~gen3d_lessons.models.unet.UNet3D`
  as generator and the 3D PatchGAN (:class:`~gen3d_lessons.blocks.PatchDiscriminator3D`)
  through :class:`PatchCritic3D`, which judges one volume or a concatenated pair.

The StyleGAN2-style generator is in :mod:`gen3d_lessons.models.stylegan`.

Shapes: ``z: (B, Z)``, ``c: (B, K)``, volumes ``(B, C, D, H, W)``, scores ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import (PatchDiscriminator3D, PatchDiscriminatorConfig, check_condition, conv_norm_act, norm,
                      sample_from_prior, set_template)

__all__ = ["GeneratorConfig", "Generator3D", "DiscriminatorConfig", "Discriminator3D", "PatchCritic3D",
           "PatchDiscriminatorConfig"]   # the last: PatchCritic3D's config, from blocks


# 1. The generator ------------------------------------------------------------------------------

@dataclass
class GeneratorConfig:
    """Hyperparameters of :class:`Generator3D`.

    ``channels[k]`` is the width of the feature map of edge ``start · 2**k``. The output edge
    ``size`` is either the last feature map's edge or twice it: in the second case the last
    doubling is only an interpolation followed by the 3×3×3 convolution to the image, because
    on a CPU a full-width convolution at the output resolution would cost more than the rest
    of the network together. The defaults: 64 channels at 4³, 32 at 8³, 16 at 16³, image at 32³.
    """

    z_dim: int = 64                              # Z
    cond_dim: int = 0                            # K: 0 unconditional; > 0: c is concatenated to z (Eq. 2)
    out_channels: int = 1                        # C
    size: int = 32                               # edge of the generated cube
    start: int = 4                               # edge of the first feature map
    channels: tuple[int, ...] = (64, 32, 16)     # one doubling of the edge between consecutive widths
    norm: str = "pixel"                          # "pixel" | "batch" | "none" (blocks.norm): after all but the last conv
    upsample: str = "nearest"                    # "nearest" | "trilinear": how the grid is doubled
    output: str = "sigmoid"                      # "sigmoid": intensities in [0, 1], as the phantoms | "none"
    template: bool = False                       # a learned per-voxel bias on the output (see set_template)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if min(self.z_dim, self.out_channels, self.size, self.start) < 1 or self.cond_dim < 0 \
                or len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"GeneratorConfig: z_dim, out_channels, size, start and channels must be positive "
                             f"and cond_dim >= 0, got {self}")
        if self.size not in (self.last_edge, 2 * self.last_edge):
            raise ValueError(f"GeneratorConfig: size {self.size} must be the last feature map's edge "
                             f"start * 2**(len(channels) - 1) = {self.last_edge}, or twice it")
        for name, value, allowed in (("norm", self.norm, ("pixel", "batch", "none")),
                                     ("upsample", self.upsample, ("nearest", "trilinear")),
                                     ("output", self.output, ("sigmoid", "none"))):
            if value not in allowed:
                raise ValueError(f"GeneratorConfig.{name}: expected one of {allowed}, got {value!r}")

    @property
    def last_edge(self) -> int:
        """Edge of the last feature map."""
        return self.start * 2 ** (len(self.channels) - 1)


class Generator3D(nn.Module):
    """``z`` (B, Z) [and ``c`` (B, K)] -> volume (B, C, size, size, size).

    1. a linear layer projects ``[z, c]`` to the first ``start³`` feature map;
    2. each level doubles the grid (upsampling) and convolves (3×3×3, norm, LeakyReLU);
    3. (if ``size`` is twice the last edge) one more upsampling, then a 3×3×3 convolution maps
       to the image channels, plus the per-voxel ``template`` if the config asks for one (+ sigmoid).

    The weights are kept "channels last" (``torch.channels_last_3d``), which made a training
    step almost twice as fast on our CPUs.
    """

    def __init__(self, cfg: GeneratorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GeneratorConfig()
        ch, s = cfg.channels, cfg.start
        self.project = nn.Linear(cfg.z_dim + cfg.cond_dim, ch[0] * s ** 3)
        self.project_norm = nn.Sequential(norm(cfg.norm, ch[0]), nn.LeakyReLU(0.2))
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode=cfg.upsample),
                          *conv_norm_act(c_in, c_out, norm=cfg.norm, bias=cfg.norm != "batch", act=nn.LeakyReLU(0.2)))
            for c_in, c_out in zip(ch, ch[1:]))
        self.to_image = nn.Sequential(
            nn.Upsample(scale_factor=2, mode=cfg.upsample) if cfg.size == 2 * cfg.last_edge else nn.Identity(),
            nn.Conv3d(ch[-1], cfg.out_channels, 3, padding=1))
        self.template = (nn.Parameter(torch.zeros(1, cfg.out_channels, cfg.size, cfg.size, cfg.size))
                         if cfg.template else None)
        self.to(memory_format=torch.channels_last_3d)

    @torch.no_grad()
    def set_template(self, mean_volume: torch.Tensor) -> "Generator3D":
        """Start the per-voxel output bias at the average training volume (C, D, H, W) or (1, C, D, H, W).

        The generator then draws the average anatomy from its first step, and the adversarial game
        only has to learn how volumes differ from it; without it, the few hundred steps a CPU
        affords at 32³ go into learning where the brain is. The bias keeps learning afterwards.
        (With a sigmoid output the bias is the average's logit.) Returns the generator itself,
        like ``nn.Module.to``.
        """
        set_template(self.template, mean_volume, self.cfg.output == "sigmoid")
        return self

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if z.ndim != 2 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {cfg.z_dim}), got {tuple(z.shape)}")
        check_condition(c, z.shape[0], cfg.cond_dim, "generator")
        # 1. project [z, c] to a small grid
        h = torch.cat([z, c.to(z.dtype)], 1) if c is not None else z                 # (B, Z + K)
        h = self.project(h).view(z.shape[0], cfg.channels[0], cfg.start, cfg.start, cfg.start)
        h = self.project_norm(h)                                                       # (B, C0, s, s, s)
        # 2. double the grid at every level
        for level in self.levels:
            h = level(h)                                                               # (B, C_k, 2e, 2e, 2e)
        # 3. to intensities at the output size
        x = self.to_image(h).contiguous()                                              # (B, C, size, size, size)
        if self.template is not None:
            x = x + self.template
        return torch.sigmoid(x) if cfg.output == "sigmoid" else x

    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes from fresh codes ``z ~ N(0, I)`` (drawn on the CPU with ``generator``, for
        reproducible samples on any device), in evaluation mode and without gradients."""
        return sample_from_prior(self, n, self.cfg.z_dim, c, generator)


# 2. The discriminator / critic -----------------------------------------------------------------

@dataclass
class DiscriminatorConfig:
    """Hyperparameters of :class:`Discriminator3D`. ``channels[k]`` is the width after the k-th halving."""

    in_channels: int = 1                         # C
    size: int = 32                               # edge of the judged cube
    channels: tuple[int, ...] = (16, 32, 64)     # 32³ -> 16³ -> 8³ -> 4³
    cond_dim: int = 0                            # K
    cond_mode: str = "projection"                # "projection" | "concat" (how c enters, when K > 0)
    spectral_norm: bool = False                  # divide each weight by its largest singular value

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if min(self.in_channels, self.size) < 1 or self.cond_dim < 0 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"DiscriminatorConfig: in_channels, size and channels must be positive and "
                             f"cond_dim >= 0, got {self}")
        if self.size % 2 ** len(self.channels):
            raise ValueError(f"DiscriminatorConfig: size {self.size} must be a multiple of 2**len(channels) = "
                             f"{2 ** len(self.channels)}")
        if self.cond_mode not in ("projection", "concat"):
            raise ValueError(f"DiscriminatorConfig.cond_mode: expected 'projection' or 'concat', got {self.cond_mode!r}")


class Discriminator3D(nn.Module):
    """Volume (B, C, D, H, W) [and ``c`` (B, K)] -> one score per volume (B,).

    1. (concatenation) ``c`` becomes K constant channels beside the image;
    2. strided 4×4×4 convolutions halve the grid at every level: features ``φ(x)`` (B, F);
    3. ``ψ(φ)`` (a linear layer), plus ``<E c, φ>`` for the projection discriminator.
    """

    def __init__(self, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiscriminatorConfig()
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        c_in = cfg.in_channels + (cfg.cond_dim if cfg.cond_mode == "concat" else 0)
        widths = (c_in, *cfg.channels)
        self.features = nn.Sequential(*[
            nn.Sequential(sn(nn.Conv3d(a, b, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))
            for a, b in zip(widths[:-1], widths[1:])])
        n_feat = cfg.channels[-1] * (cfg.size // 2 ** len(cfg.channels)) ** 3             # F
        self.psi = sn(nn.Linear(n_feat, 1))
        self.embed = (sn(nn.Linear(cfg.cond_dim, n_feat, bias=False))
                      if cfg.cond_dim > 0 and cfg.cond_mode == "projection" else None)
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        n = cfg.size
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != (n, n, n):
            raise ValueError(f"x: expected shape (B, {cfg.in_channels}, {n}, {n}, {n}), got {tuple(x.shape)}")
        check_condition(c, x.shape[0], cfg.cond_dim, "discriminator")
        # 1. concatenation: c as constant channels
        if c is not None and cfg.cond_mode == "concat":
            x = torch.cat([x, c.to(x.dtype)[:, :, None, None, None].expand(-1, -1, n, n, n)], 1)  # (B, C + K, n³)
        # 2. features
        phi = self.features(x).flatten(1)                                               # (B, F)
        # 3. score, and the projection of the condition onto the features
        score = self.psi(phi)[:, 0]                                                     # (B,)
        if self.embed is not None:
            score = score + (self.embed(c.to(phi.dtype)) * phi).sum(1)                  # + <E c, φ(x)>
        return score


# 3. pix2pix and CycleGAN: the book's U-Net and PatchGAN ----------------------------------------

class PatchCritic3D(nn.Module):
    """The 3D PatchGAN (:class:`~gen3d_lessons.blocks.PatchDiscriminator3D`) for one volume or a pair.

    ``forward(*volumes)`` concatenates its arguments along channels and returns one logit per
    patch, (B, 1, D/2^n, H/2^n, W/2^n). pix2pix's ``D(x, y)`` judges the pair (source, target);
    CycleGAN's ``D_Y(y)`` judges a volume alone. ``cfg.in_channels`` is the total channel count.
    """

    def __init__(self, cfg: PatchDiscriminatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PatchDiscriminatorConfig(in_channels=1)
        self.patch = PatchDiscriminator3D(cfg)

    def forward(self, *volumes: torch.Tensor) -> torch.Tensor:
        if not volumes or any(v.ndim != 5 for v in volumes):
            raise ValueError(f"volumes: expected one or more (B, C, D, H, W) tensors, got shapes "
                             f"{[tuple(v.shape) for v in volumes]}")
        x = torch.cat(volumes, 1)                                                       # (B, sum C, D, H, W)
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"volumes: {x.shape[1]} channels in all, but this critic was built for "
                             f"{self.cfg.in_channels}")
        return self.patch.net(x)                                                        # (B, 1, d, h, w)
