"""Register one volume to another: with a trained network, or by optimising the transform per pair.

- :func:`register` is the public entry point for volumes as arrays: ``register(moving, fixed, model)``
  checks its inputs, then returns the displacement, the warped moving volume (and its labels) and
  the seconds it took;
- :func:`register_iterative` is the classical baseline: gradient descent on a displacement or
  velocity field for *one* pair, with the same loss a network is trained with (the affine baseline,
  12 numbers instead of a field, is :func:`gen3d_lessons.baselines.registration.register_affine`);
- :func:`warp_labels` carries label maps (or tissue probabilities) through a displacement;
- the evaluation of any method that ends in a displacement field (chapter 13 runs it on atlases and hearts):
  :func:`score_fields` (one row of a results table), :func:`seconds_per_pair`, :func:`timed_batch`,
  :func:`optimiser_curve` (the optimiser's accuracy against its time), :func:`optimiser_match`
  (how long the optimiser needs to match a network; :func:`match_numbers`: the same, flat), :func:`folding_scores` and
  :func:`folding_by_parametrisation` (what a velocity field buys), and the local volume
  change of a motion (:func:`mean_jacobian`, :func:`volume_change`, :func:`volume_change_summary`),
  all of it flat for the record (:func:`registration_metrics`);
- the data those evaluations read: :func:`brain_atlas` (the phantoms' template as an atlas) and
  :func:`cine_pairs` (each heart's end-diastole and end-systole, on isotropic voxels).

Tensors are (B, C, D, H, W); displacements (B, 3, D, H, W) in voxels, on the fixed image's grid:
``warped(x) = moving(x + u(x))`` (see :mod:`gen3d_lessons.spatial`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import spatial
from ..data.brain import brain_template
from ..data.datasets import CaseRecord, load_case, stack_cine_phases
from ..data.io import check_volume
from ..metrics import score_segmentation
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


# 3. Scoring a method: its fields, its time -----------------------------------------------------

def score_fields(displacement: torch.Tensor, moving_labels: torch.Tensor, fixed_labels: torch.Tensor,
                 classes: Mapping[str, int], spacing: Any = None, seconds: float = 0.0) -> dict[str, float]:
    """One row of a registration table: the moving labels carried through each field, scored.

    ``displacement`` (N, 3, D, H, W) registers N pairs; ``moving_labels`` (1 or N, K, D, H, W) are
    class probabilities (one atlas for every pair, or one map per pair), carried by
    :func:`warp_labels`; ``fixed_labels`` (N, D, H, W) the integer labels they are scored against,
    for the ``classes`` ``{name: value}``, with voxels of ``spacing`` mm. The row: the mean over
    classes of each class's mean Dice over pairs, the Dice of each class, HD95 (mm: the median over
    pairs of each class, averaged over the classes), the share of folded voxels (%) and ``seconds``.
    """
    n = displacement.shape[0]
    if moving_labels.shape[0] not in (1, n) or fixed_labels.shape[0] != n:
        raise ValueError(f"moving_labels, fixed_labels: expected 1 or {n} and {n} items for {n} displacements, "
                         f"got {moving_labels.shape[0]} and {fixed_labels.shape[0]}")
    warped = warp_labels(moving_labels.expand(n, *moving_labels.shape[1:]), displacement)    # (N, D, H, W)
    rows = pd.DataFrame([r for w, y in zip(warped, fixed_labels)
                         for r in score_segmentation(w, y, dict(classes), spacing)])     # one row per pair and class
    per_class = rows.groupby("class", sort=False)
    dice = per_class["Dice"].mean()
    return {"mean Dice": dice.mean(), **{f"Dice {c}": dice[c] for c in classes},
            "HD95 (mm)": per_class["HD95"].median().mean(),
            "folded voxels (%)": 100 * spatial.folding_fraction(displacement).mean().item(), "s per pair": seconds}


def folding_scores(displacement: torch.Tensor, moving_labels: torch.Tensor, fixed_labels: torch.Tensor,
                   classes: Mapping[str, int], spacing: Any = None) -> dict[str, float]:
    """How much a field folds, and what it buys: folded voxels (%), the smallest det J, and the mean Dice.

    Inputs as for :func:`score_fields`; ``fixed_labels`` may hold more items than there are
    fields (the first N are used). The mean Dice is the mean over pairs of each pair's mean over
    ``classes``.
    """
    n = displacement.shape[0]
    if moving_labels.shape[0] not in (1, n) or fixed_labels.shape[0] < n:
        raise ValueError(f"moving_labels, fixed_labels: expected 1 or {n} and at least {n} items for {n} "
                         f"displacements, got {moving_labels.shape[0]} and {fixed_labels.shape[0]}")
    warped = warp_labels(moving_labels.expand(n, *moving_labels.shape[1:]), displacement)    # (N, D, H, W)
    dice = [np.mean([r["Dice"] for r in score_segmentation(w, y, dict(classes), spacing)])
            for w, y in zip(warped, fixed_labels)]
    return {"folded voxels (%)": 100 * spatial.folding_fraction(displacement).mean().item(),
            "min det J": spatial.jacobian_determinant(displacement).min().item(), "mean Dice": float(np.mean(dice))}


def folding_by_parametrisation(moving: torch.Tensor, moving_labels: torch.Tensor, fixed: torch.Tensor,
                               fixed_labels: torch.Tensor, classes: Mapping[str, int], spacing: Any,
                               loss_fn: RegistrationLoss, *, steps: int, lr: float = 0.1) -> pd.DataFrame:
    """What integrating a velocity buys: the optimiser free on the full grid, as a displacement and as a velocity.

    Runs :func:`register_iterative` twice on the pairs (``grid=None``: a vector per voxel), once
    for ``phi = id + u`` and once for ``phi = exp(v)``, with the same ``loss_fn`` (give it a light
    regulariser, so that nothing but the parametrisation keeps the field from folding), and scores
    each with :func:`folding_scores`. Rows ``"displacement, id + u"`` and ``"velocity, exp(v)"``.
    """
    rows = {}
    for name, diffeomorphic in (("displacement, id + u", False), ("velocity, exp(v)", True)):
        u = register_iterative(_broadcast(moving, len(fixed)), fixed, loss_fn, grid=None, steps=steps, lr=lr,
                               diffeomorphic=diffeomorphic)
        rows[name] = folding_scores(u, moving_labels, fixed_labels, classes, spacing)
    return pd.DataFrame(rows).T


def seconds_per_pair(register_batch: Callable[[torch.Tensor], Any], fixed: torch.Tensor, n: int) -> float:
    """Wall-clock seconds of ``register_batch(fixed[i:i + 1])``, one pair at a time, averaged over the first ``n``.

    One pair at a time, as a user registering a new scan would: a batch would share the overheads.
    """
    if n < 1 or n > len(fixed):
        raise ValueError(f"n: expected 1 to {len(fixed)} pairs to time, got {n}")
    t0 = time.perf_counter()
    for i in range(n):
        register_batch(fixed[i:i + 1])
    return (time.perf_counter() - t0) / n


def timed_batch(register_batch: Callable[[torch.Tensor], torch.Tensor],
                fixed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``register_batch(fixed)`` on all pairs at once: its result and the seconds per pair (the batch's time over N)."""
    t0 = time.perf_counter()
    out = register_batch(fixed)
    return out, (time.perf_counter() - t0) / len(fixed)


