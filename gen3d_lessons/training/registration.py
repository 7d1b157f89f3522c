"""The registration family's loss and training step (VoxelMorph, unsupervised or with label supervision).

    L = sim(fixed, moving ∘ phi) + lambda_smooth * reg(u) + lambda_dice * (1 - Dice(labels_fixed, labels_moving ∘ phi))

``RegistrationLoss`` holds the recipe (which similarity, which regulariser, the weights); the same
object scores a network's output during training and a field optimised per pair in
:func:`gen3d_lessons.tasks.register.register_iterative`, so the two are compared on one objective.
:func:`registration_step` is one step of training; :func:`train_registration` the whole run, over
batches from :func:`atlas_batches` (an atlas to many subjects) or :func:`pair_batches` (pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from .. import losses as L
from .. import spatial
from .fit import History, fit


@dataclass(frozen=True)
class RegistrationLoss:
    similarity: str = "mse"          # "mse" (same contrast) or "ncc" (local normalised cross-correlation)
    regulariser: str = "gradient"    # "gradient" (diffusion, mean |∇u|²) or "bending" (second derivatives)
    smoothness: float = 0.01         # lambda_smooth
    dice: float = 0.0                # lambda_dice: weight of the auxiliary label term (0: unsupervised)
    ncc_window: int = 7

    def __post_init__(self):
        if self.similarity not in ("mse", "ncc"):
            raise ValueError(f"similarity: expected 'mse' or 'ncc', got {self.similarity!r}")
        if self.regulariser not in ("gradient", "bending"):
            raise ValueError(f"regulariser: expected 'gradient' or 'bending', got {self.regulariser!r}")
        if self.smoothness < 0 or self.dice < 0:
            raise ValueError(f"weights must be >= 0, got smoothness={self.smoothness}, dice={self.dice}")

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, u: torch.Tensor,
                 fixed_labels: torch.Tensor | None = None,
                 warped_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The terms and their weighted sum ``"loss"``; the Dice term needs both label tensors (B, K, *S)."""
        sim = L.mse_loss(fixed, warped) if self.similarity == "mse" else L.ncc_loss(fixed, warped, self.ncc_window)
        reg = L.gradient_loss(u) if self.regulariser == "gradient" else L.bending_energy(u)
        terms = {"similarity": sim, "smoothness": reg}
        loss = sim + self.smoothness * reg
        if self.dice > 0:
            if fixed_labels is None or warped_labels is None:
                raise ValueError("RegistrationLoss: dice > 0 needs fixed_labels and warped_labels (B, K, *S)")
            terms["dice_loss"] = L.soft_dice_loss(fixed_labels, warped_labels)
            loss = loss + self.dice * terms["dice_loss"]
        terms["loss"] = loss
        return terms


def registration_step(batch: Mapping[str, Any], i: int, *, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, loss_fn: RegistrationLoss) -> dict[str, float]:
    """One optimiser step of a VoxelMorph-style ``model(moving, fixed) -> (field, displacement, warped)``.

    ``batch``: ``moving``, ``fixed`` (B, C, D, H, W); with ``loss_fn.dice > 0`` also ``moving_labels``
    and ``fixed_labels`` (B, K, D, H, W), one-hot or probabilities. Use with ``fit``:
    ``fit(partial(registration_step, model=net, optimizer=opt, loss_fn=loss_fn), loader, ...)``.
    """
    model.train()
    device = next(model.parameters()).device
    moving, fixed = batch["moving"].to(device), batch["fixed"].to(device)
    # 1. predict the field, integrate and upsample it, warp the moving image (the spatial transformer)
    out = model(moving, fixed)
    # 2. labels of the moving image follow the same deformation (linear interpolation: differentiable)
    warped_labels = fixed_labels = None
    if loss_fn.dice > 0:
        fixed_labels = batch["fixed_labels"].to(device)
        warped_labels = spatial.warp(batch["moving_labels"].to(device), out.displacement)
    # 3. similarity + smoothness (+ Dice), then one step of the optimiser
    terms = loss_fn(fixed, out.warped, out.displacement, fixed_labels, warped_labels)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    # 4. report the terms and how much the field moves (voxels)
    report = {k: v.detach() for k, v in terms.items()}
    report["mean_|u|"] = out.displacement.detach().pow(2).sum(1).sqrt().mean()
    return report


