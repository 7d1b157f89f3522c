"""A 3D PixelCNN over quantised volumes, and the two baselines it must beat.

**The factorisation** (PixelRNN/PixelCNN, van den Oord et al. 2016; survey §2.5). Quantise a
volume to ``L`` intensity levels and read its voxels in raster order — ``w`` fastest, then
``h``, then ``d`` — as ``x_1, ..., x_N``. The chain rule gives its exact likelihood,

    p(x) = prod_i p(x_i | x_1, ..., x_{i-1}),

and a PixelCNN predicts all ``N`` conditionals at once, one softmax over the ``L`` levels per
voxel, with convolutions whose kernels are **masked** so that voxel ``i`` never sees voxel ``i``
itself or anything after it (:func:`causal_mask`):

- type **A** (first layer): the kernel taps strictly before the centre in raster order — the
  ``3×3`` patch of the previous plane, the three voxels of the previous row, the voxel to the
  left;
- type **B** (later layers): the same plus the centre, which by then holds only information
  about earlier voxels.

Stacking masked layers grows what a voxel sees backwards, but not everywhere: in the current
plane a voxel ``r`` rows up and more than ``r`` columns to the right is never reached (the
"blind spot" of the 2D PixelCNN, which the gated PixelCNN of van den Oord et al. 2016b removes
with separate vertical and horizontal stacks); in earlier planes the view widens by about one
voxel per layer, with blind corners of its own. :func:`receptive_field` measures it by backpropagation.

The network also knows *where* each voxel is: it reads the per-voxel histogram of the
training set (the baseline below) as an extra input and adds its own logits to the histogram's
log-probabilities. The histogram is fixed before training, so the factorisation stays exact (it
models ``p(x_i | x_<i, i)``); with the last layer started at zero, an untrained PixelCNN *is* the
histogram baseline, and training teaches it what the voxels already drawn add.

**Baselines.** ``log2 L`` bits per voxel for the uniform distribution over levels, and
:class:`VoxelHistogram`: an independent categorical per voxel position, counted on the training
volumes with add-``alpha`` (Laplace) smoothing so that a level never seen at a position in
training still has a finite cost; :func:`validated_histogram` chooses ``alpha`` on validation volumes.

**Sampling** is one voxel at a time, ``N`` steps. Running the whole network for every step
would cost ``N`` full forward passes; :meth:`PixelCNN3D.sample` instead computes each layer at
the new voxel only, from cached activations of the voxels before it — exact, because with
causal masks nothing already computed changes when a later voxel is filled in (the caching idea
of "fast PixelCNN++", Ramachandran et al. 2017).

Shapes: levels ``x: (B, 1, D, H, W)`` int64 in ``[0, L)``; logits ``(B, L, D, H, W)``; hidden
``h: (B, C, D, H, W)``; per-volume NLL ``(B,)`` in bits per voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import one_hot
from ..profiles import step_cap

# 1. Quantised intensities -----------------------------------------------------------------------


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"{name}: expected shape (B, C, D, H, W), got {tuple(x.shape)}")
    if not torch.is_floating_point(x) or not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite floating-point intensities (no NaN or inf), dtype {x.dtype}")


def quantise(x: torch.Tensor, levels: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Intensities (B, C, D, H, W) -> level indices in ``[0, levels)``: ``L`` equal bins on [lo, hi].

    Values below ``lo`` go to level 0 and above ``hi`` to level ``L - 1``.
    """
    _check_finite(x, "x")
    if levels < 2 or not hi > lo:
        raise ValueError(f"quantise: need levels >= 2 and hi > lo, got levels={levels}, lo={lo}, hi={hi}")
    k = torch.floor((x - lo) / (hi - lo) * levels)
    return k.clamp(0, levels - 1).long()


def dequantise(k: torch.Tensor, levels: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Level indices -> the intensity at the centre of each bin (float32), the inverse of :func:`quantise`."""
    if not isinstance(k, torch.Tensor) or torch.is_floating_point(k):
        raise ValueError(f"k: expected an integer tensor of levels, got {getattr(k, 'dtype', type(k).__name__)}")
    if k.numel() and (k.min() < 0 or k.max() >= levels):
        raise ValueError(f"k: levels must lie in [0, {levels - 1}], got [{int(k.min())}, {int(k.max())}]")
    return lo + (k.float() + 0.5) * (hi - lo) / levels


def _check_levels(x: torch.Tensor, levels: int, name: str = "x") -> None:
    """A (B, 1, D, H, W) integer tensor with values in [0, levels)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor of levels, got {type(x).__name__}")
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name}: expected levels of shape (B, 1, D, H, W), got {tuple(x.shape)}"
                         + (" (a 2D image? this model is 3D)" if x.ndim == 4 else ""))
    if torch.is_floating_point(x) or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer levels (use quantise(...) first), got dtype {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() >= levels):
        raise ValueError(f"{name}: levels must lie in [0, {levels - 1}], got [{int(x.min())}, {int(x.max())}]")


