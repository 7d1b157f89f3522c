"""Step functions of the GAN family (chapter 3 and the chapters that reuse its pieces).

The adversarial losses (in :mod:`gen3d_lessons.losses`) are pure functions of the discriminator's
scores, each to be *minimised*:

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

:func:`gan_step` trains Eq. 1, 2 and 5; :func:`pix2pix_step` Eq. 3 (and Ea-GAN's edge terms);
:func:`l1_step` pix2pix's generator with its L1 term alone; :func:`cyclegan_step` Eq. 4;
:func:`alpha_gan_step` the 3D-α-WGAN-GP of chapter 7 (an autoencoder, a GAN and a code critic).
Each owns its two optimizers and returns what it measured; bind the networks and optimizers with
:func:`functools.partial` and hand it to :func:`~gen3d_lessons.training.fit`::

    step = partial(gan_step, generator=G, discriminator=D, opt_g=opt_g, opt_d=opt_d, loss="wgan-gp")
    history = fit(step, batches, max_steps=...)

:func:`train_gan` does that for chapter 3's recipe (Adam with the settings of :data:`ADAM`, an EMA
generator, a probe) on the batches of :func:`gan_batches`; :func:`probe_summary` reads its probe
back. :func:`train_pix2pix`, :func:`train_l1` and :func:`train_cyclegan` are the same for Eq. 3, its L1
term alone, and Eq. 4.

A batch is a dict with ``"image"`` (B, C, D, H, W) and, for a conditional GAN, ``"condition"``
(B, K); pix2pix and CycleGAN batches hold ``"x"`` and ``"y"``.
"""

from __future__ import annotations

import copy
import itertools
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..data.batches import Batches
from ..losses import (cycle_consistency_loss, discriminator_loss, edge_loss, generator_loss, gradient_penalty, l1_loss,
                      sobel_magnitude)
from ..profiles import step_cap
from .batch import batch_tensor
from .ema import ema_update
from .fit import History, fit
from .segmentation import one_cycle

__all__ = ["LOSSES", "ADAM", "gan_step", "alpha_gan_step", "pix2pix_step", "cyclegan_step", "gan_batches", "train_gan",
           "train_alpha_gan", "probe_summary", "train_pix2pix", "train_cyclegan", "l1_step", "train_l1"]

LOSSES = ("ns", "wgan-gp")          # the losses gan_step trains (see gen3d_lessons.losses)

# Chapter 3's Adam settings per loss, for train_gan(..., **ADAM[loss]). The vanilla discriminator
# learns four times more slowly than its generator (two time scales, Heusel et al. 2017): one as
# fast wins the game outright early on and leaves the generator nothing to learn from. The WGAN-GP's
# critic and generator learn at one rate, with the β₂ = 0.9 of Gulrajani et al. (2017).
ADAM = {"ns": dict(lr_g=2e-4, lr_d=5e-5, betas=(0.5, 0.999)),
        "wgan-gp": dict(lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.9))}


# 1. The step functions -------------------------------------------------------------------------

