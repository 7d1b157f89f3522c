"""A 3D VQ-VAE and a small autoregressive transformer over its grid of codes.

**VQ-VAE** (van den Oord et al. 2017). An encoder maps a volume to a coarse grid of vectors
``z_e`` (for a 32³ volume and two halvings, an 8³ grid); each vector is replaced by its nearest
entry of a learned codebook ``{e_1, ..., e_K}``,

    k(i) = argmin_j || z_e(i) - e_j ||,        z_q(i) = e_{k(i)},

and a decoder maps ``z_q`` back to the volume. The argmin has no gradient, so the decoder's
gradient is copied onto ``z_e`` (the straight-through estimator) and a commitment term
``beta * || z_e - sg(z_q) ||²`` keeps the encoder close to its codes. The codebook itself follows
an exponential moving average of the vectors assigned to each code (:class:`VectorQuantizerEMA`).
MONAI ships a VQ-VAE too (``monai.networks.nets.VQVAE``); ours is smaller, starts its codebook
from data and restarts unused codes, which is what lets it train in a few hundred CPU steps.

**Transformer over the codes** (the second stage of Pinaya et al. 2022, in the spirit of
PixelRNN/PixelCNN, van den Oord et al. 2016). The code grid is read in raster order,
``s = (k_1, ..., k_T)`` with ``T = d·h·w``, and the transformer learns the factorisation

    p(s) = prod_t p(k_t | k_1, ..., k_{t-1})

with a causal mask (position t only attends to positions < t) and a next-token cross-entropy.
A start token is put in front so that the first code is predicted too. The per-code
probabilities it returns are what anomaly detection thresholds: a code the healthy training
set made unlikely marks an unusual region.

Shapes: ``x: (B, C, D, H, W)``, ``z_e, z_q: (B, E, d, h, w)``, codes ``(B, d, h, w)`` int64,
token sequences ``(B, T)``, logits ``(B, T, K)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..blocks import conv_norm_act, down, up
from ..profiles import step_cap


# 1. The VQ-VAE -----------------------------------------------------------------------------------

@dataclass
class VQVAEConfig:
    """Hyperparameters of :class:`VQVAE3D`. Each entry of ``channels`` is one stride-2 level."""

    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32)     # 32³ -> 16³ -> 8³ codes
    num_embeddings: int = 64                 # K: the codebook size
    embedding_dim: int = 16                  # E: the length of each code vector
    commitment_cost: float = 0.25            # beta
    decay: float = 0.9                       # EMA decay of the codebook
    groups: int = 8                          # GroupNorm groups

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.in_channels < 1 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"VQVAEConfig: in_channels and channels must be positive, got {self}")
        if self.num_embeddings < 2 or self.embedding_dim < 1:
            raise ValueError(f"VQVAEConfig: need num_embeddings >= 2 and embedding_dim >= 1, got {self}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"VQVAEConfig: decay must be in (0, 1), got {self.decay}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"VQVAEConfig: groups={self.groups} must divide every channel count {self.channels}")

    @property
    def factor(self) -> int:
        """How many voxels along an edge one code covers."""
        return 2 ** len(self.channels)


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantisation with a codebook kept as an exponential moving average.

    Each code e_j follows the mean of the encoder vectors assigned to it (van den Oord et al.
    2017, appendix; Razavi et al. 2019): ``N_j <- g N_j + (1 - g) n_j``, ``m_j <- g m_j + (1 - g)
    sum_i z_i``, ``e_j = m_j / N_j``. Two habits make it train in a few hundred steps:
    the codebook starts as encoder vectors of the first batch (not random points far from the
    data), and a code that has gone unused is moved onto a random vector of the current batch.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, decay: float = 0.9, eps: float = 1e-5):
        super().__init__()
        self.K, self.E, self.decay, self.eps = num_embeddings, embedding_dim, decay, eps
        self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim) * 0.1)   # (K, E)
        self.register_buffer("cluster_size", torch.ones(num_embeddings))                    # N_j
        self.register_buffer("embed_sum", self.codebook.clone())                            # m_j
        self.register_buffer("initialised", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the closest code for each row of z (N, E): (N,)."""
        # ||z - e||² = ||z||² - 2 z·e + ||e||²  (the ||z||² term does not change the argmin)
        d = -2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]   # (N, K)
        return d.argmin(1)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, k: torch.Tensor) -> None:
        if not bool(self.initialised):                     # first batch: codes = data vectors
            self.codebook.copy_(z[torch.randint(len(z), (self.K,), device=z.device)])
            self.embed_sum.copy_(self.codebook)
            self.cluster_size.fill_(1.0)
            self.initialised.fill_(True)
            k = self.nearest(z)
        onehot = F.one_hot(k, self.K).type(z.dtype)        # (N, K)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        # Laplace smoothing keeps N_j > 0, then e_j = m_j / N_j
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
        self.codebook.copy_(self.embed_sum / size[:, None])
        # restart dead codes on random vectors of this batch
        dead = self.cluster_size < 0.03
        if dead.any():
            fresh = z[torch.randint(len(z), (int(dead.sum()),), device=z.device)]
            self.codebook[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, E, d, h, w) -> (z_q with straight-through gradient, commitment loss, codes (B, d, h, w))."""
        B, E, d, h, w = z_e.shape
        z = rearrange(z_e, "b e d h w -> (b d h w) e")     # (N, E)
        k = self.nearest(z)                                 # (N,)
        if self.training:
            self._update(z.detach(), k)
            k = self.nearest(z)
        z_q = self.codebook[k]                               # (N, E)
        commitment = F.mse_loss(z, z_q.detach())             # || z_e - sg(z_q) ||²
        z_q = z + (z_q - z).detach()                         # straight through: forward z_q, backward z
        z_q = rearrange(z_q, "(b d h w) e -> b e d h w", b=B, d=d, h=h, w=w)
        return z_q, commitment, k.view(B, d, h, w)


class VQVAE3D(nn.Module):
    """Encoder -> vector quantiser -> decoder.

    ``encode(x) -> z_e``, ``quantize(z_e) -> (z_q, commitment loss, codes)``, ``decode(z_q) -> x_hat``,
    ``forward(x) -> (x_hat, commitment loss)``; ``codes(x)`` and ``decode_codes(k)`` for the
    transformer stage.
    """

    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VQVAEConfig()
        ch, g = cfg.channels, cfg.groups
        # the 3×3×3 conv_norm_act layers run at the code resolution, where they are cheap (8³ voxels)
        self.encoder = nn.Sequential(
            *(down(c_in, c_out, g) for c_in, c_out in zip((cfg.in_channels,) + ch, ch)),
            conv_norm_act(ch[-1], ch[-1], norm="group", groups=g), nn.Conv3d(ch[-1], cfg.embedding_dim, 1))
        self.quantizer = VectorQuantizerEMA(cfg.num_embeddings, cfg.embedding_dim, cfg.decay)
        rev = ch[::-1]
        self.decoder = nn.Sequential(
            *conv_norm_act(cfg.embedding_dim, ch[-1], norm="group", groups=g),   # unpacked: decoder.0, .1, .2
            conv_norm_act(ch[-1], ch[-1], norm="group", groups=g),
            *(up(c_in, c_out, g) for c_in, c_out in zip(rev, rev[1:])),
            up(ch[0], cfg.in_channels, None))

    def _check(self, x: torch.Tensor) -> None:
        f = self.cfg.factor
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or any(s % f for s in x.shape[2:]):
            raise ValueError(f"x: expected shape (B, {self.cfg.in_channels}, D, H, W) with D, H, W multiples of "
                             f"{f}, got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z_e: (B, E, D/f, H/f, W/f) with f = cfg.factor."""
        self._check(x)
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, commitment loss, codes); in training mode this also moves the codebook."""
        return self.quantizer(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """1. encode, 2. quantise, 3. decode: (x_hat, commitment loss)."""
        z_q, commitment, _ = self.quantize(self.encode(x))
        return self.decode(z_q), commitment

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The index k(i) of every code vector: (B, d, h, w) int64."""
        z_e = self.encode(x)
        B, _, d, h, w = z_e.shape
        return self.quantizer.nearest(rearrange(z_e, "b e d h w -> (b d h w) e")).view(B, d, h, w)

    @torch.no_grad()
    def decode_codes(self, k: torch.Tensor) -> torch.Tensor:
        """x_hat from a grid of code indices (B, d, h, w)."""
        if k.ndim != 4:
            raise ValueError(f"k: expected code indices of shape (B, d, h, w), got {tuple(k.shape)}")
        if k.min() < 0 or k.max() >= self.cfg.num_embeddings:
            raise ValueError(f"k: code indices must lie in [0, {self.cfg.num_embeddings - 1}], "
                             f"got [{int(k.min())}, {int(k.max())}]")
        z_q = rearrange(self.quantizer.codebook[k], "b d h w e -> b e d h w")
        return self.decode(z_q)


