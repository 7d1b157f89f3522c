"""Step functions of counterfactual ageing (chapter 9): :class:`~gen3d_lessons.models.ageing.AgeingNet`
trained two ways.

- :func:`countersynth_step`, **cross-sectional**, as CounterSynth (Pombo et al. 2023) trains: there
  is no second scan of any subject, only brains of many ages. For each brain ``x`` of age ``a`` a
  target age ``a'`` is drawn, and the answer ``x' = G(x, a, a')`` must

  1. read as ``a' − a`` years older to a frozen age regressor ``R`` (``age_weight``): the loss is
     on the *shift*, ``(R(x') − R(x) − (a' − a))²`` in units of ``age_scale`` years, so that the
     regressor's error on this subject does not count;
  2. fool a critic that judges (volume, age) pairs, real ``(x, a)`` against ``(x', a')``
     (``adv_weight``, the non-saturating loss; :class:`~gen3d_lessons.models.gan.Discriminator3D`
     with a one-number condition, the standardised age);
  3. change as little as it can: the mean squared spatial gradient of the velocity
     (``smooth_weight``), its mean square (``magnitude_weight``) and the mean absolute intensity
     change (``intensity_weight``).

- :func:`longitudinal_step`, **longitudinal**: the same network trained on pairs of scans of one
  subject at two ages, ``(x at a, y at a')``, with the squared error of ``x'`` against ``y``. Real
  studies that follow subjects for years exist; in the phantom, the pairs are the subject
  generated again at the later age.

:func:`ageing_batches` builds the batches of both; :func:`train_countersynth` and
:func:`train_longitudinal` bind the optimizers and run :func:`~gen3d_lessons.training.fit`.
A batch is a dict with ``"x"`` (B, 1, D, H, W), ``"age"`` (B,), ``"mask"`` (B, 1, D, H, W) and,
for the longitudinal step, ``"y"`` (B, 1, D, H, W) and ``"target"`` (B,).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Batches
from ..losses import discriminator_loss, generator_loss
from .batch import batch_tensor
from .fit import History, fit

__all__ = ["ageing_batches", "countersynth_step", "longitudinal_step", "train_countersynth", "train_longitudinal"]


def ageing_batches(x: torch.Tensor, age: torch.Tensor, mask: torch.Tensor, batch_size: int, *, seed: int,
                   later: torch.Tensor | None = None, target: torch.Tensor | None = None) -> Batches:
    """Batches ``{"x", "age", "mask"}`` (+ ``"y"`` = ``later`` and ``"target"`` for longitudinal pairs), in a
    seeded order, each item mirrored left-right with probability 1/2 (image, mask and later scan alike)."""
    data = {"x": x, "age": age.float(), "mask": mask.float()}
    if (later is None) != (target is None):
        raise ValueError("later, target: give both (the later scans and their ages) or neither")
    if later is not None:
        if later.shape != x.shape or len(target) != len(x):
            raise ValueError(f"later: expected one later scan of shape {tuple(x.shape[1:])} and one age per volume, got "
                             f"{tuple(later.shape)} and {len(target)} ages")
        data |= {"y": later, "target": target.float()}
    return Batches(data, batch_size, seed=seed, augment=("x", "mask") + (("y",) if later is not None else ()))


def _ages(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """``batch[key]``: ages (B,) in years, as float32 on ``device``."""
    a = batch.get(key) if isinstance(batch, Mapping) else None
    if not isinstance(a, torch.Tensor) or a.ndim != 1:
        raise ValueError(f"batch[{key!r}]: expected ages, a tensor (B,), got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    return a.to(device, torch.float32)


def _smoothness(v: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient of a field (B, 3, D, H, W) (finite differences)."""
    return sum(d.pow(2).mean() for d in torch.gradient(v, dim=(2, 3, 4)))