def train_registration(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: RegistrationLoss, *,
                       lr: float, max_steps: int, budget_s: float | None = None,
                       desc: str = "registration") -> History:
    """Train a registration network: Adam on all its parameters, :func:`fit` over :func:`registration_step`.

    ``batches`` as :func:`atlas_batches` or :func:`pair_batches` yield them; ``loss_fn`` with
    ``dice > 0`` needs their labels. ``max_steps`` ends the run, ``budget_s`` is :func:`fit`'s
    fuse. The model is left in eval mode, ready to register; returns the :class:`History`.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = fit(partial(registration_step, model=model, optimizer=optimizer, loss_fn=loss_fn), batches,
                  max_steps=max_steps, budget_s=budget_s, desc=desc)
    model.eval()
    return history


def atlas_batches(atlas: torch.Tensor, atlas_labels: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int, generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches for atlas-to-subject registration: the atlas is always the moving image.

    ``atlas`` (1, C, *S) and its class probabilities ``atlas_labels`` (1, K, *S); a pool of subjects
    ``images`` (N, C, *S) with integer ``labels`` (N, *S) in [0, K). Each batch draws ``batch_size``
    subjects at random (with ``generator``) and yields the dict :func:`registration_step` reads, the
    subjects' labels one-hot encoded with K classes.
    """
    n, k = images.shape[0], atlas_labels.shape[1]
    if atlas.ndim != images.ndim or atlas.shape[0] != 1 or atlas.shape[1:] != images.shape[1:]:
        raise ValueError(f"atlas: expected shape (1, {', '.join(map(str, images.shape[1:]))}) to match the "
                         f"images {tuple(images.shape)}, got {tuple(atlas.shape)}")
    if labels.shape != (n, *images.shape[2:]):
        raise ValueError(f"labels: expected (N, *S) = {(n, *images.shape[2:])} integer maps, got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels: values must lie in [0, {k}) to match the atlas's {k} classes, "
                         f"got [{int(labels.min())}, {int(labels.max())}]")

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            i = torch.randint(0, n, (batch_size,), generator=generator)
            yield {"moving": atlas.expand(batch_size, *atlas.shape[1:]),
                   "fixed": images[i],
                   "moving_labels": atlas_labels.expand(batch_size, *atlas_labels.shape[1:]),
                   "fixed_labels": F.one_hot(labels[i].long(), k).movedim(-1, 1).float()}   # (B, K, *S)

    return batches()


def pair_batches(moving: torch.Tensor, fixed: torch.Tensor, moving_labels: torch.Tensor, fixed_labels: torch.Tensor, *,
                 batch_size: int, generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of matched pairs (moving[i] to fixed[i]), e.g. each heart's ED frame to its ES frame.

    ``moving``, ``fixed`` (N, C, *S); their labels (N, K, *S) as one-hot maps or class fractions.
    Each batch draws ``batch_size`` pair indices at random (with ``generator``) and yields the dict
    :func:`registration_step` reads.
    """
    n = moving.shape[0]
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed: expected the moving images' shape {tuple(moving.shape)}, got {tuple(fixed.shape)}")
    for name, lab in (("moving_labels", moving_labels), ("fixed_labels", fixed_labels)):
        if lab.ndim != moving.ndim or lab.shape[0] != n or lab.shape[2:] != moving.shape[2:]:
            raise ValueError(f"{name}: expected (N, K, *S) = ({n}, K, {', '.join(map(str, moving.shape[2:]))}), "
                             f"got {tuple(lab.shape)}")

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            i = torch.randint(0, n, (batch_size,), generator=generator)
            yield {"moving": moving[i], "fixed": fixed[i], "moving_labels": moving_labels[i],
                   "fixed_labels": fixed_labels[i]}

    return batches()
