"""A Hierarchical Amortized GAN (HA-GAN, Sun et al. 2022, IEEE JBHI): full resolution without the full volume.

A GAN that draws 128³–256³ brains runs out of memory in *training*, not in use: backpropagation
keeps every layer output of the generator and of the critic, and at full resolution those are
the largest. HA-GAN never builds the whole full-resolution volume while it learns:

1. a shared trunk ``G_A`` maps ``z`` to a coarse feature volume ``F`` (edge ``low``, e.g. size/4);
2. ``G_L`` decodes **all** of ``F`` to a low-resolution whole image (edge ``low``: one block at
   ``F``'s own resolution, so it is cheap);
3. ``G_H`` decodes **one slab** of ``F`` — ``slab`` consecutive positions along depth, at a random
   place — to the full-resolution sub-volume at that place.

Two critics judge the two views (:func:`hagan_critics`): ``D_L`` whole low-resolution volumes
(a real one is the real volume average-pooled to ``low``³), ``D_H`` full-resolution slabs (a real
one is cut from the real volume at the same place). Both views come from the same ``F``, so what
``D_L`` teaches about the whole anatomy reaches the slabs through the trunk. The paper gives
``D_H`` the slab's position; here it is a **position channel**: each voxel of the slab carries
its depth in the whole volume, in (0, 1), as a second input channel.

At sampling time no gradient is kept, so ``G_H`` simply runs over every slab of ``F`` in turn
and the slabs are stacked along depth (:meth:`HAGANGenerator3D.forward`).

**Seams.** A slab decoded alone does not see its neighbours, so two slabs could disagree where
they meet. Here every slab is decoded with a ``halo`` of ``F`` positions on each side (fewer at
the volume's border) that is cropped off afterwards. With nearest-neighbour upsampling and 3×3×3
convolutions, the layers of ``G_H`` together reach less than one ``F`` position, so ``halo=1``
makes the stacked slabs *exactly* what decoding all of ``F`` at once would give (a test checks
it). ``halo=0`` decodes each slab independently.

Left out from the paper: its encoder (HA-GAN also learns to map real volumes to codes).

Shapes: ``z: (B, Z)``, ``F: (B, C_F, L, L, L)`` with ``L = low``, volumes ``(B, 1, D, H, W)``,
a slab ``(B, 1, slab · r, size, size)`` with ``r = size / low``, scores ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import check_condition, conv_norm_act, norm, sample_from_prior, set_template
from .gan import Discriminator3D, DiscriminatorConfig

__all__ = ["HAGANConfig", "HAGANGenerator3D", "SlabCriticConfig", "SlabCritic3D", "hagan_critics"]


# 1. The generator: trunk G_A, low-resolution head G_L, slab head G_H ------------------------------

@dataclass(frozen=True)
class HAGANConfig:
    """Hyperparameters of :class:`HAGANGenerator3D`.

    ``channels`` read as in :class:`~gen3d_lessons.models.gan.GeneratorConfig`: ``channels[k]`` is
    the width at edge ``start · 2**k``, and ``size`` is the last edge or twice it. ``low`` cuts the
    pyramid in two: the levels up to edge ``low`` are the trunk ``G_A`` (their last output is
    ``F``), the levels above it are ``G_H``. So ``HAGANConfig(channels=(64, 32, 16))`` has exactly
    the layers of ``GeneratorConfig(channels=(64, 32, 16))``, plus ``G_L``. Defaults: ``F`` is
    32 × 8³, the low-resolution image 8³, a slab 2 of the 8 positions of ``F`` = 8 of 32 slices.
    """

    size: int = 32                               # edge of the full-resolution cube
    z_dim: int = 64                              # Z
    channels: tuple[int, ...] = (64, 32, 16)     # one doubling of the edge between consecutive widths
    start: int = 4                               # edge of the first feature map
    low: int = 8                                 # edge of F and of the low-resolution image
    slab: int = 2                                # slab thickness, in positions of F (slab · size/low voxels)
    halo: int = 1                                # F positions of context on each side of a slab (0: none)
    template: bool = False                       # learned per-voxel biases on both outputs (see set_template)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if min(self.size, self.z_dim, self.start, self.low, self.slab) < 1 or self.halo < 0 \
                or not self.channels or min(self.channels) < 1:
            raise ValueError(f"HAGANConfig: size, z_dim, channels, start, low and slab must be positive and "
                             f"halo >= 0, got {self}")
        if self.size not in (self.last_edge, 2 * self.last_edge):
            raise ValueError(f"HAGANConfig: size {self.size} must be the last feature map's edge "
                             f"start * 2**(len(channels) - 1) = {self.last_edge}, or twice it")
        edges = [self.start * 2 ** k for k in range(len(self.channels))]
        if self.low not in edges or self.low >= self.size:
            raise ValueError(f"HAGANConfig: low {self.low} must be one of the feature edges {edges} "
                             f"and smaller than size {self.size}")
        if self.slab > self.low or self.low % self.slab:
            raise ValueError(f"HAGANConfig: slab {self.slab} must divide low {self.low}, so that the slabs "
                             f"tile F exactly")

    @property
    def last_edge(self) -> int:
        """Edge of the last feature map."""
        return self.start * 2 ** (len(self.channels) - 1)

    @property
    def trunk_levels(self) -> int:
        """How many doublings the trunk makes: ``F`` has edge ``start · 2**trunk_levels = low``."""
        return (self.low // self.start).bit_length() - 1

    @property
    def ratio(self) -> int:
        """``r = size / low``: full-resolution voxels per position of ``F`` along each axis."""
        return self.size // self.low


def _level(c_in: int, c_out: int) -> nn.Sequential:
    """Double the grid (nearest neighbour), then 3×3×3 conv, pixel norm, LeakyReLU: Generator3D's level."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         *conv_norm_act(c_in, c_out, norm="pixel", act=nn.LeakyReLU(0.2)))


