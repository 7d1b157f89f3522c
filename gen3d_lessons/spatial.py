"""Spatial transforms on voxel grids: warping, diffeomorphic integration, Jacobians, random fields.

Conventions used everywhere in this module (and by the registration chapter):

* an image is ``(B, C, *S)`` with ``S = (D, H, W)`` in 3D (``(H, W)`` in 2D works too);
* a displacement field ``u`` is ``(B, N, *S)`` with ``N = len(S)`` channels, **in voxel units**,
  channel ``i`` moving along spatial axis ``i`` (channel 0 along D, 1 along H, 2 along W);
* it defines the map ``phi(x) = x + u(x)``, and warping *pulls* values back through it:
  ``warp(I, u)(x) = I(x + u(x))`` ("backward" warping: every output voxel asks where it comes from,
  so the output has no holes).

Nothing here knows about brains or hearts; it is plain geometry on tensors.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Grids and warping
# ----------------------------------------------------------------------------------------------

def identity_grid(shape: Sequence[int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid: ``(1, N, *shape)``, channel ``i`` holds the index along axis ``i``."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]  # (1, N, *S)


@functools.lru_cache(maxsize=16)
def _normalised_identity(shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """The identity map in grid_sample's coordinates, (1, *S, N), reverse axis order. Cached: read-only."""
    x = identity_grid(shape, device=device, dtype=dtype)                # (1, N, *S) voxels
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=device, dtype=dtype)
    return (x * scale.view(1, len(shape), *([1] * len(shape))) - 1.0).flip(1).movedim(1, -1).contiguous()


def _check_field(displacement: torch.Tensor, name: str = "displacement") -> int:
    """Number of spatial dimensions N of a ``(B, N, *S)`` field, with a clear error if it is not one."""
    if displacement.ndim < 3 or displacement.shape[1] != displacement.ndim - 2:
        raise ValueError(f"{name}: expected shape (B, N, *S) with N = number of spatial dims "
                         f"(e.g. (B, 3, D, H, W)), got {tuple(displacement.shape)}")
    return displacement.shape[1]


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``image`` (B, C, *S) at ``x + displacement(x)``; ``displacement`` is (B, N, *S) in voxels.

    ``mode="bilinear"`` interpolates (trilinear in 3D; torch calls it bilinear), ``"nearest"`` keeps
    label values intact. ``padding_mode`` says what lies outside the grid ("zeros", "border").
    """
    n = _check_field(displacement)
    if image.ndim != n + 2 or tuple(image.shape[2:]) != tuple(displacement.shape[2:]):
        raise ValueError(f"image: expected shape (B, C, {', '.join(map(str, displacement.shape[2:]))}) "
                         f"to match displacement {tuple(displacement.shape)}, got {tuple(image.shape)}")
    if image.shape[0] != displacement.shape[0] and displacement.shape[0] != 1:
        raise ValueError(f"image batch {image.shape[0]} and displacement batch {displacement.shape[0]} differ")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode: expected 'bilinear' or 'nearest', got {mode!r}")
    shape = tuple(image.shape[2:])
    # grid_sample reads positions in [-1, 1]. With align_corners=True, -1 is the centre of the first voxel
    # and +1 the centre of the last, so voxel position p maps to 2 p / (s - 1) - 1 along an axis of size s
    # (max(s - 1, 1) keeps a size-1 axis from dividing by zero). The identity part of that is cached;
    # here the displacement is scaled the same way and added to it.
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=image.device, dtype=displacement.dtype)
    # grid_sample also wants the coordinates last, in reverse axis order (x = W, y = H, z = D): flip.
    offset = (displacement * scale.view(1, n, *([1] * n))).flip(1).movedim(1, -1)   # (B, *S, N)
    grid = _normalised_identity(shape, image.device, displacement.dtype) + offset    # (B, *S, N)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=True)


def compose(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_a ∘ phi_b``: ``x -> phi_a(phi_b(x))``, both (B, N, *S) in voxels.

    Matches warping twice: ``warp(I, compose(u_a, u_b)) ≈ warp(warp(I, u_a), u_b)``, i.e. first pull
    through ``phi_b``, then through ``phi_a``. (``u_b(x) + u_a(x + u_b(x))``.)
    """
    _check_field(u_a, "u_a")
    _check_field(u_b, "u_b")
    # "border" padding: a displacement near the edge of the grid is best guessed by the edge value,
    # not by zero (which would snap points back to the identity).
    return u_b + warp(u_a, u_b, padding_mode="border")


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(v)`` for a stationary velocity field ``v``.

    ``v`` is (B, N, *S) in voxels. We start from the tiny displacement ``v / 2**steps`` (close enough to
    the flow over that short time to be invertible) and compose it with itself ``steps`` times:
    ``phi_{1/2^(k-1)} = phi_{1/2^k} ∘ phi_{1/2^k}``. Each composition of two diffeomorphisms is again
    one, so the result does not fold as long as the first step is small relative to the grid
    (Arsigny et al. 2006; Ashburner 2007; used in VoxelMorph-diff, Dalca et al. 2019).
    """
    _check_field(v, "v")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    u = v / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) at every voxel, (B, *S), by central finite differences (one-sided at the edges).

    det J > 0 everywhere means the map keeps orientation (no folding); det J < 1 shrinks, > 1 grows.
    """
    n = _check_field(displacement)
    # d u_i / d x_j for every i, j: torch.gradient differentiates all channels along each spatial axis
    grads = torch.gradient(displacement, dim=tuple(range(2, n + 2)))     # N tensors of (B, N, *S)
    du = torch.stack(grads, dim=2)                                      # (B, N_i, N_j, *S)
    jac = du.movedim(1, -1).movedim(1, -1)                              # (B, *S, N_i, N_j)
    jac = jac + torch.eye(n, device=du.device, dtype=du.dtype)
    if n == 3:  # the rule of Sarrus written out: far faster than a batched LU on millions of 3x3s
        (a, b, c), (d, e, f), (g, h, i) = [[jac[..., r, s] for s in range(3)] for r in range(3)]
        return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return torch.linalg.det(jac)                                        # (B, *S)



