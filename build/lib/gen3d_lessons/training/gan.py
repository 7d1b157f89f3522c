"""Step functions of the GAN family (chapter 3 and the chapters that reuse its pieces).

The adversarial losses are written as pure functions of the discriminator's scores, each to be
*minimised*:

- ``"ns"``, the **non-saturating** GAN (survey Eq. 1, Goodfellow et al. 2014). With
  ``σ`` the logistic function, the discriminator minimises ``−log σ(D(x)) − log(1 − σ(D(G(z))))``,
  i.e. it maximises Eq. 1. The generator should minimise ``log(1 − σ(D(G(z))))``, but that is flat
  exactly when ``D`` confidently rejects its samples, at the start of training; it minimises
  ``−log σ(D(G(z)))`` instead, which has the same fixed point and strong gradients there.
  ``softplus(−s) = −log σ(s)`` is the numerically stable form.
- ``"wgan"``, the **Wasserstein** critic (survey Eq. 5, Gulrajani et al. 2017): the critic
  minimises ``E[D(G(z))] − E[D(x)]`` (+ λ times :func:`gen3d_lessons.losses.gradient_penalty`),
  the generator minimises ``−E[D(G(z))]``. ``E[D(x)] − E[D(G(z))]`` estimates the Wasserstein-1
  distance while the critic is (about) 1-Lipschitz, which the penalty encourages.

A condition ``c`` (survey Eq. 2) goes to both networks: ``D(x, c)``, ``G(z, c)``.

:func:`gan_step` trains Eq. 1, 2 and 5; :func:`pix2pix_step` Eq. 3; :func:`cyclegan_step` Eq. 4.
Each owns its two optimizers and returns what it measured; :func:`~gen3d_lessons.training.fit`
calls it::

    fit(lambda batch, i: gan_step(G, D, opt_g, opt_d, batch, i, loss="wgan-gp"), batches, max_steps=...)

A batch is a dict with ``"image"`` (B, C, D, H, W) and, for a conditional GAN, ``"condition"``
(B, K); pix2pix and CycleGAN batches hold ``"x"`` and ``"y"``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..profiles import step_cap
from ..losses import gradient_penalty
from .fit import History, fit

__all__ = ["LOSSES", "discriminator_loss", "generator_loss", "cycle_consistency_loss", "gan_step", "pix2pix_step",
           "cyclegan_step", "ema_update", "VolumeBatches", "train_gan"]

LOSSES = ("ns", "wgan-gp")


# 1. The adversarial losses ---------------------------------------------------------------------

def discriminator_loss(real_score: torch.Tensor, fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """What D minimises, from its scores on real and generated volumes (any shape, averaged)."""
    if kind == "ns":      # −log σ(D(x)) − log(1 − σ(D(G(z)))): Eq. 1, maximised by D, with its sign flipped
        return F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
    if kind in ("wgan", "wgan-gp"):      # E[D(G(z))] − E[D(x)]: Eq. 5 without its penalty
        return fake_score.mean() - real_score.mean()
    raise ValueError(f"kind: expected 'ns' or 'wgan-gp', got {kind!r}")


def generator_loss(fake_score: torch.Tensor, kind: str) -> torch.Tensor:
    """What G minimises, from D's scores on its volumes: ``−log σ(D(G(z)))`` or ``−E[D(G(z))]``."""
    if kind == "ns":
        return F.softplus(-fake_score).mean()
    if kind in ("wgan", "wgan-gp"):
        return -fake_score.mean()
    raise ValueError(f"kind: expected 'ns' or 'wgan-gp', got {kind!r}")


def cycle_consistency_loss(x: torch.Tensor, x_cycled: torch.Tensor) -> torch.Tensor:
    """CycleGAN's ``L_cyc`` for one direction: ``E ||F(G(x)) − x||₁`` (mean absolute difference)."""
    if x.shape != x_cycled.shape:
        raise ValueError(f"x_cycled: shape {tuple(x_cycled.shape)} does not match x {tuple(x.shape)}")
    return (x_cycled - x).abs().mean()


# 2. Helpers: batches, EMA ----------------------------------------------------------------------

