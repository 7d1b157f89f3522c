"""The plain 3D autoencoder (survey Eq. 6), its denoising use (Eq. 9), and PCA, the classical baseline.

**Autoencoder** (AE). An encoder ``E_phi`` squeezes a volume ``x`` into a short latent vector
``z = E_phi(x)``, a decoder ``D_theta`` expands it back, and both are trained to minimise the
reconstruction error ``E_x ||x - D_theta(E_phi(x))||²`` (survey Eq. 6). The bottleneck (``Z``
numbers for ``D·H·W`` voxels) is what forces the network to learn what brains have in common.
:class:`Autoencoder3D` uses exactly the layers of :class:`~gen3d_lessons.models.vae.VAE3D`, so
that the AE and the VAE of chapter 4 differ only in their objective.

**Denoising autoencoder** (DAE; Vincent et al. 2008, survey Eq. 9): the same network, fed a
corrupted input ``T(x)`` and trained to return the clean ``x``. Nothing in the network changes,
only the training step (:func:`gen3d_lessons.training.generative.ae_step` with ``noise_std > 0``).

**PCA** (:class:`PCA3D`): the best *linear* autoencoder. With the training volumes as rows of a
matrix, the top ``k`` right singular vectors of the centred matrix give the encoder
``z = Vᵀ(x - mean)`` and the decoder ``x = mean + V z``; no linear map with ``k`` numbers per
volume reconstructs the training set with a smaller squared error (Eckart–Young). With ``N``
training volumes there are at most ``N - 1`` components.

Shapes: ``x: (B, C, D, H, W)``, ``z: (B, Z)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import check_pyramid, check_volumes, down, up


@dataclass
class AEConfig:
    """Hyperparameters of :class:`Autoencoder3D` (those of :class:`~gen3d_lessons.models.vae.VAEConfig`)."""

    in_channels: int = 1
    size: int = 32                               # edge of the cubic input (voxels)
    channels: tuple[int, ...] = (16, 32, 64)     # one stride-2 level each: 32³ -> 16³ -> 8³ -> 4³
    latent_dim: int = 32                         # Z
    groups: int = 8                              # GroupNorm groups (must divide every channel count)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels < 1 or self.latent_dim < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"AEConfig: in_channels, latent_dim and channels must be positive, got {self}")
        check_pyramid("AEConfig", self.channels, self.groups, self.size)

    @property
    def bottleneck(self) -> int:
        """Edge of the coarsest feature map."""
        return self.size // 2 ** len(self.channels)


class Autoencoder3D(nn.Module):
    """A deterministic 3D autoencoder with a vector bottleneck: ``encode``, ``decode``, ``forward``.

    The decoder's output is unbounded (no sigmoid), as in :class:`~gen3d_lessons.models.vae.VAE3D`.
    """

    def __init__(self, cfg: AEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        ch, g, b = cfg.channels, cfg.groups, cfg.bottleneck
        flat = ch[-1] * b ** 3                                   # features of the coarsest map
        self.encoder = nn.Sequential(*(down(c_in, c_out, g) for c_in, c_out in zip((cfg.in_channels,) + ch, ch)))
        self.to_latent = nn.Linear(flat, cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, flat)
        rev = ch[::-1]                                           # e.g. (64, 32, 16)
        self.decoder = nn.Sequential(*(up(c_in, c_out, g) for c_in, c_out in zip(rev, rev[1:])),
                                     up(ch[0], cfg.in_channels, None))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = E_phi(x): (B, C, D, H, W) -> (B, Z)."""
        check_volumes(x, self.cfg.in_channels, self.cfg.size)
        return self.to_latent(self.encoder(x).flatten(1))       # (B, C_last * b³) -> (B, Z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D_theta(z): (B, Z) -> (B, C, D, H, W)."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        b = self.cfg.bottleneck
        h = self.from_latent(z).view(z.shape[0], self.cfg.channels[-1], b, b, b)   # (B, C_last, b, b, b)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1. encode, 2. decode: the reconstruction D(E(x)) of Eq. 6."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """D(E(x)) without gradients, in evaluation mode."""
        self.eval()
        return self.forward(x)

    @torch.no_grad()
    def reconstruct_without_code(self, x: torch.Tensor) -> torch.Tensor:
        """D(0): what the decoder returns when the bottleneck carries nothing (no gradients, evaluation mode).

        For this AE it is one volume, whatever ``x``: a network that describes brains by their
        code has nothing left without it. ``x`` (B, C, D, H, W) only sets the batch size here;
        the U-Net version also passes on its skips.
        """
        self.eval()
        check_volumes(x, self.cfg.in_channels, self.cfg.size)
        return self.decode(torch.zeros(len(x), self.cfg.latent_dim, device=x.device))