def folding_fraction(displacement: torch.Tensor) -> torch.Tensor:
    """The share of voxels where the map folds (det J <= 0), per volume: (B,) in [0, 1]."""
    return (jacobian_determinant(displacement) <= 0).flatten(1).float().mean(dim=1)

def deformation_summary(displacement: torch.Tensor, spacing_mm: float, mask: torch.Tensor | None = None) -> dict[str, float]:
    """How large and how uneven a set of deformations is, over the voxels of ``mask`` (*S) if given.

    ``displacement`` (B, 3, *S) in voxels of ``spacing_mm``. Returns ``median_mm`` and ``p95_mm``
    of the displacement length, ``log_jac_std``, the spread of ``log det J`` (how much the maps
    stretch and squeeze, 0 for a rigid shift), and ``folding``, the share of voxels with det J <= 0;
    all pooled over the B fields. Two sets of fields on different grids compare through these.
    """
    _check_field(displacement)
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm: expected a positive voxel size, got {spacing_mm!r}")
    inside = torch.ones(displacement.shape[2:], dtype=torch.bool) if mask is None else mask.bool().cpu()
    if tuple(inside.shape) != tuple(displacement.shape[2:]):
        raise ValueError(f"mask: expected shape {tuple(displacement.shape[2:])}, got {tuple(inside.shape)}")
    length = displacement.norm(dim=1).cpu()[:, inside] * spacing_mm                 # (B, M) mm
    det = jacobian_determinant(displacement).cpu()[:, inside]                         # (B, M)
    return {"median_mm": float(length.median()), "p95_mm": float(torch.quantile(length.flatten(), 0.95)),
            "log_jac_std": float(det.clamp_min(1e-6).log().std()), "folding": float((det <= 0).float().mean())}


