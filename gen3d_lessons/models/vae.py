"""A 3D variational autoencoder (VAE) and its conditional version (CVAE).

The VAE (Kingma & Welling 2014; survey Eq. 7) encodes a volume ``x`` into a Gaussian
``q_phi(z | x) = N(mu, diag(exp(logvar)))`` over a small latent vector, samples
``z = mu + sigma * eps`` (the reparameterisation trick, so that gradients reach the encoder),
and decodes ``z`` back into a volume. Training maximises the evidence lower bound

    log p(x) >= E_q[log p_theta(x | z)] - KL(q_phi(z | x) || N(0, I)),

which, for a Gaussian decoder with a fixed variance, is a reconstruction error plus a KL term
(:func:`gen3d_lessons.losses.kl_to_standard_normal`).

The CVAE (Sohn et al. 2015; survey Eq. 8) gives both halves a condition ``c`` (a vector such
as age and scanner site): ``q_phi(z | x, c)`` and ``p_theta(x | z, c)``. The latent then only
has to carry what ``c`` does not already explain. Here ``c`` is concatenated to the flattened
encoder features and to ``z``; ``cond_dim = 0`` gives the plain VAE.

Shapes: ``x: (B, C, D, H, W)``, ``z, mu, logvar: (B, Z)``, ``c: (B, K)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import check_pyramid, down, up


@dataclass
class VAEConfig:
    """Hyperparameters of :class:`VAE3D`. ``channels[k]`` is the width after the k-th halving."""

    in_channels: int = 1
    size: int = 32                               # edge of the cubic input (voxels)
    channels: tuple[int, ...] = (16, 32, 64)     # one stride-2 level each: 32³ -> 16³ -> 8³ -> 4³
    latent_dim: int = 64                         # Z
    cond_dim: int = 0                            # K; 0: a plain VAE, > 0: a CVAE
    groups: int = 8                              # GroupNorm groups (must divide every channel count)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels < 1 or self.latent_dim < 1 or self.cond_dim < 0 or not self.channels:
            raise ValueError(f"VAEConfig: in_channels, latent_dim and channels must be positive and "
                             f"cond_dim >= 0, got {self}")
        check_pyramid("VAEConfig", self.channels, self.groups, self.size)

    @property
    def bottleneck(self) -> int:
        """Edge of the coarsest feature map."""
        return self.size // 2 ** len(self.channels)


class VAE3D(nn.Module):
    """3D (conditional) VAE with a vector latent.

    ``encode(x, c) -> (mu, logvar)``, ``reparameterize(mu, logvar) -> z``,
    ``decode(z, c) -> x_hat``, ``forward(x, c) -> (x_hat, mu, logvar)``; ``c`` is required
    exactly when ``cfg.cond_dim > 0``. The decoder's output is unbounded (no sigmoid): the
    loss is a squared error, the Gaussian log-likelihood up to constants.
    """

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        ch, g, b = cfg.channels, cfg.groups, cfg.bottleneck
        flat = ch[-1] * b ** 3                                   # features of the coarsest map
        # encoder: one stride-2 block per level, 32³ -> 16³ -> 8³ -> 4³ for three levels
        self.encoder = nn.Sequential(*(down(c_in, c_out, g) for c_in, c_out in zip((cfg.in_channels,) + ch, ch)))
        self.to_stats = nn.Linear(flat + cfg.cond_dim, 2 * cfg.latent_dim)   # -> (mu, logvar)
        # decoder: the mirror image
        self.from_latent = nn.Linear(cfg.latent_dim + cfg.cond_dim, flat)
        rev = ch[::-1]                                           # e.g. (64, 32, 16)
        self.decoder = nn.Sequential(*(up(c_in, c_out, g) for c_in, c_out in zip(rev, rev[1:])),
                                     up(ch[0], cfg.in_channels, None))

    # ----- helpers -----------------------------------------------------------------------------
    def _check_condition(self, c: torch.Tensor | None, batch: int) -> None:
        k = self.cfg.cond_dim
        if k == 0 and c is not None:
            raise ValueError("c: this VAE has cond_dim=0 and takes no condition; build a CVAE with "
                             "VAEConfig(cond_dim=K) to condition on a (B, K) vector")
        if k > 0 and (c is None or c.ndim != 2 or c.shape != (batch, k)):
            got = None if c is None else tuple(c.shape)
            raise ValueError(f"c: this CVAE needs a condition of shape ({batch}, {k}), got {got}")

    def _with(self, h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return h if c is None else torch.cat([h, c.to(h.dtype)], dim=1)

    # ----- the model's maths -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q_phi(z | x[, c]): the mean and log-variance, each (B, Z)."""
        n = self.cfg.size
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or tuple(x.shape[2:]) != (n, n, n):
            raise ValueError(f"x: expected shape (B, {self.cfg.in_channels}, {n}, {n}, {n}), got {tuple(x.shape)}")
        self._check_condition(c, x.shape[0])
        h = self.encoder(x).flatten(1)                           # (B, C_last * b³)
        mu, logvar = self.to_stats(self._with(h, c)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)                     # keeps exp(logvar) finite early on

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): a sample that gradients flow through."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of p_theta(x | z[, c]), (B, C, D, H, W)."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        self._check_condition(c, z.shape[0])
        b = self.cfg.bottleneck
        h = self.from_latent(self._with(z, c))                   # (B, C_last * b³)
        h = h.view(z.shape[0], self.cfg.channels[-1], b, b, b)   # (B, C_last, b, b, b)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """1. encode, 2. sample z (the mean in eval mode), 3. decode: (x_hat, mu, logvar)."""
        mu, logvar = self.encode(x, c)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z, c), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's mean at the posterior mean: the deterministic reconstruction used for residuals."""
        mu, _ = self.encode(x, c)
        return self.decode(mu, c)

    @torch.no_grad()
    def interpolate(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the straight line between the posterior means of two volumes x = (x_0, x_1), (2, C, D, H, W).

        ``z(t) = (1 - t) mu_phi(x_0) + t mu_phi(x_1)`` for each ``t`` (T,) in [0, 1]: returns (T, C, D, H, W).
        A path through a latent space that was trained to be smooth should decode to one brain
        at every point, not to two overlaid ones (the voxel cross-fade). ``c``: (2, K) for a CVAE.
        """
        if x.ndim != 5 or len(x) != 2:
            raise ValueError(f"x: expected the two end points (2, C, D, H, W), got {tuple(x.shape)}")
        if t.ndim != 1:
            raise ValueError(f"t: expected fractions (T,), got shape {tuple(t.shape)}")
        mu, _ = self.encode(x, c)                                # (2, Z)
        t = t.to(mu.device)[:, None]                             # (T, 1)
        c_t = None if c is None else (1 - t) * c[:1].to(mu.device) + t * c[1:].to(mu.device)
        return self.decode((1 - t) * mu[:1] + t * mu[1:], c_t)  # (T, C, D, H, W)

    @torch.no_grad()
    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n volumes from the prior: z ~ N(0, I), x = decode(z[, c])."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator).to(device)
        return self.decode(z, c)


__all__ = ["VAEConfig", "VAE3D"]