def gan_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, discriminator: nn.Module,
             opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss: str = "ns", gp_weight: float = 10.0,
             n_critic: int = 1, ema: nn.Module | None = None, ema_decay: float = 0.999,
             ema_warmup: float = 3.0) -> dict[str, float]:
    """One discriminator update and, every ``n_critic`` steps, one generator update.

    ``loss="ns"``: Eq. 1 (Eq. 2 with ``batch["condition"]``); ``loss="wgan-gp"``: Eq. 5 with the
    gradient penalty weighted by ``gp_weight`` (λ). ``ema``, if given, is a copy of the generator
    that tracks its exponential moving average with decay ``min(ema_decay, (i + 1) / (i + 1 + ema_warmup))``:
    early on it averages over roughly the last ``1 / ema_warmup`` of the steps taken, so that
    the random initial weights are soon forgotten.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    G, D = generator, discriminator
    device = next(G.parameters()).device
    # 1. data: real volumes x (B, C, D, H, W), and the condition c (B, K) of a cGAN
    x = batch_tensor(batch, "image", device)
    c = batch_tensor(batch, "condition", device) if "condition" in batch else None
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


def alpha_gan_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, encoder: nn.Module,
                   critic: nn.Module, code_critic: nn.Module, opt_g: torch.optim.Optimizer, opt_e: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer, opt_c: torch.optim.Optimizer, gp_weight: float = 10.0,
                   rec_weight: float = 10.0, ema: nn.Module | None = None, ema_decay: float = 0.999,
                   ema_warmup: float = 3.0) -> dict[str, float]:
    """One step of 3D-α-WGAN-GP (Kwon et al. 2019; :mod:`gen3d_lessons.models.alphagan`).

    With ``x`` the real volumes, ``z ~ N(0, I)``, ``z_e = E(x)``, ``x_rec = G(z_e)`` and ``x_rand = G(z)``:

    1. the critic ``D`` minimises ``E[D(x_rec)] + E[D(x_rand)] − 2 E[D(x)]`` plus λ times the gradient
       penalty between ``x`` and each kind of fake, and the code critic ``C`` minimises
       ``E[C(z_e)] − E[C(z)]`` plus λ times its penalty between ``z`` and ``z_e`` (WGAN-GP, both);
    2. the generator and the encoder together minimise
       ``−E[D(x_rec)] − E[D(x_rand)] − E[C(z_e)] + rec_weight · |x − x_rec|₁``.

    ``ema``, if given, follows the generator as in :func:`gan_step`.
    """
    G, E, D, C = generator, encoder, critic, code_critic
    device = next(G.parameters()).device
    # 1. data, codes and both kinds of fake
    x = batch_tensor(batch, "image", device)                                                 # (B, C, D, H, W)
    z = torch.randn(x.shape[0], G.cfg.z_dim, device=device)                                  # (B, Z)
    for net in (G, E, D, C):
        net.train()
    z_e = E(x)                                                                               # (B, Z)
    x_rec, x_rand = G(z_e), G(z)
    # 2. the two critics, on detached fakes
    d_loss = (D(x_rec.detach()).mean() + D(x_rand.detach()).mean() - 2 * D(x).mean()
              + gp_weight * (gradient_penalty(D, x, x_rec) + gradient_penalty(D, x, x_rand)))
    c_loss = C(z_e.detach()).mean() - C(z).mean() + gp_weight * gradient_penalty(C, z, z_e)
    opt_d.zero_grad(set_to_none=True), opt_c.zero_grad(set_to_none=True)
    (d_loss + c_loss).backward()
    opt_d.step(), opt_c.step()
    # 3. generator and encoder, against the updated critics
    rec = l1_loss(x, x_rec)
    g_adv = -D(x_rec).mean() - D(x_rand).mean()
    e_adv = -C(z_e).mean()
    opt_g.zero_grad(set_to_none=True), opt_e.zero_grad(set_to_none=True)
    (g_adv + e_adv + rec_weight * rec).backward()
    opt_g.step(), opt_e.step()
    if ema is not None:
        ema_update(ema, G, min(ema_decay, (i + 1) / (i + 1 + ema_warmup)))
    return {"d_loss": d_loss.item(), "c_loss": c_loss.item(), "rec": rec.item(), "g_adv": g_adv.item(),
            "e_adv": e_adv.item()}


def pix2pix_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, discriminator: nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, l1_weight: float = 100.0,
                 edge_weight: float = 0.0, critic_edges: bool = False, critic_warmup: int = 0) -> dict[str, float]:
    """One step of pix2pix (survey Eq. 3): ``D(x, y)`` judges pairs; ``G(x)`` must fool it and stay
    within L1 of the paired target ``y`` (weight λ = ``l1_weight``). The randomness ``z`` of
    Eq. 3 is, as in the paper, left to the generator's dropout (none here: G is deterministic).

    Ea-GAN (Yu et al. 2019) adds edges: ``edge_weight`` > 0 adds ``edge_weight · E |S(y) − S(G(x))|``
    to the generator's loss, with ``S`` the Sobel gradient magnitude (gEa-GAN), and
    ``critic_edges=True`` also hands ``S`` of the judged volume to the critic, ``D(x, y, S(y))``
    (dEa-GAN), so that it can judge edges directly.

    During the first ``critic_warmup`` steps only the critic learns: a generator that starts from
    L1-trained weights would otherwise follow the gradients of a critic that knows nothing yet."""
    G, D = generator, discriminator
    device = next(G.parameters()).device
    # 1. a paired batch: source x and target y, (B, C, D, H, W) each
    x, y = batch_tensor(batch, "x", device), batch_tensor(batch, "y", device)
    G.train(), D.train()
    judge = (lambda v: D(x, v, sobel_magnitude(v))) if critic_edges else (lambda v: D(x, v))
    # 2. discriminator on (x, y) real pairs and (x, G(x)) fake pairs (no graph of G while it waits)
    with torch.set_grad_enabled(i >= critic_warmup):
        y_fake = G(x)
    d_loss = discriminator_loss(judge(y), judge(y_fake.detach()), "ns")
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    if i < critic_warmup:
        return {"d_loss": d_loss.item()}
    # 3. generator: adversarial + λ ||y − G(x)||₁ (+ the edge term)
    adv = generator_loss(judge(y_fake), "ns")
    l1 = l1_loss(y, y_fake)
    g_loss = adv + l1_weight * l1
    out = {"d_loss": d_loss.item(), "g_adv": adv.item(), "l1": l1.item()}
    if edge_weight:
        edge = edge_loss(y, y_fake)
        g_loss = g_loss + edge_weight * edge
        out["edge"] = edge.item()
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return out


def l1_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any = None) -> dict[str, float]:
    """pix2pix's generator with its L1 term alone, ``E ||y − G(x)||₁``: the network that pix2pix
    is measured against (and starts from). ``scheduler``, if any, is stepped once per step."""
    device = next(model.parameters()).device
    x, y = batch_tensor(batch, "x", device), batch_tensor(batch, "y", device)
    model.train()
    l1 = l1_loss(y, model(x))
    optimizer.zero_grad(set_to_none=True)
    l1.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"l1": l1.item()}


def cyclegan_step(batch: Mapping[str, Any], i: int, *, generator_xy: nn.Module, generator_yx: nn.Module,
                  discriminator_x: nn.Module, discriminator_y: nn.Module, opt_g: torch.optim.Optimizer,
                  opt_d: torch.optim.Optimizer, cycle_weight: float = 10.0, identity_weight: float = 0.0
                  ) -> dict[str, float]:
    """One step of CycleGAN (survey Eq. 4) on *unpaired* volumes x (domain X) and y (domain Y).

    ``G = generator_xy: X → Y`` and ``F_ = generator_yx: Y → X`` (``F_`` because ``F`` is
    torch.nn.functional here); ``D_y = discriminator_y`` judges volumes of Y, ``D_x`` of X.
    ``opt_g`` holds both generators' parameters and ``opt_d`` both discriminators'. Loss of the
    generators: ``L_GAN(G, D_y) + L_GAN(F_, D_x) + λ (||F_(G(x)) − x||₁ + ||G(F_(y)) − y||₁)``,
    plus, with ``identity_weight`` μ > 0, the identity loss of Zhu et al. (2017),
    ``μ (||G(y) − y||₁ + ||F_(x) − x||₁)``: a volume already in a generator's target domain should
    pass through it unchanged, which discourages changes that the cycle alone would allow.
    """
    G, F_, D_x, D_y = generator_xy, generator_yx, discriminator_x, discriminator_y      # the paper's names
    device = next(G.parameters()).device
    # 1. an unpaired batch
    x, y = batch_tensor(batch, "x", device), batch_tensor(batch, "y", device)
    for m in (G, F_, D_x, D_y):
        m.train()
    # 2. generators: translate both ways, fool both discriminators, and come back where they started
    y_fake, x_fake = G(x), F_(y)                                                        # X -> Y, Y -> X
    adv = generator_loss(D_y(y_fake), "ns") + generator_loss(D_x(x_fake), "ns")
    cyc = cycle_consistency_loss(x, F_(y_fake)) + cycle_consistency_loss(y, G(x_fake))
    g_loss = adv + cycle_weight * cyc
    out = {}
    if identity_weight:
        idt = l1_loss(y, G(y)) + l1_loss(x, F_(x))
        g_loss = g_loss + identity_weight * idt
        out["identity"] = idt.item()
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    # 3. discriminators, on the translations just made (detached)
    d_loss = (discriminator_loss(D_y(y), D_y(y_fake.detach()), "ns")
              + discriminator_loss(D_x(x), D_x(x_fake.detach()), "ns"))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {"d_loss": d_loss.item(), "g_adv": adv.item(), "cycle": cyc.item(), **out}


# 2. One adversarial run, end to end -------------------------------------------------------------

def gan_batches(images: torch.Tensor, batch_size: int, *, seed: int, condition: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> Batches:
    """Chapter 3's training batches: ``{"image": (B, C, D, H, W)}`` (+ ``"condition": (B, K)``).

    A seeded random order, and each image mirrored left-right with probability 1/2 (the
    default augmentation of :class:`~gen3d_lessons.data.batches.Batches`): with a few dozen
    training brains, mirror images are free data. ``device``: where the batches live (None:
    where ``images`` are); the whole cohort is moved there once.
    """
    if condition is not None and len(condition) != len(images):
        raise ValueError(f"condition: expected one row per image ({len(images)}), got {len(condition)}")
    data = {"image": images.to(device) if device is not None else images}                 # (N, C, D, H, W)
    if condition is not None:
        data["condition"] = condition.to(device) if device is not None else condition    # (N, K)
    return Batches(data, batch_size, seed=seed, augment=("image",))


def train_gan(G: nn.Module, D: nn.Module, batches: Any, *, loss: str, max_steps: int, budget_s: float | None = None,
              lr_g: float = 2e-4, lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
              gp_weight: float = 10.0, n_critic: int = 1, ema_decay: float | None = 0.999, ema_warmup: float = 3.0,
              probe: Callable[[nn.Module], Mapping[str, float]] | None = None, probe_every: int = 50,
              keep_best: str | None = None, desc: str = "gan") -> tuple[nn.Module, History]:
    """Adam for both networks, an EMA copy of ``G``, and :func:`fit` over :func:`gan_step` (bound with
    :func:`functools.partial`, as every chapter calls a step function).

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
    gan = partial(gan_step, generator=G, discriminator=D, opt_g=opt_g, opt_d=opt_d, loss=loss, gp_weight=gp_weight,
                  n_critic=n_critic, ema=ema, ema_decay=ema_decay or 0.0, ema_warmup=ema_warmup)
    return _probed_fit(gan, batches, ema if ema is not None else G, probe=probe, probe_every=probe_every,
                       keep_best=keep_best, max_steps=max_steps, budget_s=budget_s, desc=desc)