def _batch_tensor(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, Mapping) or key not in batch:
        raise ValueError(f"batch: expected a dict with a {key!r} tensor, got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    x = batch[key]
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 2:
        raise ValueError(f"batch[{key!r}]: expected a float tensor (B, ...), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x.to(device)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``θ_ema ← decay · θ_ema + (1 − decay) · θ`` for every parameter; buffers (BatchNorm
    statistics) are copied. Samples from the averaged generator are usually smoother and more
    stable than from the last iterate (Yazıcı et al. 2019)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class VolumeBatches:
    """Shuffled batches of in-memory volumes (and conditions), a fresh seeded order every pass.

    Yields ``{"image": (B, C, D, H, W)[, "condition": (B, K)]}``. With ``flip`` each volume is
    mirrored along its first spatial axis (left-right in the phantoms) with probability 1/2.
    The last incomplete batch of a pass is dropped.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, condition: torch.Tensor | None = None,
                 seed: int = 0, flip: bool = True):
        if not isinstance(images, torch.Tensor) or images.ndim != 5 or not torch.is_floating_point(images):
            raise ValueError(f"images: expected a float tensor (N, C, D, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if not torch.isfinite(images).all():
            raise ValueError("images: contains NaN or infinite values")
        if condition is not None and (condition.ndim != 2 or len(condition) != len(images)):
            raise ValueError(f"condition: expected shape ({len(images)}, K), got {tuple(condition.shape)}")
        if not 1 <= batch_size <= len(images):
            raise ValueError(f"batch_size: expected 1..{len(images)} (the number of volumes), got {batch_size}")
        self.images, self.condition, self.batch_size, self.flip = images, condition, int(batch_size), flip
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.g)
        for s in range(0, n - self.batch_size + 1, self.batch_size):
            idx = order[s:s + self.batch_size]
            x = self.images[idx]                                                        # (B, C, D, H, W)
            if self.flip:
                mirror = torch.rand(len(idx), generator=self.g) < 0.5                   # (B,)
                x = torch.where(mirror[:, None, None, None, None], x.flip(2), x)
            batch = {"image": x}
            if self.condition is not None:
                batch["condition"] = self.condition[idx]                                # (B, K)
            yield batch


# 3. The step functions -------------------------------------------------------------------------

def gan_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
             batch: Mapping[str, Any], i: int, *, loss: str = "ns", gp_weight: float = 10.0, n_critic: int = 1,
             ema: nn.Module | None = None, ema_decay: float = 0.999, ema_warmup: float = 3.0) -> dict[str, float]:
    """One discriminator update and, every ``n_critic`` steps, one generator update.

    ``loss="ns"``: Eq. 1 (Eq. 2 with ``batch["condition"]``); ``loss="wgan-gp"``: Eq. 5 with the
    gradient penalty weighted by ``gp_weight`` (λ). ``ema``, if given, is a copy of ``G`` that
    tracks its exponential moving average with decay ``min(ema_decay, (i + 1) / (i + 1 + ema_warmup))``:
    early on it averages over roughly the last ``1 / ema_warmup`` of the steps taken, so that
    the random initial weights are soon forgotten.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    device = next(G.parameters()).device
    # 1. data: real volumes x (B, C, D, H, W), and the condition c (B, K) of a cGAN
    x = _batch_tensor(batch, "image", device)
    c = _batch_tensor(batch, "condition", device) if "condition" in batch else None
    z = torch.randn(x.shape[0], G.cfg.z_dim, device=device)                              # (B, Z)
    g_turn = (i + 1) % n_critic == 0                     # does the generator learn at this step?
    G.train(), D.train()
    # 2. discriminator / critic: real up, fake down (+ the gradient penalty of Eq. 5)
    with torch.set_grad_enabled(g_turn):
        fake = G(z, c)                                                                   # (B, C, D, H, W)
    real_score, fake_score = D(x, c), D(fake.detach(), c)
    d_loss = discriminator_loss(real_score, fake_score, loss)
    out = {"d_loss": d_loss.item(), "d_real": real_score.mean().item(), "d_fake": fake_score.mean().item()}
    if loss == "wgan-gp":
        gp = gradient_penalty(lambda v: D(v, c), x, fake)
        d_loss = d_loss + gp_weight * gp
        out["gp"] = gp.item()
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # 3. generator, every n_critic steps: the same fakes must now fool the updated discriminator
    if g_turn:
        g_loss = generator_loss(D(fake, c), loss)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        out["g_loss"] = g_loss.item()
        # 4. the averaged generator follows
        if ema is not None:
            ema_update(ema, G, min(ema_decay, (i + 1) / (i + 1 + ema_warmup)))
    return out


def pix2pix_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 batch: Mapping[str, Any], l1_weight: float = 100.0) -> dict[str, float]:
    """One step of pix2pix (survey Eq. 3): ``D(x, y)`` judges pairs; ``G(x)`` must fool it and stay
    within L1 of the paired target ``y`` (weight λ = ``l1_weight``). The randomness ``z`` of
    Eq. 3 is, as in the paper, left to the generator's dropout (none here: G is deterministic)."""
    device = next(G.parameters()).device
    # 1. a paired batch: source x and target y, (B, C, D, H, W) each
    x, y = _batch_tensor(batch, "x", device), _batch_tensor(batch, "y", device)
    G.train(), D.train()
    # 2. discriminator on (x, y) real pairs and (x, G(x)) fake pairs
    y_fake = G(x)
    d_loss = discriminator_loss(D(x, y), D(x, y_fake.detach()), "ns")
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # 3. generator: adversarial + λ ||y − G(x)||₁
    adv = generator_loss(D(x, y_fake), "ns")
    l1 = (y_fake - y).abs().mean()
    g_loss = adv + l1_weight * l1
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"d_loss": d_loss.item(), "g_adv": adv.item(), "l1": l1.item()}