# 2. Causal masks ----------------------------------------------------------------------------------


def causal_mask(kernel: int, kind: str) -> torch.Tensor:
    """(k, k, k) float mask of the taps a voxel may read in raster order over (D, H, W).

    Tap ``(a, b, c)`` is at offset ``(a - m, b - m, c - m)`` from the centre ``m = k // 2``; it is
    kept if that offset comes before ``(0, 0, 0)`` in lexicographic order (type ``"A"``), or
    before or at it (type ``"B"``).
    """
    if kind not in ("A", "B"):
        raise ValueError(f"kind: expected 'A' or 'B', got {kind!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel: expected an odd positive size, got {kernel}")
    m = kernel // 2
    mask = torch.zeros(kernel, kernel, kernel)
    mask[:m] = 1                      # every earlier plane
    mask[m, :m] = 1                   # earlier rows of the current plane
    mask[m, m, :m] = 1                # earlier voxels of the current row
    if kind == "B":
        mask[m, m, m] = 1             # the centre itself
    return mask


class MaskedConv3d(nn.Conv3d):
    """A 3D convolution whose kernel is multiplied by a fixed causal mask (zero padding, 'same' size)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, kind: str):
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        self.kind = kind
        self.register_buffer("mask", causal_mask(kernel, kind)[None, None])   # (1, 1, k, k, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.conv3d(h, self.weight * self.mask, self.bias, padding=self.padding)


# 3. Baselines: no context at all ------------------------------------------------------------------


def uniform_nll_bits(levels: int) -> float:
    """Bits per voxel of the uniform distribution over ``levels`` values: log2 L."""
    return math.log2(levels)


class VoxelHistogram(nn.Module):
    """An independent categorical at every voxel position, counted on training volumes.

    ``p(x_i = l) = (n_i(l) + alpha) / (N + alpha L)`` with ``n_i(l)`` the number of training
    volumes with level ``l`` at voxel ``i`` (add-``alpha`` smoothing; ``alpha = 1`` is Laplace's
    rule). No voxel sees any other: the per-voxel baseline an autoregressive model must beat.
    """

    def __init__(self, levels: int, alpha: float = 1.0):
        super().__init__()
        if levels < 2 or not alpha > 0:
            raise ValueError(f"VoxelHistogram: need levels >= 2 and alpha > 0, got {levels}, {alpha}")
        self.levels, self.alpha = levels, float(alpha)
        self.register_buffer("log_p", torch.zeros(0))          # (L, D, H, W) once fitted

    def fit(self, x: torch.Tensor) -> "VoxelHistogram":
        """Count levels (N, 1, D, H, W) per position; returns self."""
        _check_levels(x, self.levels)
        counts = one_hot(x, self.levels).sum(0)                                        # (L, D, H, W)
        self.log_p = ((counts + self.alpha) / (len(x) + self.alpha * self.levels)).log()
        return self

    def _fitted(self, x: torch.Tensor | None = None) -> None:
        if self.log_p.numel() == 0:
            raise ValueError("VoxelHistogram: call fit(train_levels) first")
        if x is not None:
            _check_levels(x, self.levels)
            if tuple(x.shape[2:]) != tuple(self.log_p.shape[1:]):
                raise ValueError(f"x: spatial shape {tuple(x.shape[2:])} differs from the fitted "
                                 f"{tuple(self.log_p.shape[1:])}")

    def voxel_nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 p(x_i) at every voxel: (B, 1, D, H, W) bits."""
        self._fitted(x)
        log_p = self.log_p[None].expand(len(x), -1, -1, -1, -1)                       # (B, L, D, H, W)
        return -log_p.gather(1, x) / math.log(2)

    def nll_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Bits per voxel of each volume: (B,)."""
        return self.voxel_nll(x).flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes (n, 1, D, H, W), every voxel drawn independently."""
        self._fitted()
        p = self.log_p.exp().flatten(1).t()                                             # (DHW, L)
        draws = torch.multinomial(p.cpu(), n, replacement=True, generator=generator)  # (DHW, n)
        return draws.t().reshape(n, 1, *self.log_p.shape[1:]).to(self.log_p.device)


