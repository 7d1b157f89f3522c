"""The classical registration baseline: one affine map (12 numbers in 3D) fitted to each pair.

:func:`register_affine` finds the affine map that best aligns a moving volume to a fixed one by
gradient descent (Adam) on a similarity; chapter 10 carries an atlas's labels with it, chapter 13
starts the deformable registration from it and measures the networks against it.

One map, three forms (:class:`AffineFit`):

- ``matrix`` (B, N, N+1) in voxels about the grid centre ``c = (S − 1) / 2``: a fixed-image voxel
  ``x`` comes from the moving image at ``y = A (x − c) + c + t``;
- ``displacement`` (B, N, *S) in voxels, ``u(x) = y − x``: the convention of
  :mod:`gen3d_lessons.spatial` and of every deformable field, so ``spatial.warp(moving, u)`` lands
  the moving volume on the fixed one;
- ``theta`` (B, N, N+1) for ``F.affine_grid(theta, size, align_corners=False)``: the same map in
  grid_sample's normalised coordinates (axes in reverse order, one unit = half the grid), which
  do not depend on the resolution. :func:`theta_to_matrix` and :func:`matrix_to_theta` convert.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .. import losses, spatial
from ..profiles import step_cap

SIMILARITIES = ("mse", "ncc", "global_ncc")
RESAMPLERS = ("warp", "affine_grid")


class AffineFit(NamedTuple):
    """What :func:`register_affine` returns: one affine map per pair, in three forms."""

    matrix: torch.Tensor         # (B, N, N+1) voxels about the grid centre: y - c = A (x - c) + t
    displacement: torch.Tensor   # (B, N, *S) voxels on the fixed grid: spatial.warp(moving, u) ≈ fixed
    theta: torch.Tensor          # (B, N, N+1) for F.affine_grid(theta, size, align_corners=False)


# 1. Two forms of one map ---------------------------------------------------------------------

def _half_widths(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Voxels per normalised unit along each axis, (N,): half the grid (``align_corners=False``)."""
    return torch.tensor([s / 2 for s in shape], dtype=like.dtype, device=like.device)