class HAGANGenerator3D(nn.Module):
    """``z`` (B, Z) -> features ``F`` -> a low-resolution whole image and full-resolution slabs.

    - :meth:`features`: ``G_A(z)``, the trunk: project ``z`` to ``start³``, double up to ``low³``;
    - :meth:`low`: ``G_L(F)``, the whole volume at ``low³``;
    - :meth:`slab`: ``G_H`` on positions ``start .. start + slab`` of ``F``: that part of the full volume;
    - ``forward(z)``: the whole full-resolution volume, slab after slab (for sampling).

    Intensities go through a sigmoid, in [0, 1], like :class:`~gen3d_lessons.models.gan.Generator3D`.
    Only per-voxel normalisation (pixel norm), never batch norm: a slab must be decoded the same
    whether it is alone or among its neighbours. Weights are kept "channels last", as
    Generator3D's (a training step about 15 % faster on our CPUs).
    """

    def __init__(self, cfg: HAGANConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HAGANConfig()
        ch, m = cfg.channels, cfg.trunk_levels
        c_f = ch[m]                                                                     # width of F
        # G_A: z -> (C0, start³) -> m doublings -> F (C_F, low³)
        self.project = nn.Linear(cfg.z_dim, ch[0] * cfg.start ** 3)
        self.project_norm = nn.Sequential(norm("pixel", ch[0]), nn.LeakyReLU(0.2))
        self.trunk = nn.ModuleList(_level(a, b) for a, b in zip(ch[:m], ch[1:m + 1]))
        # G_L: one block at F's resolution, then the image
        self.to_low = nn.Sequential(*conv_norm_act(c_f, c_f, norm="pixel", act=nn.LeakyReLU(0.2)),
                                    nn.Conv3d(c_f, 1, 3, padding=1))
        # G_H: the remaining doublings, then (a last doubling and) the image, as Generator3D ends
        self.high = nn.ModuleList(_level(a, b) for a, b in zip(ch[m:], ch[m + 1:]))
        self.to_image = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest") if cfg.size == 2 * cfg.last_edge else nn.Identity(),
            nn.Conv3d(ch[-1], 1, 3, padding=1))
        s, low = cfg.size, cfg.low
        self.template = nn.Parameter(torch.zeros(1, 1, s, s, s)) if cfg.template else None
        self.template_low = nn.Parameter(torch.zeros(1, 1, low, low, low)) if cfg.template else None
        self.to(memory_format=torch.channels_last_3d)          # as Generator3D: faster convolutions on CPUs

    @torch.no_grad()
    def set_template(self, mean_volume: torch.Tensor) -> "HAGANGenerator3D":
        """Start both output biases at the average training volume (1, size, size, size): the
        full-resolution one at it, the low-resolution one at it average-pooled to ``low³``.

        The generator then draws the mean brain from its first step, and the game only has to
        learn how brains differ from it. Returns the generator, like ``nn.Module.to``.
        """
        s = self.cfg.size
        if not isinstance(mean_volume, torch.Tensor) or mean_volume.numel() != s ** 3:
            raise ValueError(f"mean_volume: expected a tensor of {s}³ voxels, (1, {s}, {s}, {s}), "
                             f"got {tuple(getattr(mean_volume, 'shape', ()))}")
        m = mean_volume.reshape(1, 1, s, s, s).float()
        set_template(self.template, m, sigmoid=True)
        set_template(self.template_low, nn.functional.avg_pool3d(m, self.cfg.ratio), sigmoid=True)
        return self

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """``F = G_A(z)``: (B, Z) -> (B, C_F, low, low, low)."""
        cfg = self.cfg
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {cfg.z_dim}), got {tuple(getattr(z, 'shape', ()))}")
        h = self.project(z).view(z.shape[0], cfg.channels[0], cfg.start, cfg.start, cfg.start)
        h = self.project_norm(h)                                                        # (B, C0, start³)
        for level in self.trunk:
            h = level(h)                                                                # (B, C_k, 2e, 2e, 2e)
        return h                                                                        # (B, C_F, low³)

    def _check_features(self, f: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.channels[cfg.trunk_levels], cfg.low, cfg.low, cfg.low)
        if not isinstance(f, torch.Tensor) or f.ndim != 5 or tuple(f.shape[1:]) != want:
            raise ValueError(f"features: expected shape (B, {', '.join(map(str, want))}) from features(z), "
                             f"got {tuple(getattr(f, 'shape', ()))}")

    def low(self, features: torch.Tensor) -> torch.Tensor:
        """``G_L(F)``: the whole volume at low resolution, (B, C_F, L, L, L) -> (B, 1, L, L, L)."""
        self._check_features(features)
        x = self.to_low(features)                                                       # (B, 1, L, L, L) logits
        if self.template_low is not None:
            x = x + self.template_low
        return torch.sigmoid(x)

    def slab(self, features: torch.Tensor, start: int) -> torch.Tensor:
        """``G_H`` on positions ``start .. start + slab`` of ``F`` along depth: the full-resolution
        slab there, (B, 1, slab · r, size, size), depth voxels ``start · r .. (start + slab) · r``."""
        cfg = self.cfg
        self._check_features(features)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= cfg.low - cfg.slab:
            raise ValueError(f"start: expected an integer position of F in 0..{cfg.low - cfg.slab}, got {start!r}")
        r = cfg.ratio
        # 1. the slab and its halo (clipped at the volume's border, where the convolutions pad anyway)
        a, b = max(0, start - cfg.halo), min(cfg.low, start + cfg.slab + cfg.halo)
        h = features[:, :, a:b]                                                         # (B, C_F, b - a, L, L)
        # 2. decode to full resolution, then crop the halo off
        for level in self.high:
            h = level(h)
        x = self.to_image(h)                                                            # (B, 1, (b - a) r, s, s)
        x = x[:, :, (start - a) * r:(start - a + cfg.slab) * r]                         # (B, 1, slab r, s, s)
        # 3. this slab's part of the template
        if self.template is not None:
            x = x + self.template[:, :, start * r:(start + cfg.slab) * r]
        return torch.sigmoid(x)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The whole full-resolution volume (B, 1, size, size, size): ``F`` once, then every slab in turn."""
        check_condition(c, z.shape[0] if isinstance(z, torch.Tensor) and z.ndim == 2 else -1, 0, "generator")
        f = self.features(z)                                                            # (B, C_F, L³)
        slabs = [self.slab(f, a) for a in range(0, self.cfg.low, self.cfg.slab)]        # low / slab of them
        return torch.cat(slabs, dim=2)                                                  # (B, 1, s, s, s)

    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` full-resolution volumes from fresh codes ``z ~ N(0, I)`` (drawn on the CPU with
        ``generator``), in evaluation mode and without gradients."""
        return sample_from_prior(self, n, self.cfg.z_dim, c, generator)