def _broadcast(moving: torch.Tensor, n: int) -> torch.Tensor:
    """The moving images for n pairs: one atlas (1, C, *S) repeated, or already (n, C, *S)."""
    if moving.shape[0] not in (1, n):
        raise ValueError(f"moving: expected 1 or {n} images for {n} fixed ones, got {moving.shape[0]}")
    return moving.expand(n, *moving.shape[1:])


def optimiser_curve(moving: torch.Tensor, fixed: torch.Tensor, loss_fn: RegistrationLoss,
                    score: Callable[[torch.Tensor, float], dict[str, float]], *, at_steps: Sequence[int],
                    n_timed: int, **options: Any) -> dict[str, dict[str, float]]:
    """The iterative optimiser's accuracy against its time: one row ``"iterative, k steps"`` per ``at_steps``.

    The fields: one :func:`iterative_path` on all pairs at once (``moving`` (1 or N, C, *S) to
    ``fixed`` (N, C, *S)), scored by ``score(u, seconds)`` (e.g. :func:`score_fields` with the labels
    bound). The seconds: the same path run one pair at a time on the first ``n_timed`` pairs and
    averaged, with the clock read at each step count. A run of k steps is the first k steps of any
    longer run, so one run gives every row. ``options`` go to :func:`iterative_path`.
    """
    if n_timed < 1 or n_timed > len(fixed):
        raise ValueError(f"n_timed: expected 1 to {len(fixed)} pairs to time, got {n_timed}")
    moving = _broadcast(moving, len(fixed))
    timed = [iterative_path(moving[i:i + 1], fixed[i:i + 1], loss_fn, at_steps=at_steps, **options)
             for i in range(n_timed)]                                            # one pair at a time: the seconds
    rows = {}
    for k, snapshot in enumerate(iterative_path(moving, fixed, loss_fn, at_steps=at_steps, **options)):  # the fields
        rows[f"iterative, {snapshot.step} steps"] = score(snapshot.displacement, np.mean([t[k].seconds for t in timed]))
    return rows