class UNetAutoencoder3D(Autoencoder3D):
    """:class:`Autoencoder3D` plus the U-Net's skip connections (Ronneberger et al. 2015).

    The same encoder, the same bottleneck ``z`` and a decoder of the same shape, but every decoder
    level also receives the encoder's feature map of its own size, concatenated to its input (so
    each transposed convolution takes twice the channels)::

        x ─ down ─ e1 ─ down ─ e2 ─ down ─ e3 ─ linear ─ z ─ linear ─ h
                   │            │            └────────── cat ────────┘ up
                   │            └──────────────────────── cat ─────────┘ up
                   └───────────────────────────────────── cat ───────────┘ up ─ x_hat

    The finest skip, ``e1``, holds more numbers than the input has voxels (16 channels at half
    the edge: twice as many), so the network can pass the input around the bottleneck.
    ``decode(z, skips)`` takes the skips that ``encode_with_skips`` returned.
    """

    def __init__(self, cfg: AEConfig | None = None):
        super().__init__(cfg)
        cfg = self.cfg
        rev = cfg.channels[::-1]                                 # e.g. (64, 32, 16)
        # the mirror of the encoder, each transposed convolution taking [h, skip]: 2x the channels
        self.decoder = nn.Sequential(*(up(2 * c_in, c_out, cfg.groups) for c_in, c_out in zip(rev, rev[1:])),
                                     up(2 * cfg.channels[0], cfg.in_channels, None))

    def encode_with_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``z`` (B, Z) and the encoder's feature maps, finest first: [(B, c1, D/2, ...), (B, c2, D/4, ...), ...]."""
        check_volumes(x, self.cfg.in_channels, self.cfg.size)
        skips, h = [], x
        for level in self.encoder:
            h = level(h)                                                    # (B, c_k, D / 2^k, H / 2^k, W / 2^k)
            skips.append(h)
        return self.to_latent(h.flatten(1)), skips

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_skips(x)[0]

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x_hat from the bottleneck ``z`` and the skips (``None``: skips of zeros, the bottleneck alone)."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.latent_dim}), got {tuple(z.shape)}")
        b, ch = self.cfg.bottleneck, self.cfg.channels
        if skips is None:
            edges = [self.cfg.size // 2 ** (k + 1) for k in range(len(ch))]          # 16, 8, 4 for 32³
            skips = [z.new_zeros(z.shape[0], c, e, e, e) for c, e in zip(ch, edges)]
        if len(skips) != len(ch):
            raise ValueError(f"skips: expected {len(ch)} feature maps, got {len(skips)}")
        h = self.from_latent(z).view(z.shape[0], ch[-1], b, b, b)         # (B, C_last, b, b, b)
        for level, skip in zip(self.decoder, reversed(skips)):
            h = level(torch.cat([h, skip], dim=1))                          # (B, 2C, ...) -> (B, C_next, 2x edge)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1. encode, keeping the skips, 2. decode with them."""
        z, skips = self.encode_with_skips(x)
        return self.decode(z, skips)

    @torch.no_grad()
    def reconstruct_without_code(self, x: torch.Tensor) -> torch.Tensor:
        """D(0, skips(x)): the bottleneck erased, the skips kept. If this still looks like ``x``, the
        network copies its input around the bottleneck instead of describing it."""
        self.eval()
        z, skips = self.encode_with_skips(x)
        return self.decode(torch.zeros_like(z), skips)


class PCA3D:
    """Principal component analysis of volumes: the linear autoencoder with ``k`` components.

    ``fit(x)`` on training volumes (N, C, D, H, W), then ``encode`` (B, C, D, H, W) -> (B, k),
    ``decode`` (B, k) -> (B, C, D, H, W), ``reconstruct`` = decode ∘ encode. ``k`` is capped at
    ``N - 1``: centred, N volumes span at most N - 1 directions.
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive number of components, got {k!r}")
        self.k = k
        self.mean: torch.Tensor | None = None       # (1, C, D, H, W)
        self.components: torch.Tensor | None = None  # (k, C·D·H·W), orthonormal rows
        self.explained_variance: torch.Tensor | None = None  # (k,) variance along each component

    def fit(self, x: torch.Tensor) -> "PCA3D":
        """The mean volume and the top ``k`` principal axes of the training volumes."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or len(set(x.shape[2:])) != 1:
            raise ValueError(f"x: expected training volumes (N, C, D, D, D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_volumes(x, x.shape[1], x.shape[2])
        n = x.shape[0]
        if self.k > n - 1:
            raise ValueError(f"k: {self.k} components need at least {self.k + 1} training volumes, got {n} "
                             f"(N centred volumes span at most N - 1 directions)")
        # 1. centre: one row per volume
        self.mean = x.double().mean(0, keepdim=True)                       # (1, C, D, H, W)
        rows = (x.double() - self.mean).flatten(1)                         # (N, V)
        # 2. SVD of the N x V matrix: cheap, because N is small
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)            # s: (N,), vh: (N, V)
        self.components = vh[:self.k]                                      # (k, V)
        self.explained_variance = s[:self.k] ** 2 / max(n - 1, 1)
        self.mean = self.mean.float()
        return self

    def _fitted(self) -> None:
        if self.components is None:
            raise ValueError("PCA3D: call fit(training_volumes) first")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = Vᵀ (x - mean): (B, C, D, H, W) -> (B, k)."""
        self._fitted()
        check_volumes(x, self.mean.shape[1], self.mean.shape[2])
        return ((x.double() - self.mean.double()).flatten(1) @ self.components.T).float()   # (B, k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = mean + V z: (B, k) -> (B, C, D, H, W)."""
        self._fitted()
        if z.ndim != 2 or z.shape[1] != self.k:
            raise ValueError(f"z: expected shape (B, {self.k}), got {tuple(z.shape)}")
        x = z.double() @ self.components                                       # (B, V)
        return (x.view(z.shape[0], *self.mean.shape[1:]) + self.mean.double()).float()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The projection of ``x`` onto the mean plus the span of the ``k`` components."""
        return self.decode(self.encode(x))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` new volumes from probabilistic PCA: each coefficient ``z_j ~ N(0, λ_j)`` with
        ``λ_j`` the variance along component j, then decoded: (n, C, D, H, W). The book's linear
        baseline for every sampler."""
        self._fitted()
        z = torch.randn(n, self.k, generator=generator)                    # (n, k) ~ N(0, I)
        return self.decode(z * self.explained_variance.float().sqrt())


__all__ = ["AEConfig", "Autoencoder3D", "UNetAutoencoder3D", "PCA3D"]