# 2. The critics: D_L on whole low-resolution volumes, D_H on full-resolution slabs -----------------

@dataclass(frozen=True)
class SlabCriticConfig:
    """Hyperparameters of :class:`SlabCritic3D`. ``channels[k]`` is the width after the k-th halving."""

    size: int = 32                               # height and width of a slab (the full volume's edge)
    thickness: int = 8                           # depth of a slab, in voxels
    channels: tuple[int, ...] = (16, 32, 64)
    position: bool = True                        # add the position channel (each voxel's depth in the volume)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if min(self.size, self.thickness) < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"SlabCriticConfig: size, thickness and channels must be positive, got {self}")
        if self.size % 2 ** len(self.channels):
            raise ValueError(f"SlabCriticConfig: size {self.size} must be a multiple of 2**len(channels) = "
                             f"{2 ** len(self.channels)}")

    @property
    def depths(self) -> tuple[int, ...]:
        """The slab's depth after each level: halved while it is at least 2 voxels, then kept."""
        d, out = self.thickness, []
        for _ in self.channels:
            d = d // 2 if d >= 2 else d
            out.append(d)
        return tuple(out)


class SlabCritic3D(nn.Module):
    """A slab (B, 1, T, S, S) and its depth ``position`` in the volume -> one score per slab (B,).

    :class:`~gen3d_lessons.models.gan.Discriminator3D` judges cubes; a slab is thin. The same
    strided 4×4×4 convolutions halve every axis, except that once the slab is one voxel thick
    the later layers (3×4×4, stride (1, 2, 2)) halve height and width only. With
    ``cfg.position`` a second input channel holds each voxel's depth in the whole volume,
    ``(position + i + 1/2) / size`` for the slab's slice ``i``: the critic can then ask "is this
    what the brain looks like *here*", as HA-GAN's position-aware ``D_H`` does.
    """

    def __init__(self, cfg: SlabCriticConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SlabCriticConfig()
        widths = (1 + int(cfg.position), *cfg.channels)
        depths_in = (cfg.thickness, *cfg.depths[:-1])
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv3d(a, b, (4, 4, 4) if d >= 2 else (3, 4, 4), stride=(2 if d >= 2 else 1, 2, 2),
                                    padding=1), nn.LeakyReLU(0.2))
            for a, b, d in zip(widths[:-1], widths[1:], depths_in)])
        n_feat = cfg.channels[-1] * cfg.depths[-1] * (cfg.size // 2 ** len(cfg.channels)) ** 2    # F
        self.psi = nn.Linear(n_feat, 1)
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor, position: int = 0) -> torch.Tensor:
        """``x`` (B, 1, T, S, S); ``position``: the depth index, in the whole volume, of its first slice."""
        cfg = self.cfg
        want = (1, cfg.thickness, cfg.size, cfg.size)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected a slab of shape (B, {', '.join(map(str, want))}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if not 0 <= position <= cfg.size - cfg.thickness:
            raise ValueError(f"position: expected the slab's first slice in 0..{cfg.size - cfg.thickness}, "
                             f"got {position!r}")
        # 1. the position channel: every voxel's depth in the whole volume, in (0, 1)
        if cfg.position:
            depth = (position + torch.arange(cfg.thickness, device=x.device, dtype=x.dtype) + 0.5) / cfg.size
            x = torch.cat([x, depth[None, None, :, None, None].expand_as(x)], 1)      # (B, 2, T, S, S)
        # 2. features, 3. score
        return self.psi(self.features(x).flatten(1))[:, 0]                             # (B,)


def hagan_critics(cfg: HAGANConfig, channels: tuple[int, ...] = (16, 32, 64),
                  position: bool = True) -> tuple[Discriminator3D, SlabCritic3D]:
    """The two critics of a generator with config ``cfg``, both with widths ``channels``:
    ``D_L``, a :class:`~gen3d_lessons.models.gan.Discriminator3D` on ``low³`` cubes, and ``D_H``,
    a :class:`SlabCritic3D` on its full-resolution slabs (with the position channel if ``position``)."""
    if cfg.low % 2 ** len(channels):
        raise ValueError(f"channels: D_L judges {cfg.low}³ cubes, which {len(channels)} halvings do not divide; "
                         f"give at most {(cfg.low & -cfg.low).bit_length() - 1} widths")
    d_low = Discriminator3D(DiscriminatorConfig(size=cfg.low, channels=channels))
    d_high = SlabCritic3D(SlabCriticConfig(size=cfg.size, thickness=cfg.slab * cfg.ratio, channels=channels,
                                           position=position))
    return d_low, d_high