# 2. The autoregressive transformer ---------------------------------------------------------------

def to_sequence(k: torch.Tensor) -> torch.Tensor:
    """Raster order: (B, d, h, w) -> (B, T), the last axis running fastest."""
    return rearrange(k, "b d h w -> b (d h w)")


def to_grid(s: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of :func:`to_sequence`: (B, T) -> (B, d, h, w)."""
    d, h, w = shape
    return rearrange(s, "b (d h w) -> b d h w", d=d, h=h, w=w)


@dataclass
class TransformerConfig:
    """Hyperparameters of :class:`CodeTransformer` (a small GPT)."""

    vocab_size: int = 32          # K: the VQ-VAE's codebook size
    block_size: int = 512         # T: tokens per volume (8³ codes)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError(f"TransformerConfig: every size must be positive, got {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"TransformerConfig: n_embd {self.n_embd} must be divisible by n_head {self.n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t only."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, h: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``h: (B, T, n_embd)``. With a ``cache`` (a dict, empty at the first token), ``h`` holds the
        next token(s) only: their keys and values are appended to the cache and they attend to every
        cached position — the keys and values of earlier tokens never change in a causal model."""
        q, k, v = self.qkv(h).chunk(3, dim=2)                                  # 3 x (B, T, n_embd)
        q, k, v = (rearrange(a, "b t (nh hs) -> b nh t hs", nh=self.n_head) for a in (q, k, v))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, nh, t, hs)
            cache["k"], cache["v"] = k, v
            if q.shape[2] == 1:        # one new query sees every cached key: no mask needed
                y = F.scaled_dot_product_attention(q, k, v)                    # (B, nh, 1, hs)
                return self.proj(rearrange(y, "b nh t hs -> b t (nh hs)"))
            if q.shape[2] != k.shape[2]:
                raise ValueError("cache: several new tokens at once only for an empty cache")
        # is_causal=True is the causal mask: softmax over keys <= query position only
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.proj(rearrange(y, "b nh t hs -> b t (nh hs)"))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, h: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = h + self.attn(self.ln1(h), cache)
        return h + self.mlp(self.ln2(h))