def cyclegan_step(G: nn.Module, F_: nn.Module, D_x: nn.Module, D_y: nn.Module, opt_g: torch.optim.Optimizer,
                  opt_d: torch.optim.Optimizer, batch: Mapping[str, Any], cycle_weight: float = 10.0) -> dict[str, float]:
    """One step of CycleGAN (survey Eq. 4) on *unpaired* volumes x (domain X) and y (domain Y).

    ``G: X → Y`` and ``F_: Y → X`` (``F_`` because ``F`` is torch.nn.functional here); ``D_y``
    judges volumes of Y, ``D_x`` of X. ``opt_g`` holds both generators' parameters and ``opt_d``
    both discriminators'. Loss of the generators:
    ``L_GAN(G, D_y) + L_GAN(F_, D_x) + λ (||F_(G(x)) − x||₁ + ||G(F_(y)) − y||₁)``.
    """
    device = next(G.parameters()).device
    # 1. an unpaired batch
    x, y = _batch_tensor(batch, "x", device), _batch_tensor(batch, "y", device)
    for m in (G, F_, D_x, D_y):
        m.train()
    # 2. generators: translate both ways, fool both discriminators, and come back where they started
    y_fake, x_fake = G(x), F_(y)                                                        # X -> Y, Y -> X
    adv = generator_loss(D_y(y_fake), "ns") + generator_loss(D_x(x_fake), "ns")
    cyc = cycle_consistency_loss(x, F_(y_fake)) + cycle_consistency_loss(y, G(x_fake))
    g_loss = adv + cycle_weight * cyc
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    # 3. discriminators, on the translations just made (detached)
    d_loss = (discriminator_loss(D_y(y), D_y(y_fake.detach()), "ns")
              + discriminator_loss(D_x(x), D_x(x_fake.detach()), "ns"))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {"d_loss": d_loss.item(), "g_adv": adv.item(), "cycle": cyc.item()}


# 4. One adversarial run, end to end -------------------------------------------------------------

def train_gan(G: nn.Module, D: nn.Module, batches: Any, *, loss: str, max_steps: int, budget_s: float | None = None,
              lr_g: float = 2e-4, lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
              gp_weight: float = 10.0, n_critic: int = 1, ema_decay: float | None = 0.999, ema_warmup: float = 3.0,
              probe: Callable[[nn.Module], Mapping[str, float]] | None = None, probe_every: int = 50,
              keep_best: str | None = None, desc: str = "gan") -> tuple[nn.Module, History]:
    """Adam for both networks, an EMA copy of ``G``, and :func:`fit` over :func:`gan_step`.

    Every ``probe_every`` steps (and at the last one) ``probe(generator)`` — e.g. the FD of its
    samples in the yardstick encoder — is added to that step's record; it sees the EMA generator
    when there is one. With ``keep_best="fd"`` the generator returned is the one of the probe
    with the lowest ``fd`` (a model selection: probe a validation split, never the data the
    chapter reports on), else the last one. ``budget_s`` is :func:`fit`'s fuse.
    Returns the generator to sample from (the EMA copy, or ``G``) and the history.
    """
    max_steps = step_cap(max_steps)                 # a dry run's cap, so that the last probe still runs
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
    if keep_best is not None and probe is None:
        raise ValueError("keep_best: needs a probe that measures what to select by")
    ema = copy.deepcopy(G).requires_grad_(False) if ema_decay is not None else None
    final = ema if ema is not None else G
    best: dict[str, Any] = {"value": float("inf"), "state": None, "step": None}

    def measure(i: int) -> dict[str, float]:
        out = dict(probe(final))
        if keep_best is not None and out[keep_best] < best["value"]:
            best.update(value=out[keep_best], state=copy.deepcopy(final.state_dict()), step=i + 1)
        return out

    def step(batch: Mapping[str, Any], i: int) -> dict[str, float]:
        out = gan_step(G, D, opt_g, opt_d, batch, i, loss=loss, gp_weight=gp_weight, n_critic=n_critic,
                       ema=ema, ema_decay=ema_decay or 0.0, ema_warmup=ema_warmup)
        if probe is not None and ((i + 1) % probe_every == 0 or i + 1 == max_steps):
            out.update(measure(i))
        return out

    history = fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
    if best["state"] is not None:
        final.load_state_dict(best["state"])
        print(f"{desc}: kept the generator of step {best['step']} ({keep_best} {best['value']:.3g})")
    return final.eval(), history