def _probed_fit(train_step: Callable[[Mapping[str, Any], int], dict[str, float]], batches: Any, final: nn.Module, *,
                probe: Callable[[nn.Module], Mapping[str, float]] | None, probe_every: int, keep_best: str | None,
                max_steps: int, budget_s: float | None, desc: str) -> tuple[nn.Module, History]:
    """:func:`fit` over ``train_step``, probing the generator ``final`` every ``probe_every`` steps
    (and at the last one) and, with ``keep_best``, returning it as it was at its best probe."""
    best: dict[str, Any] = {"value": float("inf"), "state": None, "step": None}

    def measure(i: int) -> dict[str, float]:
        out = dict(probe(final))
        if keep_best is not None and out[keep_best] < best["value"]:
            best.update(value=out[keep_best], state=copy.deepcopy(final.state_dict()), step=i + 1)
        return out

    def step(batch: Mapping[str, Any], i: int) -> dict[str, float]:
        out = train_step(batch, i)
        if probe is not None and ((i + 1) % probe_every == 0 or i + 1 == max_steps):
            out.update(measure(i))           # the probe joins this step's record
        return out

    history = fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
    if best["state"] is not None:
        final.load_state_dict(best["state"])
        print(f"{desc}: kept the generator of step {best['step']} ({keep_best} {best['value']:.3g})")
    return final.eval(), history