@torch.no_grad()
def network_displacement(model: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """One forward pass of a registration network: u (N, 3, D, H, W) on the CPU.

    ``moving`` (1 or N, C, *S) is broadcast to ``fixed`` (N, C, *S); both go to the model's device.
    """
    device = next(model.parameters()).device
    return model(_broadcast(moving, len(fixed)).to(device), fixed.to(device)).displacement.cpu()


class OptimiserMatch(NamedTuple):
    """What :func:`optimiser_match` finds in a table."""

    row: str            # the cheapest optimiser row that reaches the network's Dice, else the longest run
    reached: bool       # whether any optimiser row reaches it
    steps: int          # that row's number of steps
    speedup: float      # that row's seconds per pair over the network's
    longest: str        # the optimiser's longest run
    longest_steps: int


def optimiser_match(table: pd.DataFrame, network: str, prefix: str = "iterative") -> OptimiserMatch:
    """How long does the optimiser need to reach the network's Dice? "Faster at comparable accuracy", measured.

    ``table`` has one row per method (index ``"<prefix>, k steps"`` for the optimiser, in
    increasing k) and the columns ``"mean Dice"`` and ``"s per pair"`` (:func:`score_fields`).
    """
    curve = table[table.index.str.startswith(prefix)]
    if network not in table.index or curve.empty:
        raise ValueError(f"table: needs a row {network!r} and rows starting with {prefix!r}; has {list(table.index)}")
    steps_of = lambda row: int(row.split()[1])                           # "iterative, 20 steps" -> 20
    reaching = curve[curve["mean Dice"] >= table.loc[network, "mean Dice"]]
    row = reaching.index[0] if len(reaching) else curve.index[-1]       # the cheapest run that matches
    speedup = table.loc[row, "s per pair"] / table.loc[network, "s per pair"]
    return OptimiserMatch(row, bool(len(reaching)), steps_of(row), speedup, curve.index[-1], steps_of(curve.index[-1]))


def match_numbers(table: pd.DataFrame, network: str, match: OptimiserMatch) -> dict[str, Any]:
    """The numbers a sentence about :func:`optimiser_match` needs, flat (for ``glue_values(**...)``).

    ``net_dice`` and ``net_ms`` (the network's Dice and milliseconds per pair); ``matched_steps``,
    ``matched_dice`` and ``matched_s`` (the matched optimiser run); ``speedup`` and ``speed_factor``
    (the speed-up, and the same as a factor >= 1 whichever side is faster); ``iter_steps`` and
    ``iter_dice`` (the optimiser's longest run). ``table`` as for :func:`optimiser_match`.
    """
    if network not in table.index or match.row not in table.index or match.longest not in table.index:
        raise ValueError(f"table: needs the rows {network!r}, {match.row!r} and {match.longest!r}; has {list(table.index)}")
    dice, seconds = table["mean Dice"], table["s per pair"]
    return dict(net_dice=dice[network], net_ms=1000 * seconds[network], matched_steps=match.steps,
                matched_dice=dice[match.row], matched_s=seconds[match.row], speedup=match.speedup,
                speed_factor=max(match.speedup, 1 / match.speedup), iter_steps=match.longest_steps,
                iter_dice=dice[match.longest])


# 4. The motion of a heart: local volume change -------------------------------------------------

class CinePairs(NamedTuple):
    """End-diastole (moving) and end-systole (fixed) of each case, from :func:`cine_pairs`."""

    moving: torch.Tensor            # ED images (N, 1, X, Y, Z)
    fixed: torch.Tensor             # ES images (N, 1, X, Y, Z)
    moving_labels: torch.Tensor     # ED label fractions (N, K, X, Y, Z)
    fixed_labels: torch.Tensor      # ES label fractions (N, K, X, Y, Z)
    spacing: tuple[float, ...]      # the voxel size after pooling (mm)


def cine_pairs(records: Sequence[CaseRecord], z: slice = slice(None), pool: Sequence[int] = (2, 2, 1),
               num_classes: int = 4) -> CinePairs:
    """Each cine case's ED and ES frames, slices ``z``, averaged over ``pool`` voxels: a pair to register.

    Averaging pairs of in-plane pixels of a stack whose slices are twice as thick gives isotropic
    voxels, so that a field smooth in voxels is smooth in millimetres too. The label maps become
    the fraction of each of ``num_classes`` classes in a pooled voxel. Reads the frames with
    :func:`~gen3d_lessons.data.datasets.stack_cine_phases`; the spacing is the first case's.
    """
    if not records:
        raise ValueError("records: no cases")
    images, labels, phases = stack_cine_phases(records, z=z)          # ED, ES, ED, ES ...
    if phases[0::2] != ["ED"] * len(records) or phases[1::2] != ["ES"] * len(records):
        raise ValueError(f"records: expected ED, ES frames in turn, got {phases}")
    pool = tuple(int(p) for p in pool)
    images = F.avg_pool3d(images, pool)
    fractions = F.avg_pool3d(F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float(), pool)
    spacing = load_case(records[0], ["label"])["label"].spacing                    # (mm) before pooling
    return CinePairs(images[0::2], images[1::2], fractions[0::2], fractions[1::2],
                     tuple(s * f for s, f in zip(spacing, pool)))


def mean_jacobian(displacement: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The mean of det J over the voxels of a boolean ``mask`` (N, D, H, W), one per field: (N,)."""
    if mask.shape != (displacement.shape[0], *displacement.shape[2:]):
        raise ValueError(f"mask: expected shape {(displacement.shape[0], *displacement.shape[2:])}, "
                         f"got {tuple(mask.shape)}")
    det = spatial.jacobian_determinant(displacement)
    return ((det * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)).numpy()


def volume_change(fields: Mapping[str, torch.Tensor], moving_fractions: torch.Tensor, fixed_fractions: torch.Tensor,
                  structures: Mapping[str, int], ratio: str = "volume ratio",
                  index: Sequence[Any] | None = None) -> pd.DataFrame:
    """How each field changes the volume of each structure: one row per pair (labelled by ``index``, if given).

    A field on the fixed grid looks each fixed voxel up in the moving image, so inside a structure
    of the *fixed* labels its det J is the factor by which that structure's content was larger in
    the moving image. Columns: ``ratio``, the first structure's moving volume over its fixed volume
    from the label fractions (N, K, *S), then ``"<structure> det J, <field>"`` for every structure and
    field (:func:`mean_jacobian` over the structure's voxels at the fixed time).
    """
    first = next(iter(structures.values()))
    volumes = moving_fractions[:, first].flatten(1).sum(1) / fixed_fractions[:, first].flatten(1).sum(1)
    table = {ratio: volumes.numpy()}
    fixed_labels = fixed_fractions.argmax(1)                                          # (N, *S)
    for name, value in structures.items():
        for method, u in fields.items():
            table[f"{name} det J, {method}"] = mean_jacobian(u, fixed_labels == value)
    return pd.DataFrame(table, index=None if index is None else list(index))


def volume_change_summary(table: pd.DataFrame, methods: Sequence[str], cavity: str, wall: str,
                          ratio: str = "volume ratio") -> pd.DataFrame:
    """What :func:`volume_change` says about each method, over all pairs: one row per method.

    Columns: ``cavity`` and ``wall``, the mean det J in the ``cavity`` structure and in the ``wall``
    structure; ``corr``, the correlation across pairs of the cavity's det J with the ``ratio``;
    ``recovered``, the share of the volume change the cavity's det J holds,
    ``(mean det J - 1) / (mean ratio - 1)``; ``wall_steady``, whether the wall changes less than the
    cavity (``|det J - 1|`` on the means), as muscle that keeps its volume should.
    """
    mean_ratio = table[ratio].mean()
    rows = {}
    for m in methods:
        inside, around = table[f"{cavity} det J, {m}"].mean(), table[f"{wall} det J, {m}"].mean()
        rows[m] = {"cavity": inside, "wall": around,
                   "corr": float(np.corrcoef(table[ratio], table[f"{cavity} det J, {m}"])[0, 1]),
                   "recovered": (inside - 1) / (mean_ratio - 1), "wall_steady": bool(abs(around - 1) < abs(inside - 1))}
    return pd.DataFrame(rows).T


def registration_metrics(brain: pd.DataFrame, heart: pd.DataFrame, motion: pd.DataFrame, matched: str,
                         mean_ratio: float, training: Mapping[str, Any], cavity: str = "LV", wall: str = "MYO",
                         ratio: str = "EDV/ESV") -> dict[str, Any]:
    """Everything chapter 13 measures that is worth keeping, flat (``record(..., metrics=...)``).

    ``brain`` and ``heart`` are results tables (one row per method, :func:`score_fields`): their
    Dice and the brain's seconds per pair; ``matched`` the optimiser row :func:`optimiser_match`
    chose; ``mean_ratio`` the mean volume ratio of the pairs; ``motion`` what
    :func:`volume_change_summary` says (one row per method), named with ``cavity``, ``wall`` and
    ``ratio``; ``training`` maps a part ("brain") to its training history (``steps``, ``seconds``).
    """
    missing = {"mean Dice", "s per pair"} - set(brain.columns) | {"mean Dice"} - set(heart.columns)
    if missing or not {"corr", "cavity", "wall"} <= set(motion.columns):
        raise ValueError(f"brain, heart, motion: missing the columns {sorted(missing)} or corr/cavity/wall; "
                         f"motion has {list(motion.columns)}")
    return {**{f"brain {k}, {n}": float(v) for k, col in (("Dice", "mean Dice"), ("s per pair", "s per pair"))
               for n, v in brain[col].items()}, "optimiser run matched": matched,
            **{f"heart Dice, {n}": float(v) for n, v in heart["mean Dice"].items()},
            **{f"corr({cavity} det J, {ratio}), {m}": motion.loc[m, "corr"] for m in motion.index},
            **{f"mean {s} det J, {m}": motion.loc[m, col] for s, col in ((cavity, "cavity"), (wall, "wall"))
               for m in motion.index}, f"mean {ratio}": mean_ratio,
            **{f"training {k}, {part}": getattr(history, attr) for part, history in training.items()
               for k, attr in (("steps", "steps"), ("s", "seconds"))}}


# 5. The brain phantoms' atlas ------------------------------------------------------------------

class Atlas(NamedTuple):
    """An atlas for registration: what is moved onto each subject, and what it carries along."""

    image: torch.Tensor             # (1, 1, D, H, W): T1
    probabilities: torch.Tensor     # (1, K, D, H, W): background, CSF, GM, WM
    labels: np.ndarray              # (D, H, W) integer labels
    spacing: tuple[float, ...]      # isotropic voxels (mm)


def brain_atlas(size: int) -> Atlas:
    """The template the brain phantoms are made from (:func:`~gen3d_lessons.data.brain.brain_template`), as an atlas."""
    template = brain_template(size)
    return Atlas(torch.from_numpy(template["image"][..., 0])[None, None],
                 torch.from_numpy(template["probabilities"]).permute(3, 0, 1, 2)[None],
                 template["label"], (float(abs(template["affine"][0, 0])),) * 3)