class CodeTransformer(nn.Module):
    """p(k_t | k_<t) over a raster-ordered code sequence.

    ``forward(s)`` takes the codes ``s: (B, T)`` and returns logits ``(B, T, K)`` whose row t is
    the prediction of ``s[:, t]`` from ``s[:, :t]`` (a start token stands in front of the first).
    """

    def __init__(self, cfg: TransformerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TransformerConfig()
        self.bos = cfg.vocab_size                                   # the start token's id
        self.tok = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)
        self.pos = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if s.ndim != 2 or s.shape[1] > self.cfg.block_size:
            raise ValueError(f"s: expected codes of shape (B, T <= {self.cfg.block_size}), got {tuple(s.shape)}")
        if torch.is_floating_point(s) or (s.numel() and (s.min() < 0 or s.max() >= self.cfg.vocab_size)):
            raise ValueError(f"s: expected integer codes in [0, {self.cfg.vocab_size - 1}], got dtype {s.dtype}"
                             + (f" and range [{int(s.min())}, {int(s.max())}]" if s.numel() else ""))
        # 1. shift right: the input at t is the code at t - 1 (the start token at t = 0)
        B, T = s.shape
        start = torch.full((B, 1), self.bos, dtype=torch.long, device=s.device)
        inp = torch.cat([start, s[:, :-1]], dim=1)                   # (B, T)
        # 2. embed tokens and positions, 3. causal blocks, 4. logits over the K codes
        h = self.tok(inp) + self.pos[:, :T]                          # (B, T, n_embd)
        h = self.blocks(h)
        return self.head(self.ln_f(h))                               # (B, T, K)

    def loss(self, s: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy, mean over tokens (nats per code)."""
        logits = self.forward(s)
        return F.cross_entropy(rearrange(logits, "b t k -> (b t) k"), rearrange(s, "b t -> (b t)"))

    @torch.no_grad()
    def code_probabilities(self, s: torch.Tensor) -> torch.Tensor:
        """p(s_t | s_<t) of the code actually present at every position: (B, T)."""
        p = self.forward(s).softmax(dim=-1)                          # (B, T, K)
        return p.gather(2, s.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n code sequences (n, T), one token at a time (T steps).

        Each step runs the network on the newest token only, with the keys and values of the
        earlier tokens kept in a cache per block (a "KV cache"): the same conditionals as
        ``forward`` on the whole prefix, at a fraction of the cost.
        """
        if not (isinstance(n, int) and n >= 1) or not temperature > 0:
            raise ValueError(f"n: expected a positive integer and temperature > 0, got n={n!r}, "
                             f"temperature={temperature!r}")
        self.eval()
        device = self.pos.device
        s = torch.zeros(n, self.cfg.block_size, dtype=torch.long, device=device)
        caches: list[dict] = [{} for _ in self.blocks]
        token = torch.full((n,), self.bos, dtype=torch.long, device=device)         # input at t = 0
        for t in range(step_cap(self.cfg.block_size)):                                # T (fewer in a dry run)
            h = self.tok(token)[:, None] + self.pos[:, t:t + 1]                       # (n, 1, n_embd)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            logits = self.head(self.ln_f(h))[:, 0]                                    # (n, K)
            p = (logits / temperature).softmax(dim=-1)
            s[:, t] = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(device)
            token = s[:, t]
        return s

    @torch.no_grad()
    def nll_bits(self, s: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each code sequence (B, T), in bits per code: (B,)."""
        logits = self.forward(s)                                                      # (B, T, K)
        nll = F.cross_entropy(rearrange(logits, "b t k -> b k t"), s, reduction="none")   # (B, T) nats
        return nll.mean(1) / math.log(2)


__all__ = ["VQVAEConfig", "VQVAE3D", "VectorQuantizerEMA", "TransformerConfig", "CodeTransformer", "CausalSelfAttention", "Block",
           "to_sequence", "to_grid"]