def probe_summary(history: History, key: str = "fd") -> dict[str, float]:
    """The probe's first, lowest and last value in a :func:`train_gan` history, with their steps.

    ``history.values[key]`` holds the probe at the steps it ran and NaN elsewhere; steps count
    from 1. Returns ``first``, ``first_step``, ``best``, ``best_step``, ``last``, ``last_step``:
    whether a run was still improving when it stopped is ``best_step == last_step``.
    """
    if key not in history.values:
        raise ValueError(f"key: {key!r} was never recorded; recorded: {', '.join(sorted(history.values)) or '(none)'}")
    values = np.asarray(history.values[key])
    at = np.flatnonzero(np.isfinite(values))                      # indices of the steps the probe ran at
    if not at.size:
        raise ValueError(f"history: the probe {key!r} never ran")
    b = at[np.argmin(values[at])]
    return dict(first=values[at[0]], first_step=int(at[0]) + 1, best=values[b], best_step=int(b) + 1,
                last=values[at[-1]], last_step=int(at[-1]) + 1)


# 3. pix2pix and CycleGAN runs ------------------------------------------------------------------

def train_alpha_gan(G: nn.Module, E: nn.Module, D: nn.Module, C: nn.Module, batches: Any, *, max_steps: int,
                    budget_s: float | None = None, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.9),
                    gp_weight: float = 10.0, rec_weight: float = 10.0, ema_decay: float | None = 0.999,
                    probe: Callable[[nn.Module], Mapping[str, float]] | None = None, probe_every: int = 50,
                    keep_best: str | None = None, desc: str = "alpha-WGAN-GP") -> tuple[nn.Module, History]:
    """Adam for each of the four networks, an EMA copy of ``G``, and :func:`fit` over
    :func:`alpha_gan_step`; the probe and ``keep_best`` work as in :func:`train_gan`. Returns the
    generator to sample from and the history."""
    max_steps = step_cap(max_steps)
    if keep_best is not None and probe is None:
        raise ValueError("keep_best: needs a probe that measures what to select by")
    opts = {k: torch.optim.Adam(net.parameters(), lr=lr, betas=betas) for k, net in
            (("opt_g", G), ("opt_e", E), ("opt_d", D), ("opt_c", C))}
    ema = copy.deepcopy(G).requires_grad_(False) if ema_decay is not None else None
    step = partial(alpha_gan_step, generator=G, encoder=E, critic=D, code_critic=C, gp_weight=gp_weight,
                   rec_weight=rec_weight, ema=ema, ema_decay=ema_decay or 0.0, **opts)
    return _probed_fit(step, batches, ema if ema is not None else G, probe=probe, probe_every=probe_every,
                       keep_best=keep_best, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_pix2pix(G: nn.Module, D: nn.Module, batches: Any, *, max_steps: int, lr: float = 2e-3,
                  betas: tuple[float, float] = (0.5, 0.999), l1_weight: float = 100.0, edge_weight: float = 0.0,
                  critic_edges: bool = False, critic_warmup: int = 0, lr_d: float | None = None,
                  budget_s: float | None = None, desc: str = "pix2pix") -> History:
    """Adam for ``G`` and ``D`` (``lr``, and ``lr_d`` for ``D`` if given; ``betas`` each) and
    :func:`fit` over :func:`pix2pix_step` on batches ``{"x": source, "y": target}``; with
    ``edge_weight`` and ``critic_edges``, Ea-GAN; the critic learns alone for ``critic_warmup``
    of the ``max_steps``. Returns the history (``d_loss`` per step, ``l1``, ``g_adv`` and ``edge``
    at the generator's steps); ``G`` and ``D`` are trained in place."""
    opt_g = torch.optim.Adam(G.parameters(), lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr if lr_d is None else lr_d, betas=betas)
    critic_warmup = max(min(critic_warmup, step_cap(max_steps) - 1), 0)   # a dry run's cap still leaves G a step
    step = partial(pix2pix_step, generator=G, discriminator=D, opt_g=opt_g, opt_d=opt_d, l1_weight=l1_weight,
                   edge_weight=edge_weight, critic_edges=critic_edges, critic_warmup=critic_warmup)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_l1(G: nn.Module, batches: Any, *, max_steps: int, lr: float, budget_s: float | None = None,
             desc: str = "L1") -> History:
    """Adam with a one-cycle learning rate that peaks at ``lr``, and :func:`fit` over
    :func:`l1_step` on batches ``{"x", "y"}``. Returns the history (``l1`` per step)."""
    optimizer = torch.optim.Adam(G.parameters(), lr)
    step = partial(l1_step, model=G, optimizer=optimizer, scheduler=one_cycle(optimizer, max_steps))
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_cyclegan(G_xy: nn.Module, G_yx: nn.Module, D_x: nn.Module, D_y: nn.Module, batches: Any, *,
                   max_steps: int, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                   cycle_weight: float = 10.0, identity_weight: float = 0.0, budget_s: float | None = None,
                   desc: str = "CycleGAN") -> History:
    """One Adam for both generators ``G_xy: X → Y``, ``G_yx: Y → X`` and one for both
    discriminators, and :func:`fit` over :func:`cyclegan_step` on unpaired batches ``{"x", "y"}``.
    Returns the history (``cycle``, ``g_adv``, ``d_loss``, and ``identity`` if weighted, per step);
    the networks train in place."""
    opt_g = torch.optim.Adam(itertools.chain(G_xy.parameters(), G_yx.parameters()), lr, betas=betas)
    opt_d = torch.optim.Adam(itertools.chain(D_x.parameters(), D_y.parameters()), lr, betas=betas)
    step = partial(cyclegan_step, generator_xy=G_xy, generator_yx=G_yx, discriminator_x=D_x, discriminator_y=D_y,
                   opt_g=opt_g, opt_d=opt_d, cycle_weight=cycle_weight, identity_weight=identity_weight)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