ALPHAS = (1.0, 0.3, 0.1, 0.03, 0.01)      # pseudo-counts tried by default: Laplace's rule down to almost none


def validated_histogram(x: torch.Tensor, levels: int, validation: torch.Tensor,
                        alphas: Sequence[float] = ALPHAS) -> tuple[VoxelHistogram, dict[float, float]]:
    """The per-voxel histogram baseline, its pseudo-count ``alpha`` chosen on validation volumes.

    For each ``alpha``, a :class:`VoxelHistogram` is counted on the volumes of ``x``
    (N, 1, D, H, W) outside ``validation`` (an (N,) bool mask) and scored on those inside it
    (mean bits per voxel); the ``alpha`` with the lowest score is kept (the first of equals), and
    the histogram is counted again on *all* of ``x``. Held-out volumes play no part in the choice,
    so a model that reads the histogram (the PixelCNN's position prior) never sees them either.
    Returns the histogram and ``{alpha: validation bits per voxel}``.
    """
    _check_levels(x, levels)
    if not isinstance(validation, torch.Tensor) or validation.dtype != torch.bool or validation.shape != (len(x),):
        raise ValueError(f"validation: expected a bool mask of shape ({len(x)},), got "
                         f"{getattr(validation, 'dtype', type(validation).__name__)} {tuple(getattr(validation, 'shape', ()))}")
    if validation.all() or not validation.any():
        raise ValueError("validation: need at least one validation volume and one volume to count")
    if len(alphas) == 0:
        raise ValueError("alphas: expected at least one pseudo-count to try")
    scores = {a: VoxelHistogram(levels, a).fit(x[~validation]).nll_bits(x[validation]).mean().item() for a in alphas}
    best = min(scores, key=scores.get)
    return VoxelHistogram(levels, best).fit(x), scores


# 4. The PixelCNN ----------------------------------------------------------------------------------


@dataclass
class PixelCNNConfig:
    """Hyperparameters of :class:`PixelCNN3D`."""

    levels: int = 8                             # L: intensity levels, the size of each voxel's softmax
    channels: int = 32                          # C: width of the hidden layers
    n_layers: int = 6                           # one type-A masked conv, then n_layers - 1 type-B (residual)
    kernel: int = 3
    shape: tuple[int, int, int] | None = None   # grid of the position prior; None: no prior, any size

    def __post_init__(self):
        if self.levels < 2 or self.channels < 1 or self.n_layers < 1:
            raise ValueError(f"PixelCNNConfig: need levels >= 2, channels >= 1, n_layers >= 1, got {self}")
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise ValueError(f"PixelCNNConfig: kernel must be odd and >= 3, got {self.kernel}")
        if self.shape is not None:
            self.shape = tuple(int(s) for s in self.shape)
            if len(self.shape) != 3 or min(self.shape) < 1:
                raise ValueError(f"PixelCNNConfig: shape must be three positive sizes (D, H, W), got {self.shape}")


