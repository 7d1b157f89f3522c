"""Training HA-GAN (:mod:`gen3d_lessons.models.hagan`), and what a training step costs next to a full-resolution GAN.

One step draws a random slab position ``a`` (in positions of ``F``) and plays the WGAN-GP game
(survey Eq. 5) at two levels at once, with ``r = size / low``:

- **low**: the critic ``D_L`` compares the real volumes average-pooled to ``low³`` with ``G_L(F)``;
- **high**: the critic ``D_H`` compares depth voxels ``a·r .. (a + slab)·r`` of the real volumes
  with ``G_H`` on positions ``a .. a + slab`` of the same ``F``.

The critics minimise the sum of the two Wasserstein losses plus λ times both gradient penalties;
the generator minimises ``−E[D_L(G_L(F))] − E[D_H(G_H(F_slab))]``. Nothing in the step touches
the whole volume at full resolution, fake or real (except to cut and pool the real one).

:func:`train_hagan` is :func:`~gen3d_lessons.training.gan.train_gan` for this step: Adam, an EMA
generator, a probe, ``keep_best``. :func:`step_cost` measures the memory and time of one step of
each kind of GAN at several sizes, for the chapter's point: HA-GAN's training memory grows much
more slowly with the size than a full-resolution GAN's.
"""

from __future__ import annotations

import copy
import itertools
import math
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import check_volumes
from ..losses import discriminator_loss, generator_loss, gradient_penalty
from ..models.gan import Discriminator3D, DiscriminatorConfig, Generator3D, GeneratorConfig
from ..models.hagan import HAGANConfig, HAGANGenerator3D, hagan_critics
from ..profiles import step_cap
from .batch import batch_tensor
from .benchmark import layer_output_bytes, median_step_seconds
from .ema import ema_update
from .fit import History
from .gan import _probed_fit, gan_step

__all__ = ["hagan_step", "train_hagan", "step_cost"]


# 1. One step, and one run ------------------------------------------------------------------------

def hagan_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, critic_low: nn.Module,
               critic_high: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               positions: torch.Generator | None = None, gp_weight: float = 10.0, ema: nn.Module | None = None,
               ema_decay: float = 0.999, ema_warmup: float = 3.0) -> dict[str, float]:
    """One update of both critics (``opt_d`` holds the parameters of both), then one of the generator.

    ``positions``: a CPU ``torch.Generator`` that draws the slab position (one per step, the same
    for every volume of the batch); ``None`` uses torch's global generator. ``ema`` follows the
    generator as in :func:`~gen3d_lessons.training.gan.gan_step`. Returns ``d_loss`` (with the
    penalties), ``g_loss``, the two critics' Wasserstein estimates ``w_low`` and ``w_high``
    (``E[D(real)] − E[D(fake)]``), ``gp`` and the slab position ``start``.
    """
    G, D_L, D_H = generator, critic_low, critic_high
    cfg = G.cfg
    device = next(G.parameters()).device
    # 1. real volumes, their low-resolution version and the slab at a random place
    x = batch_tensor(batch, "image", device)                                                  # (B, 1, s, s, s)
    check_volumes(x, 1, cfg.size, "batch['image']")
    a = int(torch.randint(0, cfg.low - cfg.slab + 1, (1,), generator=positions))              # position in F
    r = cfg.ratio
    depth = a * r                                                                             # ... in voxels
    x_low = F.avg_pool3d(x, r)                                                                # (B, 1, L, L, L)
    x_slab = x[:, :, depth:depth + cfg.slab * r]                                              # (B, 1, slab r, s, s)
    # 2. the generator's two views of one F
    for net in (G, D_L, D_H):
        net.train()
    z = torch.randn(x.shape[0], cfg.z_dim, device=device)                                     # (B, Z)
    f = G.features(z)                                                                         # (B, C_F, L, L, L)
    fake_low, fake_slab = G.low(f), G.slab(f, a)
    # 3. both critics, on detached fakes: Wasserstein losses + λ (both gradient penalties)
    high = lambda v: D_H(v, depth)                                                            # noqa: E731
    w_low = discriminator_loss(D_L(x_low), D_L(fake_low.detach()), "wgan-gp")
    w_high = discriminator_loss(high(x_slab), high(fake_slab.detach()), "wgan-gp")
    gp = gradient_penalty(D_L, x_low, fake_low) + gradient_penalty(high, x_slab, fake_slab)
    d_loss = w_low + w_high + gp_weight * gp
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # 4. the generator, against the updated critics
    g_loss = generator_loss(D_L(fake_low), "wgan-gp") + generator_loss(high(fake_slab), "wgan-gp")
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    # 5. the averaged generator follows
    if ema is not None:
        ema_update(ema, G, min(ema_decay, (i + 1) / (i + 1 + ema_warmup)))
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "w_low": -w_low.item(), "w_high": -w_high.item(),
            "gp": gp.item(), "start": float(a)}


