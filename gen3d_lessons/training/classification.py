"""Step functions of chapter 8's classifiers.

- :func:`shape_vae_step`: the joint objective of Biffi et al. (2018) for a
  :class:`~gen3d_lessons.models.shape_classifier.ShapeVAEClassifier`: the cross-entropy of the
  reconstructed label maps (the Gaussian VAE's squared error, for labels), ``beta`` times the KL
  term, and ``class_weight`` times the cross-entropy of the classifier on the latent mean;
- :func:`classifier_step`: plain cross-entropy for any network that maps a batch's ``"x"`` to
  class logits (the image CNN baseline);
- :func:`deformation_cvae_step`: the negative ELBO of a
  :class:`~gen3d_lessons.models.shape_generator.DeformationCVAE` on a pair of same-class hearts
  (:func:`same_class_pairs`), the generator of new hearts for the few-label section.

:func:`train_shape_vae` and :func:`train_classifier` bind Adam with a one-cycle learning rate and
run :func:`~gen3d_lessons.training.fit` on :class:`~gen3d_lessons.data.batches.Batches` of
``{"x": volumes, "y": classes}`` (no mirroring: a mirrored heart has its right ventricle on the
wrong side).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Batches
from ..losses import soft_dice_loss
from ..models.shape_classifier import one_hot_hearts
from .fit import History, fit
from .segmentation import one_cycle

__all__ = ["shape_vae_step", "classifier_step", "train_shape_vae", "train_classifier", "deformation_cvae_step",
           "same_class_pairs", "train_deformation_cvae"]


def _batch(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "x" not in batch or "y" not in batch:
        raise ValueError(f"batch: expected a dict with 'x' (volumes) and 'y' (classes), got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    return batch["x"].to(device), batch["y"].to(device).long()


def shape_vae_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                   beta: float = 1e-3, class_weight: float = 0.1, scheduler: Any = None) -> dict[str, float]:
    """One joint step on ``{"x": labels (B, F, D, H, W), "y": classes (B,)}``:
    ``CE(labels) + beta · KL + class_weight · CE(classes)``."""
    device = next(model.parameters()).device
    labels, y = _batch(batch, device)
    model.train()
    logits, mu, logvar, class_logits = model(labels)                         # (B, F, L, D, H, W), ...
    rec = F.cross_entropy(logits.transpose(1, 2), labels.long())            # classes on dim 1: (B, L, F, D, H, W)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
    ce = F.cross_entropy(class_logits, y)
    loss = rec + beta * kl + class_weight * ce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"rec": rec.item(), "kl": kl.item(), "ce": ce.item()}


def classifier_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any = None) -> dict[str, float]:
    """One cross-entropy step on ``{"x": inputs, "y": classes (B,)}``."""
    device = next(model.parameters()).device
    x, y = _batch(batch, device)
    model.train()
    ce = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    ce.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"ce": ce.item()}


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int, shift: int = 0) -> Batches:
    if len(x) != len(y):
        raise ValueError(f"x, y: expected one class per volume, got {len(x)} volumes and {len(y)} classes")
    return Batches({"x": x, "y": y}, batch, seed=seed, augment=("x",) if shift else (), flip_p=0.0, shift=shift)


def train_shape_vae(model: nn.Module, labels: torch.Tensor, classes: torch.Tensor, *, steps: int, batch: int,
                    lr: float = 2e-3, beta: float = 1e-3, class_weight: float = 0.1, seed: int = 0,
                    budget_s: float | None = None, desc: str = "shape VAE") -> History:
    """Adam with a one-cycle learning rate (peak ``lr``) and :func:`fit` over :func:`shape_vae_step`."""
    optimizer = torch.optim.Adam(model.parameters(), lr)
    step = partial(shape_vae_step, model=model, optimizer=optimizer, beta=beta, class_weight=class_weight,
                   scheduler=one_cycle(optimizer, steps))
    return fit(step, _batches(labels, classes, batch, seed), max_steps=steps, budget_s=budget_s, desc=desc)


def train_classifier(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, steps: int, batch: int,
                     lr: float = 2e-3, seed: int = 0, shift: int = 0, budget_s: float | None = None,
                     desc: str = "classifier") -> History:
    """Adam with a one-cycle learning rate (peak ``lr``) and :func:`fit` over :func:`classifier_step`;
    ``shift > 0`` moves every volume by up to that many voxels along each axis, a new draw each time."""
    optimizer = torch.optim.Adam(model.parameters(), lr)
    step = partial(classifier_step, model=model, optimizer=optimizer, scheduler=one_cycle(optimizer, steps))
    return fit(step, _batches(x, classes, batch, seed, shift), max_steps=steps, budget_s=budget_s, desc=desc)


def deformation_cvae_step(batch: Mapping[str, Any], i: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                          beta: float = 1e-3, smooth: float = 0.1, scheduler: Any = None) -> dict[str, float]:
    """One step of a :class:`~gen3d_lessons.models.shape_generator.DeformationCVAE` on
    ``{"source", "target": one-hot hearts (B, F * L, D, H, W), "y": their class (B,)}``:
    ``CE + (1 - soft Dice of the structures) + beta · KL + smooth · |∇v|²``, the warped source against
    the target on the model's training grid."""
    device = next(model.parameters()).device
    if not isinstance(batch, Mapping) or not {"source", "target", "y"} <= set(batch):
        raise ValueError(f"batch: expected a dict with 'source', 'target' (one-hot hearts) and 'y' (classes), got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    model.train()
    warped, target, mu, logvar, v = model(batch["source"].to(device), batch["target"].to(device), batch["y"].to(device))
    frames = (-1, model.cfg.labels, *warped.shape[2:])                  # every frame a sample: (B * F, L, ...)
    p, t = warped.reshape(frames).clamp_min(1e-6), target.reshape(frames)     # label fractions after the warp, target
    ce = -(t * p.log()).sum(1).mean()
    dice = 1.0 - soft_dice_loss(t, p)                                          # the structures, background left out
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
    roughness = sum(v.diff(dim=d).pow(2).mean() for d in (2, 3, 4))
    loss = ce + (1 - dice) + beta * kl + smooth * roughness
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"ce": ce.item(), "dice": dice.item(), "kl": kl.item()}