def theta_to_matrix(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid``'s theta (B, N, N+1) (``align_corners=False``) as a voxel matrix (B, N, N+1) on ``shape``.

    With ``h = S / 2`` voxels per normalised unit and the axes put back in (D, H, W) order:
    ``A_ij = theta_ij h_i / h_j`` and ``t_i = theta_i h_i``.
    """
    n = len(shape)
    if theta.ndim != 3 or theta.shape[1:] != (n, n + 1):
        raise ValueError(f"theta: expected shape (B, {n}, {n + 1}) for a {n}D grid, got {tuple(theta.shape)}")
    h = _half_widths(shape, theta)
    t = theta.flip(1)                                                   # rows in (D, H, W) order
    a = t[:, :, :n].flip(2) * (h[:, None] / h[None, :])                 # (B, N, N), columns too
    return torch.cat([a, (t[:, :, n] * h)[..., None]], dim=2)


def matrix_to_theta(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A voxel matrix (B, N, N+1) on ``shape`` as ``F.affine_grid``'s theta: the inverse of :func:`theta_to_matrix`."""
    n = len(shape)
    if matrix.ndim != 3 or matrix.shape[1:] != (n, n + 1):
        raise ValueError(f"matrix: expected shape (B, {n}, {n + 1}) for a {n}D grid, got {tuple(matrix.shape)}")
    h = _half_widths(shape, matrix)
    a = matrix[:, :, :n] * (h[None, :] / h[:, None])                    # (B, N, N) in (D, H, W) order
    theta = torch.cat([a.flip(2), (matrix[:, :, n] / h)[..., None]], dim=2)
    return theta.flip(1)                                                # rows in (W, H, D) order


# 2. Fitting the map --------------------------------------------------------------------------

def register_affine(moving: torch.Tensor, fixed: torch.Tensor, *, similarity: str = "mse", steps: int = 100,
                    lr: float = 0.01, blur_vox: float = 1.0, shrink: int = 1, resample: str = "warp",
                    smoothness: float = 0.0) -> AffineFit:
    """Fit an affine map per pair that brings ``moving`` onto ``fixed`` (both (B, C, *S)); returns an :class:`AffineFit`.

    1. Both volumes are blurred by a Gaussian of ``blur_vox`` voxels (a smoother cost has fewer
       local minima for so few parameters) and shrunk ``shrink`` times by average pooling (a
       global map needs no fine detail; edges must be divisible by ``shrink``).
    2. The unknowns start at the identity: ``A = I + dA`` and a translation measured in half grid
       widths, so that one learning rate suits both.
    3. Adam takes ``steps`` steps (fewer in a dry run) down the dissimilarity of the resampled
       moving volume and the fixed one: ``similarity="mse"`` (same contrast), ``"ncc"`` (``1 −``
       windowed NCC, :func:`gen3d_lessons.losses.ncc_loss`) or ``"global_ncc"`` (``1 −`` NCC of
       the whole images, :func:`gen3d_lessons.losses.global_ncc`: blind to a global change of
       brightness, so the two need not share an intensity scale). With ``resample="warp"``,
       ``smoothness`` weighs the mean ``|∇u|²`` of the displacement (the smoothness term of
       :class:`~gen3d_lessons.training.registration.RegistrationLoss`), which for an affine map
       grows with ``‖A − I‖²`` and so pulls the fit towards the identity (0: no pull).

    ``resample`` is how the moving volume is resampled while fitting: ``"warp"`` through the
    voxel displacement (:func:`gen3d_lessons.spatial.warp`, chapter 13) or ``"affine_grid"``
    through ``F.affine_grid`` / ``F.grid_sample`` with ``align_corners=False`` (chapter 10). Both
    sample the moving volume at the same points ``y``; they round differently, and each chapter
    keeps the path its numbers were recorded with.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if resample not in RESAMPLERS:
        raise ValueError(f"resample: expected one of {RESAMPLERS}, got {resample!r}")
    if smoothness < 0 or (smoothness > 0 and resample != "warp"):
        raise ValueError(f"smoothness: expected a weight >= 0 (and 0 unless resample='warp'), got {smoothness!r}")
    if moving.shape != fixed.shape or fixed.ndim < 3:
        raise ValueError(f"fixed: expected (B, C, *S) of moving's shape {tuple(moving.shape)}, got {tuple(fixed.shape)}")
    shape = tuple(fixed.shape[2:])
    n = len(shape)
    if isinstance(shrink, bool) or int(shrink) != shrink or shrink < 1 or any(s % shrink for s in shape):
        raise ValueError(f"shrink: expected a positive integer that divides every edge of {shape}, got {shrink!r}")

    # 1. what the optimiser sees: blurred, then shrunk
    m, f = (spatial.gaussian_blur(x, blur_vox) if blur_vox > 0 else x for x in (moving, fixed))
    if shrink > 1:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        m, f = pool(m, shrink), pool(f, shrink)
    small = tuple(f.shape[2:])

    # 2. the unknowns: dA and the translation in half grid widths, zero at the identity
    delta = torch.zeros(fixed.shape[0], n, n + 1, device=fixed.device, requires_grad=True)
    eye = torch.eye(n, n + 1, device=fixed.device)
    half = torch.tensor([s / 2 for s in small], device=fixed.device).view(1, n, 1)
    scale = torch.cat([torch.ones(1, n, n, device=fixed.device), half], dim=2)   # (1, N, N+1)

    def dissimilarity(warped: torch.Tensor) -> torch.Tensor:
        if similarity == "mse":
            return losses.mse_loss(f, warped)
        if similarity == "ncc":
            return losses.ncc_loss(f, warped)
        return 1.0 - losses.global_ncc(f, warped)

    def loss() -> torch.Tensor:
        if resample == "warp":
            u = spatial.affine_displacement(eye.expand_as(delta) + delta * scale, small)   # (B, N, *small)
            return dissimilarity(spatial.warp(m, u)) + smoothness * losses.gradient_loss(u)
        grid = F.affine_grid(eye + delta, list(m.shape), align_corners=False)   # theta = I + delta
        return dissimilarity(F.grid_sample(m, grid, align_corners=False))

    # 3. Adam down the dissimilarity
    optimizer = torch.optim.Adam([delta], lr=lr)
    with torch.enable_grad():
        for _ in range(step_cap(steps)):                               # fewer in a dry run
            value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()

    # 4. the map on the full grid, in its three forms
    with torch.no_grad():
        if resample == "warp":
            matrix = eye.expand_as(delta) + delta * scale                     # voxels of the shrunk grid
            if shrink > 1:
                matrix = torch.cat([matrix[:, :, :n], matrix[:, :, n:] * shrink], dim=2)
            theta = matrix_to_theta(matrix, shape)
        else:
            theta = (eye + delta).detach()
            matrix = theta_to_matrix(theta, shape)
        return AffineFit(matrix, spatial.affine_displacement(matrix, shape), theta)