def train_hagan(G: nn.Module, D_low: nn.Module, D_high: nn.Module, batches: Any, *, max_steps: int,
                budget_s: float | None = None, lr_g: float = 2e-4, lr_d: float = 2e-4,
                betas: tuple[float, float] = (0.5, 0.9), gp_weight: float = 10.0, ema_decay: float | None = 0.999,
                ema_warmup: float = 3.0, probe: Callable[[nn.Module], Mapping[str, float]] | None = None,
                probe_every: int = 50, keep_best: str | None = None, desc: str = "HA-GAN",
                seed: int = 0) -> tuple[nn.Module, History]:
    """Adam for the generator and one for both critics, an EMA copy of ``G``, and
    :func:`~gen3d_lessons.training.fit` over :func:`hagan_step`; the probe, ``keep_best`` and
    ``budget_s`` work as in :func:`~gen3d_lessons.training.gan.train_gan` (the defaults are its
    WGAN-GP settings). Slab positions come from a ``torch.Generator`` seeded with ``seed``; seed
    torch itself too (``torch.manual_seed``) for the codes and penalties to repeat. Returns the
    generator to sample from (the EMA copy, or ``G``) and the history.
    """
    if keep_best is not None and probe is None:
        raise ValueError("keep_best: needs a probe that measures what to select by")
    max_steps = step_cap(max_steps)                 # a dry run's cap, so that the last probe still runs
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(itertools.chain(D_low.parameters(), D_high.parameters()), lr=lr_d, betas=betas)
    ema = copy.deepcopy(G).requires_grad_(False) if ema_decay is not None else None
    step = partial(hagan_step, generator=G, critic_low=D_low, critic_high=D_high, opt_g=opt_g, opt_d=opt_d,
                   positions=torch.Generator().manual_seed(seed), gp_weight=gp_weight, ema=ema,
                   ema_decay=ema_decay or 0.0, ema_warmup=ema_warmup)
    return _probed_fit(step, batches, ema if ema is not None else G, probe=probe, probe_every=probe_every,
                       keep_best=keep_best, max_steps=max_steps, budget_s=budget_s, desc=desc)


# 2. What a step costs: HA-GAN beside a full-resolution GAN ---------------------------------------