class PixelCNN3D(nn.Module):
    """``p(x_i | x_<i, i)`` for every voxel of a quantised volume, in one forward pass.

    1. one-hot levels ``(B, L, D, H, W)`` -> type-A masked conv -> ``h``, plus two ordinary
       (unmasked) 3×3×3 convs of the position prior;
    2. ``n_layers - 1`` residual type-B blocks ``h <- h + conv_B(relu(h))``;
    3. a pointwise head ``relu -> 1×1×1 -> relu -> 1×1×1`` to ``L`` logits per voxel, added to
       the prior's log-probabilities.

    The **position prior** (with ``cfg.shape``) is a :class:`VoxelHistogram` of the training set,
    set with :meth:`set_prior`: the network reads it as an input and adds its own logits to it.
    The head's last layer starts at zero, so before training the model *is* the histogram
    baseline; training teaches it how the voxels already drawn should change those odds.
    Without ``cfg.shape`` the model has no idea where a voxel is, and works at any size.
    """

    def __init__(self, cfg: PixelCNNConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PixelCNNConfig()
        L, C, k = cfg.levels, cfg.channels, cfg.kernel
        self.conv_a = MaskedConv3d(L, C, k, "A")
        self.convs_b = nn.ModuleList(MaskedConv3d(C, C, k, "B") for _ in range(cfg.n_layers - 1))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv3d(C, C, 1), nn.ReLU(), nn.Conv3d(C, L, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        if cfg.shape is not None:
            self.register_buffer("log_prior", torch.full((L, *cfg.shape), -math.log(L)))   # (L, D, H, W)
            # the prior is not data: an ordinary (unmasked) conv may read it ahead of the current voxel
            self.prior_in = nn.Sequential(nn.Conv3d(L, C, k, padding=k // 2), nn.ReLU(),
                                          nn.Conv3d(C, C, k, padding=k // 2))
        else:
            self.log_prior, self.prior_in = None, None

    def set_prior(self, histogram: VoxelHistogram) -> "PixelCNN3D":
        """Use a fitted :class:`VoxelHistogram` (same levels and grid) as the position prior."""
        histogram._fitted()
        if self.log_prior is None or histogram.log_p.shape != self.log_prior.shape:
            raise ValueError(f"histogram: its log-probabilities {tuple(histogram.log_p.shape)} do not fit this "
                             f"model's prior (levels {self.cfg.levels}, shape {self.cfg.shape})")
        self.log_prior.copy_(histogram.log_p)
        return self

    def _check(self, x: torch.Tensor) -> None:
        _check_levels(x, self.cfg.levels)
        if self.cfg.shape is not None and tuple(x.shape[2:]) != self.cfg.shape:
            raise ValueError(f"x: spatial shape {tuple(x.shape[2:])} differs from the prior's grid {self.cfg.shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Levels (B, 1, D, H, W) -> logits (B, L, D, H, W); logits at voxel i depend on x_<i only."""
        self._check(x)
        return self.logits(one_hot(x, self.cfg.levels))

    def features(self, onehot: torch.Tensor) -> torch.Tensor:
        """The masked stack, from one-hot levels (B, L, D, H, W) to hidden features h (B, C, D, H, W)."""
        # 1. first (type A) layer, plus where we are
        h = self.conv_a(onehot)                                                         # (B, C, D, H, W)
        if self.log_prior is not None:
            h = h + self.prior_in(self.log_prior[None])
        # 2. residual type-B layers
        for conv in self.convs_b:
            h = h + conv(F.relu(h))
        return h

    def logits(self, onehot: torch.Tensor) -> torch.Tensor:
        """One-hot levels (B, L, D, H, W) -> logits (B, L, D, H, W): the pointwise head on top of the
        masked stack, added to the prior's log-probabilities."""
        z = self.head(self.features(onehot))                                            # (B, L, D, H, W)
        return z if self.log_prior is None else z + self.log_prior[None]

    def voxel_nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 p(x_i | x_<i) at every voxel: (B, 1, D, H, W) bits. High where the volume surprises the model."""
        return F.cross_entropy(self.forward(x), x[:, 0], reduction="none")[:, None] / math.log(2)

    def nll_bits(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each volume in bits per voxel: (B,)."""
        return self.voxel_nll(x).flatten(1).mean(1)

    # sampling, one voxel at a time with cached activations --------------------------------------

    @staticmethod
    def _tap_matrix(conv: MaskedConv3d) -> torch.Tensor:
        """The masked kernel as a matrix (C_in·k³, C_out), to apply to one flattened patch."""
        return (conv.weight * conv.mask).flatten(1).t()

    @torch.no_grad()
    def _generate(self, n: int, shape: tuple[int, int, int], generator: torch.Generator | None = None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels (n, 1, D, H, W), logits (n, L, D, H, W) they were drawn from).

        Each masked layer keeps a zero-padded buffer of its *input*; at voxel p a layer reads its
        k³ patch from the buffer below (taps before p are final, the mask zeroes the others) and
        its output at p goes into the buffer above. Levels are drawn with the Gumbel-max trick,
        ``argmax(logits + g)``, from noise ``g`` drawn up front.
        """
        L, C, k = self.cfg.levels, self.cfg.channels, self.cfg.kernel
        D, H, W = shape
        m = k // 2
        device = self.conv_a.weight.device
        # 1. buffers: the one-hot input and the input of each type-B layer, padded by m
        padded = (D + 2 * m, H + 2 * m, W + 2 * m)
        x_buf = torch.zeros(n, L, *padded, device=device)                                   # one-hot levels
        a_bufs = [torch.zeros(n, C, *padded, device=device) for _ in self.convs_b]          # relu(h) below each B
        mats = [self._tap_matrix(self.conv_a)] + [self._tap_matrix(c) for c in self.convs_b]
        biases = [self.conv_a.bias] + [c.bias for c in self.convs_b]
        head1, head2 = self.head[1], self.head[3]                                           # the 1×1×1 convs
        w1, w2 = head1.weight.flatten(1).t(), head2.weight.flatten(1).t()                   # (C, C), (C, L)
        # 2. what depends on the position only: the prior's input term and its log-probabilities
        if self.log_prior is not None:
            where, prior = self.prior_in(self.log_prior[None])[0], self.log_prior           # (C, ...), (L, ...)
        else:
            where, prior = torch.zeros(C, *shape, device=device), torch.zeros(L, *shape, device=device)
        u = torch.rand(n, L, D, H, W, generator=generator).clamp_min(1e-12).to(device)
        gumbel = -torch.log(-torch.log(u))                                                   # (n, L, D, H, W)
        levels = torch.zeros(n, 1, D, H, W, dtype=torch.long, device=device)
        logits = torch.zeros(n, L, D, H, W, device=device)
        rows = torch.arange(n, device=device)
        # 3. raster order: w fastest, then h, then d (a dry run stops after a few voxels)
        positions = [(d, i, j) for d in range(D) for i in range(H) for j in range(W)]
        for d, i, j in positions[:step_cap(len(positions))]:
            patch = x_buf[:, :, d:d + k, i:i + k, j:j + k].reshape(n, -1)       # (n, L·k³)
            h = torch.addmm(biases[0] + where[:, d, i, j], patch, mats[0])       # (n, C)
            for buf, mat, b in zip(a_bufs, mats[1:], biases[1:]):
                buf[:, :, d + m, i + m, j + m] = F.relu(h)                       # this layer's input at p
                h = h + torch.addmm(b, buf[:, :, d:d + k, i:i + k, j:j + k].reshape(n, -1), mat)
            z = torch.addmm(head1.bias, F.relu(h), w1).relu_()                   # the pointwise head
            z = torch.addmm(head2.bias + prior[:, d, i, j], z, w2)               # (n, L)
            level = (z / temperature + gumbel[:, :, d, i, j]).argmax(1)          # (n,)
            logits[:, :, d, i, j], levels[:, 0, d, i, j] = z, level
            x_buf[rows, level, d + m, i + m, j + m] = 1.0                        # one-hot at p
        return levels, logits

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int, int] | None = None,
               generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """``n`` volumes of levels (n, 1, D, H, W), one voxel at a time in raster order (D·H·W steps).

        ``shape`` defaults to the prior's grid (and must equal it if the model has a prior).
        """
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n: expected a positive number of samples, got {n!r}")
        shape = self.cfg.shape if shape is None else tuple(int(s) for s in shape)
        if shape is None or len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape: expected three positive sizes (D, H, W), got {shape!r}")
        if self.cfg.shape is not None and shape != self.cfg.shape:
            raise ValueError(f"shape: {shape} differs from the prior's grid {self.cfg.shape}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.eval()
        return self._generate(n, shape, generator, float(temperature))[0]


def receptive_field(model: PixelCNN3D, shape: tuple[int, int, int], voxel: tuple[int, int, int]) -> torch.Tensor:
    """Which input voxels the logits at ``voxel`` depend on: (D, H, W) bool, by backpropagation.

    The one-hot input is made a leaf with ``requires_grad``; a voxel is in the receptive field if
    the gradient of the hidden features at ``voxel`` is non-zero there (the head is pointwise, so
    the logits see what the features see). Causality means every ``True`` comes strictly before
    ``voxel`` in raster order.
    """
    x = torch.randint(0, model.cfg.levels, (1, 1, *shape), device=model.conv_a.weight.device)
    model._check(x)
    onehot = one_hot(x, model.cfg.levels).requires_grad_(True)                          # (1, L, D, H, W)
    model.features(onehot)[0, :, voxel[0], voxel[1], voxel[2]].sum().backward()
    return (onehot.grad[0].abs().sum(0) > 0).cpu()


__all__ = ["quantise", "dequantise", "causal_mask", "MaskedConv3d", "uniform_nll_bits", "VoxelHistogram",
           "ALPHAS", "validated_histogram", "PixelCNNConfig", "PixelCNN3D", "receptive_field"]