def same_class_pairs(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(i, j)``, ``i != j``, of items of the same class: two index tensors."""
    c = torch.as_tensor(classes).long().ravel()
    same = (c[:, None] == c[None, :]) & ~torch.eye(len(c), dtype=torch.bool)
    if not same.any():
        raise ValueError("classes: expected at least two hearts of one class to learn how hearts of a class differ")
    return same.nonzero(as_tuple=True)


def train_deformation_cvae(model: nn.Module, labels: torch.Tensor, classes: torch.Tensor, *, steps: int, batch: int,
                           lr: float = 2e-3, beta: float = 1e-3, smooth: float = 0.1, seed: int = 0,
                           budget_s: float | None = None, desc: str = "deformation CVAE") -> History:
    """Adam with a one-cycle learning rate and :func:`fit` over :func:`deformation_cvae_step`, on every
    ordered pair of same-class hearts of ``labels`` (N, F, D, H, W) int, ``classes`` (N,)."""
    if len(labels) != len(classes):
        raise ValueError(f"labels, classes: expected one class per heart, got {len(labels)} hearts and {len(classes)} classes")
    x = F.adaptive_avg_pool3d(one_hot_hearts(labels, model.cfg.labels), model.cfg.train_size)   # label fractions
    i, j = same_class_pairs(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    step = partial(deformation_cvae_step, model=model, optimizer=optimizer, beta=beta, smooth=smooth,
                   scheduler=one_cycle(optimizer, steps))
    pairs = Batches({"source": x[i], "target": x[j], "y": torch.as_tensor(classes).long()[i]}, batch, seed=seed)
    return fit(step, pairs, max_steps=steps, budget_s=budget_s, desc=desc)