# ----------------------------------------------------------------------------------------------
# Smoothing and random fields
# ----------------------------------------------------------------------------------------------

def _gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma_vox: float | Sequence[float]) -> torch.Tensor:
    """Gaussian blur of (B, C, *S) along every spatial axis (separable 1D passes, edges replicated).

    Separable: an N-D Gaussian is the product of 1D Gaussians, so N cheap passes replace one big kernel.
    """
    n = x.ndim - 2
    if n < 1:
        raise ValueError(f"x: expected (B, C, *S) with at least one spatial dim, got {tuple(x.shape)}")
    sigmas = [float(sigma_vox)] * n if isinstance(sigma_vox, (int, float)) else [float(s) for s in sigma_vox]
    if len(sigmas) != n or any(s < 0 for s in sigmas):
        raise ValueError(f"sigma_vox: expected one non-negative value or {n} of them, got {sigma_vox!r}")
    out = x
    for axis, sigma in enumerate(sigmas):
        if sigma == 0:
            continue
        k = _gaussian_kernel1d(sigma, device=x.device, dtype=x.dtype).tolist()
        r = (len(k) - 1) // 2
        d, length = 2 + axis, out.shape[2 + axis]
        # replicate the edge voxels r times on both sides, then sum the 2r + 1 shifted copies with their
        # weights: for kernels of a few taps this beats conv1d on CPU by ~3x and needs no reshaping
        padded = out.index_select(d, torch.arange(-r, length + r, device=x.device).clamp(0, length - 1))
        acc = k[0] * padded.narrow(d, 0, length)
        for j in range(1, len(k)):
            acc.add_(padded.narrow(d, j, length), alpha=k[j])
        out = acc
    return out


