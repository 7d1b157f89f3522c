"""Register one volume to another: with a trained network, or by optimising the transform per pair.

- :func:`register` is the public entry point for volumes as arrays: ``register(moving, fixed, model)``
  checks its inputs, then returns the displacement, the warped moving volume (and its labels) and
  the seconds it took;
- :func:`register_iterative` is the classical baseline: gradient descent on a displacement or
  velocity field for *one* pair, with the same loss a network is trained with (the affine baseline,
  12 numbers instead of a field, is :func:`gen3d_lessons.baselines.registration.register_affine`);
- :func:`warp_labels` carries label maps (or tissue probabilities) through a displacement.

Tensors are (B, C, D, H, W); displacements (B, 3, D, H, W) in voxels, on the fixed image's grid:
``warped(x) = moving(x + u(x))`` (see :mod:`gen3d_lessons.spatial`).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import spatial
from ..data.io import check_volume
from ..training.registration import RegistrationLoss
from ..profiles import step_cap


# 1. Classical optimisers, one pair (or a batch of independent pairs) at a time ----------------

class IterativeSnapshot(NamedTuple):
    """The optimiser's field after ``step`` steps, and the seconds spent to get there."""

    step: int
    seconds: float
    displacement: torch.Tensor         # (B, 3, D, H, W)


def iterative_path(moving: torch.Tensor, fixed: torch.Tensor, loss_fn: RegistrationLoss | None = None, *,
                   at_steps: Sequence[int], diffeomorphic: bool = True, grid: int | None = 16, lr: float = 0.1,
                   integration_steps: int = 7, init: torch.Tensor | None = None) -> list[IterativeSnapshot]:
    """Gradient descent (Adam) on a field for this pair only, with the field kept at each of ``at_steps``.

    The unknown is a velocity ``v`` (``diffeomorphic=True``: ``u = exp(v)``) or a displacement, on
    a ``grid``³ control grid (None: the image grid) that is upsampled to the image, exactly as the
    network's output is. ``init`` (B, 3, D, H, W) starts from a known displacement (e.g. an affine
    one), composed with the optimised field. Labels are not used: at test time there are none.
    One run to ``max(at_steps)`` gives the field (and the time) of every shorter run on the way, since
    a run of k steps is the first k steps of a longer one.
    """
    loss_fn = loss_fn or RegistrationLoss()
    if loss_fn.dice > 0:
        raise ValueError("register_iterative: the loss uses labels (dice > 0), which a new pair does not have")
    wanted = sorted({int(k) for k in at_steps})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"at_steps: expected step counts >= 0, got {list(at_steps)}")
    shape = tuple(fixed.shape[2:])
    coarse = shape if grid is None else (int(grid),) * len(shape)
    field = torch.zeros(fixed.shape[0], len(shape), *coarse, device=fixed.device, requires_grad=True)
    optimizer = torch.optim.Adam([field], lr=lr)

    def displacement() -> torch.Tensor:
        u = spatial.integrate_velocity(field, integration_steps) if diffeomorphic else field
        u = spatial.resize_displacement(u, shape) if coarse != shape else u
        return u if init is None else spatial.compose(init, u)          # x -> init-map after the field

    snapshots = []
    t0 = time.perf_counter()
    with torch.enable_grad():
        for step in range(wanted[-1] + 1):
            if step in wanted:
                with torch.no_grad():
                    snapshots.append(IterativeSnapshot(step, time.perf_counter() - t0, displacement()))
            if step == wanted[-1]:
                break
            if step >= step_cap(wanted[-1]):           # a dry run keeps the field and takes no more steps
                continue
            u = displacement()
            loss = loss_fn(fixed, spatial.warp(moving, u), u)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return snapshots


def register_iterative(moving: torch.Tensor, fixed: torch.Tensor, loss_fn: RegistrationLoss | None = None, *,
                       steps: int = 150, **options: Any) -> torch.Tensor:
    """The field after ``steps`` steps of :func:`iterative_path` (same options); returns u (B, 3, D, H, W)."""
    return iterative_path(moving, fixed, loss_fn, at_steps=(steps,), **options)[-1].displacement


