"""A generator of cardiac motion: a class-conditional VAE of deformations, in the spirit of DDM.

The diffusion deformable model (DDM; Kim & Ye, MICCAI 2022) makes the frames of a cardiac cycle
between an end-diastolic (ED) and an end-systolic (ES) volume: a diffusion module turns the pair
into a latent *deformation code*, a deformation module turns the code into a deformation of ED,
and *scaling* the code gives the frames in between along one continuous path. We keep the
deformation of ED and the scaled code, and make the ES end generated too: a class-conditional
VAE (Sohn et al. 2015), which trains in seconds on a CPU, draws how this heart contracts:

1. **decoder** ``p(ES | ED, c, z)``: a small U-Net-like network reads the ED label map (label
   fractions, 4 channels), the pathology class ``c`` and a latent ``z``, and writes ``modes``
   velocity fields on a coarse ``flow_grid``³ grid, each scaled by a gain ``exp(a_c + b_c . z)``
   and summed into one stationary velocity field ``v``;
2. **integration**: scaling and squaring gives the diffeomorphism ``phi_s = exp(s v)``
   (:func:`gen3d_lessons.spatial.integrate_velocity`); a stationary velocity makes "a fraction ``s``
   of the motion" well defined, so ``s = 1`` is ES and the heart's contraction profile ``s(t)``
   gives every frame of the cycle -- DDM's scaled deformation code;
3. **warp**: the ED label fractions are pulled through ``phi_s``,
   ``frame_s(x) = ED(x + u_s(x))`` (:func:`gen3d_lessons.spatial.warp`);
4. **encoder** ``q(z | ED, ES, c)``: reads both ends of the motion through how much each
   structure's volume changed, relative to the other hearts of the class: what the class and the
   ED shape leave open is how strongly *this* heart contracts;
5. **prior** ``p(z | c)``: N(0, I) during training (the KL term); after training,
   :meth:`MotionVAE3D.fit_prior` replaces it by each class's aggregate posterior.

Training minimises the negative ELBO -- soft Dice and the EF errors as the reconstruction term,
``beta`` times the KL -- plus a smoothness penalty on ``v``
(:func:`gen3d_lessons.tasks.heart_motion.motion_vae_step`). A generated heart is an ED label map
of the class, a fresh ``z ~ p(z | c)`` and :meth:`MotionVAE3D.sample_es`.

Shapes: label fractions ``(B, K, D, H, W)`` (K = 4: background, RV, MYO, LV), class indices
``c: (B,)`` int64, ``z, mu, logvar: (B, Z)``, velocities ``(B, 3, g, g, g)`` and displacements
``(B, 3, D, H, W)`` in voxels of the label grid, contraction states ``s`` (0 at ED, 1 at ES).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import spatial
from ..blocks import conv_norm_act

__all__ = ["MotionVAEConfig", "MotionVAE3D"]


@dataclass(frozen=True)
class MotionVAEConfig:
    """Hyperparameters of :class:`MotionVAE3D`. ``channels[k]`` is the decoder's width on ``grids[k]``."""

    size: int = 32                           # edge of the cubic label grid (voxels; 5 mm in chapter 7)
    labels: int = 4                          # K: background, RV, MYO, LV
    classes: int = 5                         # pathology classes (NOR, HCM, DCM, MINF, ARV)
    z_dim: int = 2                           # Z: what the class and the ED shape leave open (LV, RV)
    channels: tuple[int, ...] = (8, 16, 32)  # widths on the grids 16³ (input averaged 2x2x2), 8³, 4³
    flow_grid: int = 16                      # edge of the grid the velocity lives on (10 mm voxels)
    modes: int = 2                           # velocity fields, each with its own gain
    max_velocity: float = 12.0               # |v| <= this many label-grid voxels (a soft tanh bound)
    norm: str = "group"                      # decoder normalisation: "group" | "none"
    groups: int = 4                          # GroupNorm groups, dividing every width
    integration_steps: int = 5               # scaling and squaring: v / 2^steps, composed steps times

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("size", "labels", "classes", "z_dim", "flow_grid", "modes", "groups", "integration_steps"):
            value, least = getattr(self, name), 0 if name == "integration_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"MotionVAEConfig.{name}: expected an integer >= {least}, got {value!r}")
        if self.labels < 2:
            raise ValueError(f"MotionVAEConfig.labels: expected at least 2 (background and one structure), "
                             f"got {self.labels}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"MotionVAEConfig.channels: expected positive widths, got {self.channels}")
        if self.size % 2 ** len(self.channels):
            raise ValueError(f"MotionVAEConfig.size: {self.size} must be divisible by 2^{len(self.channels)} "
                             f"(one halving per entry of channels={self.channels})")
        if self.flow_grid not in self.grids:
            raise ValueError(f"MotionVAEConfig.flow_grid: expected one of the network's grids {self.grids}, "
                             f"got {self.flow_grid}")
        if self.norm not in ("group", "none"):
            raise ValueError(f"MotionVAEConfig.norm: expected 'group' or 'none', got {self.norm!r}")
        if self.norm == "group" and any(c % self.groups for c in self.channels):
            raise ValueError(f"MotionVAEConfig.groups: {self.groups} must divide every width in "
                             f"channels={self.channels}")
        if not self.max_velocity > 0:
            raise ValueError(f"MotionVAEConfig.max_velocity: expected a positive number of voxels, "
                             f"got {self.max_velocity!r}")

    @property
    def grids(self) -> tuple[int, ...]:
        """Edges of the decoder's feature maps, finest first, e.g. (16, 8, 4) for size 32 and three levels."""
        return tuple(self.size // 2 ** (k + 1) for k in range(len(self.channels)))


def volume_change(ed: torch.Tensor, es: torch.Tensor) -> torch.Tensor:
    """log(V_ES / V_ED) of every structure but the background: (B, K - 1) from label fractions (B, K, *S)."""
    dims = tuple(range(2, ed.ndim))
    return torch.log(es[:, 1:].sum(dims).clamp_min(1.0) / ed[:, 1:].sum(dims).clamp_min(1.0))


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def _broadcast(vectors: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
    """Vectors (B, n_i) side by side, repeated over a grid³: (B, sum n_i, grid, grid, grid)."""
    v = torch.cat(list(vectors), dim=1)                                   # (B, n)
    return v[:, :, None, None, None].expand(-1, -1, grid, grid, grid)


class MotionVAE3D(nn.Module):
    """ED label map + class + z -> velocity field -> ED->ES deformation; encoder q(z | ED, ES, class).

    ``encode(ed, es, c) -> (mu, logvar)``, ``reparameterize(mu, logvar) -> z``,
    ``velocity(ed, c, z) -> v``, ``displacement(v, phase) -> u``, ``deform(ed, c, z, phase) -> frame``,
    ``forward(ed, es, c) -> (es_hat, mu, logvar, v)``; generation: ``prior_z``, ``sample_es``, ``cycle``.
    Two data-dependent steps bracket training (as a template is set before a generator trains):
    ``set_volume_stats`` before (what the encoder standardises with), ``fit_prior`` after.
    """

    def __init__(self, cfg: MotionVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MotionVAEConfig()
        k, n_cls, z_dim, ch = cfg.labels, cfg.classes, cfg.z_dim, cfg.channels
        # 1. encoder: [volume changes standardised within the class, class] -> (mu, logvar)
        self.to_latent = nn.Linear((k - 1) + n_cls, 2 * z_dim)
        self.register_buffer("change_mean", torch.zeros(n_cls, k - 1))   # set_volume_stats
        self.register_buffer("change_std", torch.ones(n_cls, k - 1))
        self.register_buffer("prior_mean", torch.zeros(n_cls, z_dim))    # p(z | c): N(0, I) until fit_prior
        self.register_buffer("prior_std", torch.ones(n_cls, z_dim))
        with torch.no_grad():
            # start as mu = (LV change, RV change), standardised, with sigma = 0.1: z carries how
            # strongly the heart contracts from the first step and is already ~N(0, I) within each
            # class. From a random start the decoder first learns to ignore a z that is still noise
            # and a short run never recovers (posterior collapse)
            self.to_latent.weight.zero_()
            self.to_latent.bias.zero_()
            for j, label in enumerate((k - 1, 1)[:z_dim]):              # LV, then RV (labels 3, 1)
                self.to_latent.weight[j, label - 1] = 1.0
            self.to_latent.bias[z_dim:z_dim + min(z_dim, 2)] = 2 * math.log(0.1)
        # 2. decoder: [ED, class] -> levels (kept for skips) -> bottleneck with [z, class] -> up to flow_grid.
        #    It reads the labels averaged over 2x2x2 voxels: a learned stride-2 convolution at full
        #    size would cost more than the rest of the network.
        nk = dict(norm=cfg.norm, groups=cfg.groups)
        self.down = nn.ModuleList([conv_norm_act(k + n_cls, ch[0], act=_act(), **nk)] +
                                  [conv_norm_act(a, b, 4, stride=2, act=_act(), **nk) for a, b in zip(ch, ch[1:])])
        self.bottleneck = conv_norm_act(ch[-1] + z_dim + n_cls, ch[-1], act=_act(), **nk)
        level = cfg.grids.index(cfg.flow_grid)                          # where the velocity lives
        ups = list(reversed(range(level, len(ch) - 1)))
        self.up = nn.ModuleList([conv_norm_act(ch[j + 1] + ch[j], ch[j], act=_act(), **nk) for j in ups])
        # FiLM (Perez et al. 2018): [z, class] scale and shift the features of every up level
        self.film = nn.ModuleList([nn.Linear(z_dim + n_cls, 2 * ch[j]) for j in ups])
        # 3. `modes` velocity fields, each scaled by its own gain exp(a_c + b_c . z): DDM's "scale the
        #    deformation code". How strongly the heart contracts (its EF) is then a few numbers the
        #    network sets directly, apart from *where* the heart moves
        self.to_velocity = nn.Conv3d(ch[level], 3 * cfg.modes, 3, padding=1)
        self.to_gain = nn.Linear((z_dim + 1) * n_cls, cfg.modes)        # on [z ⊗ c, c]: a line per class
        # a new model does not move the heart: zero velocity, the identity map, and unit gains
        for layer in (self.to_velocity, self.to_gain):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- checks --------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, name: str) -> None:
        cfg = self.cfg
        want = (cfg.labels, cfg.size, cfg.size, cfg.size)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected label fractions of shape (B, {', '.join(map(str, want))}), got {got}")
        if not torch.is_floating_point(x):
            raise ValueError(f"{name}: expected float label fractions (one-hot), got dtype {x.dtype}; "
                             "use gen3d_lessons.blocks.one_hot on a (B, 1, ...) label map")

    def _class_vector(self, c: torch.Tensor, batch: int | None) -> torch.Tensor:
        """Class indices (B,) -> one-hot (B, classes), with a clear error for anything else (any B if None)."""
        n = self.cfg.classes
        if batch is None and isinstance(c, torch.Tensor) and c.ndim == 1:
            batch = len(c)
        if not isinstance(c, torch.Tensor) or c.shape != (batch,) or c.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"c: expected class indices of shape ({'B' if batch is None else batch},) and an "
                             f"integer dtype, got {got}")
        if batch and (int(c.min()) < 0 or int(c.max()) >= n):
            raise ValueError(f"c: class indices must be in [0, {n}), got values {sorted(set(c.tolist()))}")
        return F.one_hot(c.long(), n).float()

    def _check_z(self, z: torch.Tensor, batch: int) -> None:
        if not isinstance(z, torch.Tensor) or z.shape != (batch, self.cfg.z_dim):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z: expected shape ({batch}, {self.cfg.z_dim}), got {got}")

    # -- the VAE's maths -----------------------------------------------------------------------

    @torch.no_grad()
    def set_volume_stats(self, ed: torch.Tensor, es: torch.Tensor, c: torch.Tensor) -> "MotionVAE3D":
        """Store the mean and spread of each class's volume changes in the training hearts; returns the model.

        The encoder reads a heart's volume changes relative to its class, so that z starts out
        carrying what the class leaves open (how strongly *this* heart contracts) and nothing the
        class already says. A class with fewer than two hearts keeps mean 0 and spread 1.
        """
        self._check(ed, "ed")
        self._check(es, "es")
        self._class_vector(c, ed.shape[0])
        change = volume_change(ed, es).to(self.change_mean)              # (N, K - 1)
        for k in range(self.cfg.classes):
            of_class = change[c.to(change.device) == k]
            if len(of_class) >= 2:
                self.change_mean[k] = of_class.mean(0)
                self.change_std[k] = of_class.std(0).clamp_min(1e-3)
        return self

    def encode(self, ed: torch.Tensor, es: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | ED, ES, c) = N(mu, diag(exp(logvar))): (B, Z) each, from how much each structure's
        volume changed between ED and ES, relative to the training hearts of the class
        (:meth:`set_volume_stats`), and the class."""
        self._check(ed, "ed")
        self._check(es, "es")
        c1 = self._class_vector(c, ed.shape[0]).to(ed.device)
        r = (volume_change(ed, es) - self.change_mean[c]) / self.change_std[c]   # (B, K - 1), ~N(0, 1) per class
        mu, logvar = self.to_latent(torch.cat([r, c1], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    @torch.no_grad()
    def fit_prior(self, ed: torch.Tensor, es: torch.Tensor, c: torch.Tensor) -> "MotionVAE3D":
        """Replace the N(0, I) that generation draws from by each class's *aggregate posterior*: the
        mean and spread of q(z | ED, ES, c) over the training hearts of the class; returns the model.

        The KL term pulls every q(z | x) towards N(0, I), but after a short run the codes of real
        hearts fill only part of it (here about 0.85 of its width), and codes drawn from all of
        N(0, I) then make motions more extreme than any real heart's. Fitting the density of the
        codes after training (Ghosh et al. 2020, ex-post density estimation) closes that gap.
        A class with fewer than two hearts keeps N(0, I).
        """
        mu, logvar = self.encode(ed, es, c)
        var = logvar.exp()
        for k in range(self.cfg.classes):
            idx = c.to(mu.device) == k
            if int(idx.sum()) >= 2:
                self.prior_mean[k] = mu[idx].mean(0)
                # the mixture of the class's posteriors: spread of the means plus their own variance
                self.prior_std[k] = (mu[idx].var(0) + var[idx].mean(0)).sqrt()
        return self

    def prior_z(self, c: torch.Tensor, generator: torch.Generator | None = None, *, mean: bool = False) -> torch.Tensor:
        """Codes z ~ p(z | c) for class indices c (B,): (B, Z), drawn on the CPU with ``generator``
        (the same numbers on any device). ``mean=True`` gives the prior's mean instead: the motion
        of a typical heart of the class."""
        self._class_vector(c, None)
        k = c.to(self.prior_mean.device)
        if mean:
            return self.prior_mean[k].clone()
        eps = torch.randn(len(k), self.cfg.z_dim, generator=generator).to(self.prior_mean.device)
        return self.prior_mean[k] + self.prior_std[k] * eps

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample whose gradient reaches the encoder."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def velocity(self, ed: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The stationary velocity field v (B, 3, g, g, g), g = flow_grid, in voxels of the label grid."""
        cfg = self.cfg
        self._check(ed, "ed")
        self._check_z(z, ed.shape[0])
        c1 = self._class_vector(c, ed.shape[0]).to(ed.device)
        # 1. the ED shape and the class, down the pyramid; keep every level for the skips
        h = F.avg_pool3d(torch.cat([ed, _broadcast([c1], cfg.size)], dim=1), 2)   # (B, K + classes, S/2, S/2, S/2)
        skips = []
        for layer in self.down:
            h = layer(h)
            skips.append(h)                                             # (B, ch[k], grids[k]³)
        # 2. bottleneck: what this heart does (z) and what its class does (c), everywhere
        h = self.bottleneck(torch.cat([h, _broadcast([z, c1], cfg.grids[-1])], dim=1))
        # 3. back up to the velocity's grid, with the skip of each level, modulated by [z, c]
        zc = torch.cat([z, c1], dim=1)                                  # (B, Z + classes)
        for layer, film, skip in zip(self.up, self.film, reversed(skips[:-1])):
            g = skip.shape[-1]
            h = F.interpolate(h, size=(g, g, g), mode="trilinear", align_corners=False)
            h = layer(torch.cat([h, skip], dim=1))                      # (B, ch[j], g, g, g)
            scale, shift = film(zc)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        # 4. the modes and their gains; log-gain a_c + b_c . z, each class its own line, so that one
        #    unit of z can be 3 EF points in a normal heart and 5 in a dilated one
        g = h.shape[-1]
        v_modes = self.to_velocity(h).view(-1, cfg.modes, 3, g, g, g)  # (B, M, 3, g, g, g)
        z_by_class = (z[:, :, None] * c1[:, None, :]).flatten(1)       # (B, Z * classes): z ⊗ c
        gain = torch.exp(self.to_gain(torch.cat([z_by_class, c1], dim=1)))             # (B, M)
        gain = gain[:, :, None, None, None, None]                       # (B, M, 1, 1, 1, 1)
        v = (gain * v_modes).sum(dim=1)                                 # (B, 3, g, g, g)
        # 5. a soft bound, so that no code makes a wild deformation
        return cfg.max_velocity * torch.tanh(v / cfg.max_velocity)

    def displacement(self, v: torch.Tensor, phase: float = 1.0) -> torch.Tensor:
        """u of ``exp(phase * v)`` on the label grid: (B, 3, S, S, S) in voxels.

        Integrated on the coarse grid (a smooth field loses little there, at 1/8 of the cost for
        16³ against 32³), then resized: the units change with the grid
        (:func:`gen3d_lessons.spatial.resize_displacement`). ``phase`` is DDM's scaling of the code:
        ``exp(0 v)`` is the identity (ED), ``exp(1 v)`` ES.
        """
        cfg = self.cfg
        if not isinstance(phase, numbers.Real) or isinstance(phase, bool) or not 0.0 <= phase <= 2.0:
            raise ValueError(f"phase: expected a contraction state s in [0, 2] (0: ED, 1: ES), got {phase!r}")
        g = v.shape[-1]
        v_grid = float(phase) * v * (g - 1) / (cfg.size - 1)                   # label-grid voxels -> grid voxels
        u = spatial.integrate_velocity(v_grid, cfg.integration_steps)  # (B, 3, g, g, g)
        return spatial.resize_displacement(u, (cfg.size,) * 3)         # (B, 3, S, S, S)

    def deform(self, ed: torch.Tensor, c: torch.Tensor, z: torch.Tensor, phase: float = 1.0) -> torch.Tensor:
        """The frame at contraction state ``phase`` (0: ED, 1: ES): ED's fractions warped by
        ``exp(phase * v)``, (B, K, S, S, S); each voxel's fractions still sum to 1 inside the grid."""
        u = self.displacement(self.velocity(ed, c, z), phase)
        return spatial.warp(ed, u)

    def forward(self, ed: torch.Tensor, es: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: encode (ED, ES), sample z, deform ED. Returns (es_hat, mu, logvar, v)."""
        mu, logvar = self.encode(ed, es, c)
        z = self.reparameterize(mu, logvar)
        v = self.velocity(ed, c, z)
        return spatial.warp(ed, self.displacement(v)), mu, logvar, v

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_es(self, ed: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A generated end systole for each ED label map: a fresh z ~ p(z | c) (:meth:`prior_z`), then :meth:`deform`.

        Returns label fractions (B, K, S, S, S); ``argmax(dim=1)`` gives a label map. Evaluation
        mode, no gradients; the model's training mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            return self.deform(ed, c, self.prior_z(c, generator).to(ed.device))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def cycle(self, ed: torch.Tensor, c: torch.Tensor, z: torch.Tensor, phases: Sequence[float]) -> torch.Tensor:
        """Label maps over a cardiac cycle: (B, T, S, S, S) int64, frame t warped by ``exp(s_t v)``.

        ``phases`` are the contraction states s_t of the T frames (0 at ED, 1 at ES), e.g. the
        phantom's ``contraction_profile(frames, es_frame)``. One velocity serves every frame:
        only its integration changes. Along ``exp(s v)`` a volume shrinks about geometrically,
        ``V(s) ~ EDV (ESV / EDV)^s``, where the phantom's falls linearly, ``EDV (1 - EF s)``: the
        intermediate frames contract a little early (``s = log(1 - EF s') / log(1 - EF)`` would
        make them follow the phantom's curve ``s'``).
        """
        phases = [float(s) for s in phases]
        if not phases:
            raise ValueError("phases: expected at least one contraction state")
        v = self.velocity(ed, c, z)
        frames = [spatial.warp(ed, self.displacement(v, s)).argmax(dim=1) for s in phases]   # T x (B, S, S, S)
        return torch.stack(frames, dim=1)