def countersynth_step(batch: Mapping[str, Any], i: int, *, generator: nn.Module, critic: nn.Module,
                      age_reader: Callable[[torch.Tensor], torch.Tensor], opt_g: torch.optim.Optimizer,
                      opt_d: torch.optim.Optimizer, age_range: tuple[float, float], age_scale: float = 20.0,
                      age_weight: float = 1.0, adv_weight: float = 0.1, smooth_weight: float = 100.0,
                      magnitude_weight: float = 1.0, intensity_weight: float = 1.0) -> dict[str, float]:
    """One cross-sectional step (see the module): target ages drawn uniformly in ``age_range`` (from the
    global torch generator, which :func:`~gen3d_lessons.training.fit` saves and restores), the critic on
    real and answered (volume, standardised age) pairs, then the generator. ``age_reader`` maps volumes
    (B, 1, D, H, W) to ages (B,) in years and must be frozen (its gradients flow to the generator only)."""
    G, D = generator, critic
    device = next(G.parameters()).device
    x, mask, age = batch_tensor(batch, "x", device), batch_tensor(batch, "mask", device), _ages(batch, "age", device)
    lo, hi = age_range
    target = lo + (hi - lo) * torch.rand(len(x)).to(device)
    cond = lambda a: ((a - G.cfg.age_mean) / G.cfg.age_std)[:, None]     # noqa: E731  (B, 1)
    G.train(), D.train()
    out = G(x, age, target, mask)
    # 1. the critic: real (x, a) against (x', a')
    d_loss = discriminator_loss(D(x, cond(age)), D(out.image.detach(), cond(target)), "ns")
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # 2. the generator: the age shift, the critic, and the smallest change that does it
    with torch.no_grad():
        read_before = age_reader(x)
    shift = F.mse_loss((age_reader(out.image) - read_before) / age_scale, (target - age) / age_scale)
    adv = generator_loss(D(out.image, cond(target)), "ns")
    smooth, magnitude, intensity = _smoothness(out.velocity), out.velocity.pow(2).mean(), out.intensity.abs().mean()
    loss = (age_weight * shift + adv_weight * adv + smooth_weight * smooth + magnitude_weight * magnitude
            + intensity_weight * intensity)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"d_loss": d_loss.item(), "age_shift": shift.item(), "g_adv": adv.item(), "smooth": smooth.item(),
            "intensity": intensity.item()}


def longitudinal_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any = None) -> dict[str, float]:
    """One longitudinal step: ``E ||y − G(x, a, a')||²`` over pairs of scans of one subject."""
    device = next(model.parameters()).device
    x, mask, y = (batch_tensor(batch, k, device) for k in ("x", "mask", "y"))
    age, target = _ages(batch, "age", device), _ages(batch, "target", device)
    model.train()
    mse = F.mse_loss(model(x, age, target, mask).image, y)
    optimizer.zero_grad(set_to_none=True)
    mse.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"mse": mse.item()}


def train_countersynth(G: nn.Module, D: nn.Module, age_reader: Callable[[torch.Tensor], torch.Tensor], batches: Any, *,
                       max_steps: int, age_range: tuple[float, float], lr: float = 1e-3, lr_d: float = 2e-4,
                       betas: tuple[float, float] = (0.5, 0.999), budget_s: float | None = None,
                       desc: str = "CounterSynth", **weights: float) -> History:
    """Adam for ``G`` (``lr``) and ``D`` (``lr_d``) and :func:`fit` over :func:`countersynth_step`;
    ``weights``: its ``age_weight``, ``adv_weight``, ``smooth_weight``, ``magnitude_weight``,
    ``intensity_weight``. Returns the history; the networks train in place."""
    lo, hi = (float(a) for a in age_range)
    if not lo < hi:
        raise ValueError(f"age_range: expected (youngest, oldest) with youngest < oldest, got {age_range}")
    opt_g = torch.optim.Adam(G.parameters(), lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr_d, betas=betas)
    step = partial(countersynth_step, generator=G, critic=D, age_reader=age_reader, opt_g=opt_g, opt_d=opt_d,
                   age_range=(lo, hi), **weights)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)


def train_longitudinal(G: nn.Module, batches: Any, *, max_steps: int, lr: float = 1e-3, budget_s: float | None = None,
                       desc: str = "longitudinal") -> History:
    """Adam (``lr``) and :func:`fit` over :func:`longitudinal_step`. Returns the history (``mse`` per step)."""
    optimizer = torch.optim.Adam(G.parameters(), lr)
    step = partial(longitudinal_step, model=G, optimizer=optimizer)
    return fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