def warp_labels(labels: torch.Tensor, displacement: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Carry a label map through ``displacement``; returns integer labels (B, D, H, W).

    ``labels`` is either a label map (B, 1, D, H, W) of integers, one-hot encoded with
    ``num_classes``, or already class probabilities (B, K, D, H, W), e.g. an atlas's tissue maps.
    The K maps are interpolated linearly and the most probable class wins at each voxel: thin
    structures survive, where nearest-neighbour resampling of the label map would break them.
    """
    if labels.shape[1] == 1:
        if num_classes is None:
            raise ValueError("warp_labels: a (B, 1, ...) label map needs num_classes to be one-hot encoded")
        labels = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()   # (B, K, D, H, W)
    return spatial.warp(labels.float(), displacement).argmax(dim=1)


# 2. The public helper for volumes given as arrays ---------------------------------------------

class Registered(NamedTuple):
    """What :func:`register` returns (numpy arrays, on the fixed image's grid)."""

    displacement: np.ndarray              # (3, X, Y, Z) in voxels: fixed voxel x sits at moving's x + u(x)
    warped: np.ndarray                    # moving resampled onto the fixed grid, moving's shape
    warped_labels: np.ndarray | None      # (X, Y, Z) int64: moving_labels carried along; None without them
    seconds: float                        # time spent finding the transform (one network pass, or the optimiser)


def _as_batch(volume: Any, name: str) -> torch.Tensor:
    """(X, Y, Z) or channels-last (X, Y, Z, C), numpy or torch, checked -> (1, C, X, Y, Z) float32."""
    if hasattr(volume, "shape") and len(volume.shape) == 2:
        raise ValueError(f"{name}: got a 2D image of shape {tuple(volume.shape)}; register() works on 3D volumes "
                         "(X, Y, Z) or (X, Y, Z, C); stack the slices into a volume first")
    check_volume(volume, name, ndim=(3, 4))
    x = volume.detach().float().cpu() if isinstance(volume, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(volume, dtype=np.float32))
    check_volume(x, f"{name} (as float32)")                           # 1e300 in float64 becomes inf
    if min(x.shape[:3]) < 4:
        raise ValueError(f"{name}: every spatial axis needs at least 4 voxels, got shape {tuple(x.shape)}")
    x = x[..., None] if x.ndim == 3 else x
    return x.permute(3, 0, 1, 2)[None].contiguous()                    # (1, C, X, Y, Z)


def _label_batch(labels: Any, shape: tuple[int, ...], num_classes: int | None) -> torch.Tensor:
    """A label map (X, Y, Z) of integers in [0, num_classes), or class probabilities (X, Y, Z, K),
    checked -> (1, K, X, Y, Z) probabilities."""
    check_volume(labels, "moving_labels", ndim=(3, 4))
    x = torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
    if tuple(x.shape[:3]) != tuple(shape):
        raise ValueError(f"moving_labels: spatial shape {tuple(x.shape[:3])} does not match the moving volume's "
                         f"{tuple(shape)}")
    if x.ndim == 4:                                                     # class probabilities, channels last
        x = x.float()
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"moving_labels: a 4D input is read as class probabilities (X, Y, Z, K) and must lie "
                             f"in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
        return x.permute(3, 0, 1, 2)[None].contiguous()
    if num_classes is None or isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes: a label map needs the number of classes (an integer >= 2) to check its "
                         f"values against, got {num_classes!r}")
    if x.is_floating_point() and not torch.equal(x, x.round()):
        raise ValueError("moving_labels: expected integer labels, found fractional values (pass class "
                         "probabilities as (X, Y, Z, K) instead)")
    values = x.long().unique().tolist()
    outside = [v for v in values if not 0 <= v < num_classes]
    if outside:
        raise ValueError(f"moving_labels: values {outside} are outside the expected labels 0..{int(num_classes) - 1} "
                         f"(num_classes={int(num_classes)})")
    return F.one_hot(x.long(), int(num_classes)).permute(3, 0, 1, 2)[None].float()  # (1, K, X, Y, Z)


def register(moving: Any, fixed: Any, model: torch.nn.Module | None = None, *, moving_labels: Any = None,
             num_classes: int | None = None, **iterative: Any) -> Registered:
    """Register ``moving`` to ``fixed``; returns a :class:`Registered` (displacement, warped, labels, seconds).

    Volumes are (X, Y, Z) or channels-last (X, Y, Z, C) arrays or tensors of one shape. With a
    trained ``model`` (e.g. a :class:`~gen3d_lessons.models.registration.VoxelMorph`) the transform
    is one forward pass; without one it is optimised for this pair by :func:`register_iterative`
    (keyword arguments go to it). ``moving_labels`` (a label map with ``num_classes`` classes, or
    probabilities (X, Y, Z, K)) are carried through the same transform by :func:`warp_labels`.
    Displacements are in voxels on the fixed grid. Bad input raises ``ValueError`` naming the argument.
    """
    m, f = _as_batch(moving, "moving"), _as_batch(fixed, "fixed")
    if m.shape != f.shape:
        raise ValueError(f"fixed: shape {tuple(fixed.shape)} does not match moving shape {tuple(moving.shape)}; "
                         "resample both onto one grid first")
    labels = None if moving_labels is None else _label_batch(moving_labels, tuple(m.shape[2:]), num_classes)
    t0 = time.perf_counter()
    if model is None:
        u = register_iterative(m, f, **iterative)
    else:
        if iterative:
            raise TypeError(f"register: {sorted(iterative)} only apply without a model (the iterative optimiser)")
        cfg = getattr(model, "cfg", None)
        if cfg is not None and m.shape[1] != cfg.in_channels:
            raise ValueError(f"moving: the model expects {cfg.in_channels} channel(s), the volumes have {m.shape[1]}")
        device = next(model.parameters()).device
        with torch.no_grad():
            was_training = model.training
            model.eval()
            u = model(m.to(device), f.to(device)).displacement.cpu()
            model.train(was_training)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(u).all():
        lo, hi = float(min(m.min(), f.min())), float(max(m.max(), f.max()))
        raise ValueError(f"register: the displacement came out non-finite; the intensities span [{lo:.3g}, {hi:.3g}]: "
                         "scale both volumes to about [0, 1] first")
    warped = spatial.warp(m, u)[0].permute(1, 2, 3, 0)                  # (X, Y, Z, C)
    warped = warped[..., 0] if len(moving.shape) == 3 else warped
    warped_labels = None if labels is None else warp_labels(labels, u)[0].numpy()
    return Registered(u[0].numpy(), warped.numpy(), warped_labels, seconds)