def smooth_random_field(shape: Sequence[int], sigma_vox: float, amplitude: float = 1.0,
                        generator: torch.Generator | None = None, *, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """Gaussian-smoothed white noise of ``shape`` = (B, C, *S), each (b, c) scaled to zero mean, std ``amplitude``.

    The smoothing is done in Fourier space: multiplying the spectrum by the Gaussian's transfer function
    ``exp(-2 π² σ² f²)`` costs the same for any ``sigma_vox`` (a spatial kernel of radius 3σ would not).
    The field is periodic across the grid's faces, which is harmless for noise.
    Use it for velocity fields (C = N), bias fields (C = 1), lesion shapes ...
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise ValueError(f"shape: expected (B, C, *S) with positive sizes, got {shape}")
    if not sigma_vox > 0:
        raise ValueError(f"sigma_vox: expected a positive smoothing width in voxels, got {sigma_vox!r}")
    spatial = shape[2:]
    dims = tuple(range(2, len(shape)))
    # 1. white noise (drawn on the CPU generator so a seed gives the same field on every device)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device)
    # 2. low-pass filter: frequencies f (cycles / voxel) of every axis, squared and summed
    f2 = sum(torch.fft.fftfreq(s, device=noise.device).view(*[s if i == a else 1 for i in range(len(spatial))]) ** 2
             for a, s in enumerate(spatial))
    transfer = torch.exp(-2.0 * math.pi ** 2 * sigma_vox ** 2 * f2)
    field = torch.fft.ifftn(torch.fft.fftn(noise, dim=dims) * transfer, dim=dims).real
    # 3. a known size: zero mean, std = amplitude for each (b, c)
    field = field - field.mean(dim=dims, keepdim=True)
    field = field / field.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return (amplitude * field).to(dtype)


# ----------------------------------------------------------------------------------------------
# Affine transforms
# ----------------------------------------------------------------------------------------------

def random_affine(batch: int, ndim: int = 3, *, max_rotation_deg: float = 10.0, max_scale: float = 0.05,
                  max_shear: float = 0.02, max_translation: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Small random affine maps about the grid centre, as matrices (B, N, N+1) in voxel units.

    ``y - c = A (x - c) + t`` with ``A = R · Sh · Sc``: a rotation ``R = exp(K)`` (K skew-symmetric with
    entries up to ``max_rotation_deg``, which works in any dimension), a unit upper-triangular shear
    ``Sh`` (entries up to ``max_shear``) and a scaling ``Sc`` (factors within ``1 ± max_scale``, drawn in
    log space). ``t`` (voxels) is up to ``max_translation`` per axis. det A = det Sc > 0: no reflection.
    """
    if ndim < 1 or batch < 1:
        raise ValueError(f"batch and ndim must be positive, got batch={batch}, ndim={ndim}")
    if not 0 <= max_scale < 1:
        raise ValueError(f"max_scale: expected a value in [0, 1), got {max_scale}")

    def uniform(*size, half_width: float) -> torch.Tensor:               # U(-w, w)
        return (2 * torch.rand(size, generator=generator, dtype=torch.float64) - 1) * half_width

    # 1. rotation: exponential of a skew-symmetric matrix
    k = torch.triu(uniform(batch, ndim, ndim, half_width=math.radians(max_rotation_deg)), diagonal=1)
    rotation = torch.linalg.matrix_exp(k - k.transpose(1, 2))           # (B, N, N)
    # 2. shear and scaling
    shear = torch.eye(ndim, dtype=torch.float64) + torch.triu(uniform(batch, ndim, ndim, half_width=max_shear), 1)
    log_s = uniform(batch, ndim, half_width=math.log1p(max_scale))
    scaling = torch.diag_embed(torch.exp(log_s))
    # 3. matrix and translation side by side: (B, N, N+1)
    a = rotation @ shear @ scaling
    t = uniform(batch, ndim, 1, half_width=max_translation)
    return torch.cat([a, t], dim=2).float()


def affine_displacement(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Turn affine matrices (B, N, N+1) (about the grid centre, voxels) into displacements (B, N, *shape)."""
    n = len(shape)
    if matrix.ndim != 3 or matrix.shape[1:] != (n, n + 1):
        raise ValueError(f"matrix: expected shape (B, {n}, {n + 1}) for a {n}D grid, got {tuple(matrix.shape)}")
    x = identity_grid(shape, device=matrix.device, dtype=matrix.dtype)   # (1, N, *S)
    centre = torch.tensor([(s - 1) / 2 for s in shape], device=matrix.device, dtype=matrix.dtype)
    centre = centre.view(1, n, *([1] * n))
    a, t = matrix[:, :, :n], matrix[:, :, n]
    # y = A (x - c) + c + t, so u = y - x
    y = torch.einsum("bij,bj...->bi...", a, (x - centre).expand(matrix.shape[0], *x.shape[1:]))
    return y + centre + t.view(-1, n, *([1] * n)) - x


def resize_displacement(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a displacement (B, N, *S) onto a grid of ``shape``, rescaling its voxel units to match.

    Smooth fields can be integrated on a coarse grid (8x fewer voxels in 3D at half size) and brought
    back up: the values are lengths in voxels, so they grow by (new - 1) / (old - 1) along each axis,
    the ratio of voxel sizes when both grids span the same extent corner-centre to corner-centre.
    """
    n = _check_field(displacement)
    shape = tuple(int(s) for s in shape)
    if len(shape) != n:
        raise ValueError(f"shape: expected {n} sizes for a {n}D field, got {shape}")
    mode = ("linear", "bilinear", "trilinear")[n - 1]
    resized = F.interpolate(displacement, size=shape, mode=mode, align_corners=True)
    old = displacement.shape[2:]
    factors = torch.tensor([(new - 1) / max(o - 1, 1) for new, o in zip(shape, old)],
                           device=displacement.device, dtype=displacement.dtype)
    return resized * factors.view(1, n, *([1] * n))