def step_cost(sizes: Sequence[int] = (32, 64, 128), *, width: int = 32, batch: int = 2, steps: int = 2,
              timed_up_to: int = 64, seed: int = 0):
    """Memory and time of one WGAN-GP training step, HA-GAN beside a full-resolution GAN, per size.

    At each edge ``s`` both generators get the same widths — ``width`` at 4³, halved at each
    doubling down to 4 (``(32, 16, 8)`` at 32³) — and the critics the same widths in reverse.
    The full-resolution GAN is :class:`~gen3d_lessons.models.gan.Generator3D` +
    :class:`~gen3d_lessons.models.gan.Discriminator3D`; HA-GAN has ``F`` at ``s/4`` and slabs of
    2 positions of ``F`` (8 slices), with :func:`~gen3d_lessons.models.hagan.hagan_critics`.

    Columns: ``activations (MB)``, the bytes of every layer output of one training forward pass
    (the generator, and each critic on a real and a fake batch; roughly what backpropagation
    keeps; the gradient penalty's extra pass is not counted), the parameters of generator and
    critics (M), and ``seconds per step``: the median of ``steps`` Adam steps after a warm-up,
    for sizes up to ``timed_up_to`` (NaN above: only the memory is counted there, which takes
    one forward pass without gradients). Returns a pandas DataFrame, one row per (model, size).
    """
    import pandas as pd

    rows = []
    for s in sizes:
        if not isinstance(s, int) or s < 16 or s & (s - 1):
            raise ValueError(f"sizes: expected powers of two of at least 16, got {s!r}")
        n = s.bit_length() - 3                                          # generator levels: 4³ .. (s/2)³
        g_widths = tuple(max(width >> k, 4) for k in range(n))
        d_widths = g_widths[::-1]
        torch.manual_seed(seed)
        G = Generator3D(GeneratorConfig(size=s, channels=g_widths))
        D = Discriminator3D(DiscriminatorConfig(size=s, channels=d_widths))
        x = torch.rand(batch, 1, s, s, s, generator=torch.Generator().manual_seed(seed))   # (B, 1, s, s, s)
        z = torch.randn(batch, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed))  # (B, Z)
        # the full-resolution GAN: G(z), D(x), D(G(z))
        full_bytes = layer_output_bytes([G, D], lambda: (D(x), D(G(z))))
        # HA-GAN: F, G_L(F), one slab G_H(F_slab); D_L on both low volumes, D_H on both slabs
        H = HAGANGenerator3D(HAGANConfig(size=s, channels=g_widths, low=s // 4, slab=2))
        D_L, D_H = hagan_critics(H.cfg, d_widths)
        r, t = H.cfg.ratio, H.cfg.slab * H.cfg.ratio
        a = (H.cfg.low - H.cfg.slab) // 2                               # a slab in the middle: a full halo

        def hagan_forward():
            f = H.features(z)
            D_L(F.avg_pool3d(x, r)), D_L(H.low(f))
            D_H(x[:, :, a * r:a * r + t], a * r), D_H(H.slab(f, a), a * r)

        ha_bytes = layer_output_bytes([H, D_L, D_H], hagan_forward)
        # seconds per step, where asked
        full_s = ha_s = math.nan
        if s <= timed_up_to:
            adam = lambda net: torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.9))   # noqa: E731
            full_step = partial(gan_step, {"image": x}, generator=G, discriminator=D, opt_g=adam(G), opt_d=adam(D),
                                loss="wgan-gp")
            full_s = median_step_seconds(full_step, steps)
            opt_d = torch.optim.Adam(itertools.chain(D_L.parameters(), D_H.parameters()), lr=2e-4, betas=(0.5, 0.9))
            ha_s = median_step_seconds(partial(hagan_step, {"image": x}, generator=H, critic_low=D_L, critic_high=D_H,
                                               opt_g=adam(H), opt_d=opt_d, positions=torch.Generator().manual_seed(seed)),
                                       steps)
        for model, g, critics, nbytes, sec in (("full-resolution GAN", G, [D], full_bytes, full_s),
                                               ("HA-GAN", H, [D_L, D_H], ha_bytes, ha_s)):
            rows.append({"model": model, "size": s, "activations (MB)": nbytes / 2 ** 20,
                         "generator parameters (M)": sum(p.numel() for p in g.parameters()) / 1e6,
                         "critic parameters (M)": sum(p.numel() for c in critics for p in c.parameters()) / 1e6,
                         "seconds per step": sec})
    return pd.DataFrame(rows)
