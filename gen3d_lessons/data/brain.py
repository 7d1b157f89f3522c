"""A synthetic brain cohort grown from the ICBM 2009a template (MNI152) shipped inside nilearn.

Every subject is the same recipe with its own random numbers:

1. **template**: grey matter (GM), white matter (WM) and brain-mask maps of the template, cropped to
   the brain and resampled onto a cube of ``size``³ isotropic voxels; CSF = clip(mask − GM − WM, 0, 1);
2. **ageing** (template space): GM near CSF turns into CSF, and the ventricles grow along a smooth
   flow; both get stronger with ``age``, so at a fixed seed CSF volume rises and GM volume falls;
3. **lesions** (optional): 1–3 irregular white-matter blobs (thresholded smooth noise in a sphere);
4. **anatomy of this subject**: a random diffeomorphism (stationary velocity field integrated by
   scaling and squaring) after a small affine; everything is pulled through it in one resampling;
5. **contrasts**: T1, T2, FLAIR, PD from per-tissue intensities, a per-``site`` gamma, a smooth
   multiplicative bias field and Rician noise; plus a "low-dose" copy (blurred, noisier).

Labels: 0 background, 1 CSF, 2 GM, 3 WM, 4 lesion. Arrays are (X, Y, Z[, C]) in RAS voxel order,
torch tensors (B, C, D, H, W) with D = X, H = Y, W = Z.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import spatial
from . import subject_seed
from .errors import DataError
from .workers import in_workers
from .msd import Case, write_msd_dataset

BRAIN_CHANNELS = ("T1", "T2", "FLAIR", "PD")
BRAIN_LABELS = ("background", "CSF", "GM", "WM", "lesion")   # label value = index
TISSUES = ("CSF", "GM", "WM", "lesion")                     # columns of the intensity table


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteStyle:
    """How one scanner site renders the same anatomy."""

    gamma: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # per channel, on [0, 1] signal
    noise: float = 0.02          # Rician noise std, as a fraction of the brightest tissue
    bias: float = 0.10           # std of the log bias field (0.1 ≈ ±10 % intensity drift)


DEFAULT_SITES = (
    SiteStyle(gamma=(1.00, 1.00, 1.00, 1.00), noise=0.020, bias=0.08),
    SiteStyle(gamma=(0.80, 1.15, 0.90, 1.00), noise=0.035, bias=0.12),
    SiteStyle(gamma=(1.25, 0.90, 1.15, 1.10), noise=0.028, bias=0.16),
)

# Mean intensity of each tissue (CSF, GM, WM, lesion) in each channel, before gamma, bias and noise.
DEFAULT_INTENSITIES = {
    "T1":    (0.12, 0.55, 0.85, 0.66),   # WM > GM > CSF; lesions a little darker than WM
    "T2":    (1.00, 0.62, 0.42, 0.88),   # CSF > GM > WM; lesions bright
    "FLAIR": (0.08, 0.74, 0.46, 1.00),   # T2 with the CSF signal nulled: GM > WM; lesions brightest
    "PD":    (1.00, 0.84, 0.70, 0.90),   # CSF > GM > WM, closer together than in T2
}


@dataclass(frozen=True)
class BrainConfig:
    """Everything that shapes the cohort. Lengths are in mm so a subject looks alike at every ``size``."""

    size: int = 64                                   # edge of the cubic grid (voxels)
    margin_mm: float = 6.0                           # empty border around the brain's bounding box
    # population
    age_range: tuple[float, float] = (20.0, 90.0)    # ages are drawn uniformly in this range
    lesion_probability: float = 0.3                  # chance that a subject has lesions
    sites: tuple[SiteStyle, ...] = DEFAULT_SITES     # site drawn uniformly among these
    # ageing: strength a(age) = clip((age - start) / (full - start), 0, 1.5) ** power
    atrophy_start_age: float = 20.0
    atrophy_full_age: float = 90.0
    atrophy_power: float = 1.5
    gm_loss: float = 0.40                            # fraction of GM next to CSF that is CSF at a = 1
    ventricle_growth_mm: float = 5.0                 # flow speed (mm per unit time) at a = 1
    # anatomy: a stationary velocity field (std, smoothness) after a small affine
    velocity_std_mm: float = 3.0
    velocity_sigma_mm: float = 24.0
    integration_steps: int = 7
    max_rotation_deg: float = 6.0
    max_scale: float = 0.06
    max_shear: float = 0.03
    max_translation_mm: float = 4.0
    # lesions
    lesion_count: tuple[int, int] = (1, 3)           # inclusive range
    lesion_radius_mm: tuple[float, float] = (4.0, 9.0)
    # image formation
    intensities: dict = field(default_factory=lambda: dict(DEFAULT_INTENSITIES))
    intensity_jitter: float = 0.03                   # per subject, relative, per tissue and channel
    bias_sigma_mm: float = 50.0                      # smoothness of the bias field
    lowdose_blur_vox: float = 1.0                    # the low-dose copy: Gaussian blur (voxels) ...
    lowdose_noise_factor: float = 3.0                # ... and this many times the site's noise

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 16:
            raise ValueError(f"BrainConfig.size: expected an integer >= 16, got {self.size!r}")
        lo, hi = self.age_range
        if not lo < hi:
            raise ValueError(f"BrainConfig.age_range: expected (low, high) with low < high, got {self.age_range}")
        if not 0.0 <= self.lesion_probability <= 1.0:
            raise ValueError(f"BrainConfig.lesion_probability: expected a value in [0, 1], "
                             f"got {self.lesion_probability}")
        if len(self.sites) == 0:
            raise ValueError("BrainConfig.sites: expected at least one SiteStyle")
        for i, site in enumerate(self.sites):
            if len(site.gamma) != len(BRAIN_CHANNELS) or min(site.gamma) <= 0 or site.noise < 0 or site.bias < 0:
                raise ValueError(f"BrainConfig.sites[{i}]: expected {len(BRAIN_CHANNELS)} positive gammas and "
                                 f"non-negative noise and bias, got {site}")
        if tuple(self.intensities) != BRAIN_CHANNELS or any(len(v) != len(TISSUES) for v in self.intensities.values()):
            raise ValueError(f"BrainConfig.intensities: expected keys {BRAIN_CHANNELS} with {len(TISSUES)} values "
                             f"each ({', '.join(TISSUES)}), got {self.intensities}")
        if not 1 <= self.lesion_count[0] <= self.lesion_count[1]:
            raise ValueError(f"BrainConfig.lesion_count: expected (min, max) with 1 <= min <= max, "
                             f"got {self.lesion_count}")
        if not self.atrophy_start_age < self.atrophy_full_age:
            raise ValueError("BrainConfig.atrophy_start_age must be below atrophy_full_age")


def atrophy_strength(age: float, cfg: BrainConfig) -> float:
    """a(age): 0 for a young adult (the template's age), 1 at ``atrophy_full_age``, rising ever faster."""
    t = (age - cfg.atrophy_start_age) / (cfg.atrophy_full_age - cfg.atrophy_start_age)
    return float(np.clip(t, 0.0, 1.5) ** cfg.atrophy_power)


# ----------------------------------------------------------------------------------------------
# 1. The template, loaded once per process and resampled once per size
# ----------------------------------------------------------------------------------------------

def _bin2(volume: np.ndarray) -> np.ndarray:
    """Average 2x2x2 blocks (zero-padding odd sides): 1 mm -> 2 mm with proper partial-volume averaging."""
    padded = np.pad(volume, [(0, s % 2) for s in volume.shape])
    x, y, z = (s // 2 for s in padded.shape)
    return padded.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _mni_tissues() -> dict[str, np.ndarray]:
    """CSF/GM/WM/mask probabilities and a ventricle map of the MNI152 2009a template at 2 mm, float32.

    Runs once per process. nilearn's ``resolution=2`` loaders spend ~1 s each on a cubic-spline
    resampling, so we load the 1 mm maps (~0.15 s each) and average 2x2x2 blocks ourselves.
    """
    from nilearn import datasets  # imported here: nilearn is slow to import and only needed once
    from scipy import ndimage

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = np.asarray(mask_img.get_fdata(dtype=np.float32))
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)) * mask
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    csf, gm, wm, mask = (_bin2(v) for v in (csf, gm, wm, mask))
    # voxel i of the 2 mm grid is the centre of 1 mm voxels 2i and 2i + 1
    affine = np.asarray(mask_img.affine, dtype=np.float64) @ np.array(
        [[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1]], dtype=np.float64)
    # The ventricles: deep CSF (> 12 mm inside the brain), thin sheets such as the midline fissure
    # removed by an opening, then the two largest pieces: the lateral ventricles, and the third
    # ventricle with the cistern behind it.
    depth_mm = ndimage.distance_transform_edt(mask > 0.5) * 2.0
    deep_csf = ndimage.binary_opening((csf > 0.5) & (depth_mm > 12.0), ndimage.generate_binary_structure(3, 1))
    pieces, n_pieces = ndimage.label(deep_csf)
    sizes = ndimage.sum(deep_csf, pieces, index=np.arange(1, n_pieces + 1))
    keep = 1 + np.argsort(sizes)[::-1][:2]
    ventricles = np.isin(pieces, keep).astype(np.float32)
    return {"csf": csf, "gm": gm, "wm": wm, "mask": mask, "ventricles": ventricles, "affine": affine}


@dataclass(frozen=True)
class _TemplateGrid:
    """The template on a ``size``³ grid, as torch tensors. Shared between subjects: never edit in place."""

    affine: np.ndarray            # (4, 4) voxel -> RAS mm (MNI coordinates)
    spacing: float                # mm, isotropic
    tissues: torch.Tensor         # (1, 4, D, H, W): CSF, GM, WM, brain mask
    ventricle_flow: torch.Tensor  # (1, 3, d, h, w): ∇ of the smoothed ventricle map (max norm 1 voxel of
                                  # the full grid) on the coarse grid where velocity fields are integrated
    near_outside: torch.Tensor    # (1, 1, D, H, W): in [0, 1], how close a voxel is to CSF / outside
    lesion_sites: np.ndarray      # flat indices of deep white matter where a lesion may be centred


def _coarse_size(size: int) -> int:
    """Velocity fields are smooth, so they are integrated on a grid of half the size (8x fewer voxels)."""
    return max(size // 2, 8)


@functools.lru_cache(maxsize=8)
def _template_grid(size: int, margin_mm: float) -> _TemplateGrid:
    from scipy import ndimage

    mni = _mni_tissues()
    a_mni = mni["affine"]
    native_mm = float(abs(a_mni[0, 0]))
    # 1. bounding box of the brain in mm, plus the margin; the longest side sets the spacing
    ijk = np.argwhere(mni["mask"] > 0.5)
    lo_mm = (a_mni @ np.append(ijk.min(0), 1.0))[:3] - margin_mm
    hi_mm = (a_mni @ np.append(ijk.max(0), 1.0))[:3] + margin_mm
    spacing = float((hi_mm - lo_mm).max() / (size - 1))
    centre_mm = (lo_mm + hi_mm) / 2
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre_mm - spacing * (size - 1) / 2
    # 2. our voxel -> template voxel is a scaling and a shift (both grids are axis-aligned RAS)
    to_native = np.linalg.inv(a_mni) @ affine
    # 3. blur before shrinking so that thin sheets are averaged, not aliased (skimage's (r - 1) / 2)
    ratio = spacing / native_mm
    sigma = max(0.0, (ratio - 1.0) / 2.0)
    maps = []
    for key in ("csf", "gm", "wm", "mask", "ventricles"):
        vol = mni[key] if key != "ventricles" else ndimage.gaussian_filter(mni[key], 6.0 / native_mm)
        vol = ndimage.gaussian_filter(vol, sigma) if sigma > 0 else vol
        maps.append(ndimage.affine_transform(vol, np.diag(to_native)[:3], offset=to_native[:3, 3],
                                             output_shape=(size,) * 3, order=1, mode="constant", cval=0.0))
    maps = torch.from_numpy(np.stack(maps).astype(np.float32))[None]     # (1, 5, D, H, W)
    tissues, ventricle_map = maps[:, :4], maps[:, 4:]
    # 4. the direction in which the ventricles grow: up the slope of the smoothed ventricle map
    grad = torch.stack(torch.gradient(ventricle_map[0, 0]))[None]       # (1, 3, D, H, W)
    grad = grad / grad.norm(dim=1).max().clamp_min(1e-8)
    grad = spatial.resize_displacement(grad, (_coarse_size(size),) * 3)
    # 5. closeness to CSF or the outside of the brain, where cortical thinning happens
    outside = tissues[:, 0:1] + (1.0 - tissues[:, 3:4])                  # (1, 1, D, H, W)
    near = (2.0 * spatial.gaussian_blur(outside, 3.0 / spacing)).clamp(0.0, 1.0)
    # 6. candidate lesion centres: white matter, well inside the brain
    wm, mask = tissues[0, 2].numpy(), tissues[0, 3].numpy()
    depth_mm = ndimage.distance_transform_edt(mask > 0.5) * spacing
    sites = np.flatnonzero((wm > 0.85) & (depth_mm > 15.0))
    if sites.size == 0:
        sites = np.flatnonzero(wm >= wm.max() * 0.9)
    return _TemplateGrid(affine, spacing, tissues, grad, near, sites)


def _render(probabilities: torch.Tensor, means: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Noise-free contrasts: (1, 4 tissues, *S) probabilities and a (4 channels, 4 tissues) table -> (1, 4, *S).

    Partial-volume mixing (a voxel that is 30 % GM gets 30 % of the GM intensity), then a per-channel
    gamma on the signal scaled to [0, 1] by its brightest tissue: a monotone change of contrast that
    keeps every tissue ordering.
    """
    signal = torch.einsum("ct,bt...->bc...", means, probabilities)      # (1, 4, *S)
    top = means.max(dim=1).values.view(1, -1, *([1] * (signal.ndim - 2)))
    return top * (signal / top).clamp(0.0, 1.0) ** gamma.view(1, -1, *([1] * (signal.ndim - 2)))


def _labels(tissues: torch.Tensor, lesion: torch.Tensor | None) -> torch.Tensor:
    """(1, 4, *S) CSF/GM/WM/mask (+ (1, 1, *S) lesion) -> uint8 labels (*S)."""
    csf, gm, wm = tissues[0, 0], tissues[0, 1], tissues[0, 2]
    # argmax over the three tissues (ties go to the lower label), written out: cheaper than argmax(dim=0)
    label = torch.where((csf >= gm) & (csf >= wm), 1, torch.where(gm >= wm, 2, 3)).to(torch.uint8)
    inside = tissues[0, 3] > 0.5
    label = torch.where(inside, label, torch.zeros_like(label))
    if lesion is not None:
        label = torch.where(inside & (lesion[0, 0] > 0.5), torch.full_like(label, 4), label)
    return label


def brain_template(size: int = 64, *, margin_mm: float = 6.0) -> dict[str, Any]:
    """The template itself at ``size``³, for atlas-based baselines.

    Returns image (X, Y, Z, 4) float32 (site-0 contrasts, no bias, no noise), label (X, Y, Z) uint8,
    affine (4, 4) and probabilities (X, Y, Z, 4): background, CSF, GM, WM (channel k ↔ label k).
    """
    cfg = BrainConfig(size=size, margin_mm=margin_mm)
    grid = _template_grid(cfg.size, float(margin_mm))
    tissues = grid.tissues
    means = torch.tensor([cfg.intensities[c] for c in BRAIN_CHANNELS])[:, :3]    # (4, 3), no lesions
    image = _render(tissues[:, :3], means, torch.tensor(cfg.sites[0].gamma))
    image = image / means.max()
    probabilities = torch.cat([1.0 - tissues[:, 3:4], tissues[:, :3]], dim=1).clamp(0.0, 1.0)
    return {
        "image": image[0].permute(1, 2, 3, 0).numpy().astype(np.float32),
        "label": _labels(tissues, None).numpy(),
        "affine": grid.affine.copy(),
        "probabilities": probabilities[0].permute(1, 2, 3, 0).numpy().astype(np.float32),
    }


# ----------------------------------------------------------------------------------------------
# 2.-5. One subject
# ----------------------------------------------------------------------------------------------

def _torch_generator(seq: np.random.SeedSequence) -> torch.Generator:
    return torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def _age_template(grid: _TemplateGrid, a: float, cfg: BrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: the template at atrophy strength ``a``: (tissues (1, 4, *S), ventricle displacement (1, 3, *S)).

    * cortical thinning: a share ``gm_loss * a * near_outside`` of GM becomes CSF (pointwise, so GM can
      only shrink and CSF only grow as ``a`` rises);
    * ventricle growth: the flow of ``v = speed * ∇f`` (f: smoothed ventricle map) for unit time.
      Pulling the image back through it samples from higher up f, so every level set of f, and the
      ventricles with it, swells; a flow's level sets nest as time grows, so the growth is monotone.
    """
    csf, gm, wm, mask = grid.tissues.unbind(dim=1)
    moved = cfg.gm_loss * a * grid.near_outside[:, 0] * gm
    tissues = torch.stack([csf + moved, gm - moved, wm, mask], dim=1)
    speed_vox = cfg.ventricle_growth_mm * a / grid.spacing
    u_ventricles = spatial.integrate_velocity(speed_vox * grid.ventricle_flow, steps=5)  # coarse grid
    return tissues, spatial.resize_displacement(u_ventricles, tissues.shape[2:])


def _lesions(grid: _TemplateGrid, wm: torch.Tensor, rng: np.random.Generator,
             gen: torch.Generator, cfg: BrainConfig) -> tuple[torch.Tensor, int]:
    """Step 3: lesion probability (1, 1, *S) in template space: 1-3 blobs of thresholded noise in spheres."""
    shape = wm.shape[2:]
    n_lesions = int(rng.integers(cfg.lesion_count[0], cfg.lesion_count[1] + 1))
    centres = np.stack(np.unravel_index(rng.choice(grid.lesion_sites, size=n_lesions), shape), axis=1)
    radii_vox = np.maximum(rng.uniform(*cfg.lesion_radius_mm, size=n_lesions) / grid.spacing, 1.5)
    # one smooth noise field, clamped so that the centre of every sphere is always lesion
    noise = spatial.smooth_random_field((1, 1, *shape), sigma_vox=max(radii_vox.mean() / 2, 0.7),
                                        generator=gen).clamp(-1.5, 1.5)
    x = spatial.identity_grid(shape)                                    # (1, 3, *S)
    lesion = torch.zeros(1, 1, *shape)
    for centre, r in zip(centres, radii_vox):
        d2 = ((x - torch.tensor(centre, dtype=torch.float32).view(1, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True)
        # 1 - (d/r)^2 is a dome, the noise makes its edge irregular, the sigmoid makes it a soft blob
        blob = torch.sigmoid((1.0 - d2 / r ** 2 + 0.35 * noise - 0.35) / 0.08)
        lesion = torch.maximum(lesion, blob)
    return lesion * wm, n_lesions                                       # lesions replace white matter only


def _anatomy(grid: _TemplateGrid, gen: torch.Generator, cfg: BrainConfig) -> torch.Tensor:
    """Step 4: this subject's map to template space, a displacement (1, 3, *S) in voxels.

    The velocity field is drawn and integrated on the coarse grid, then brought back up.
    """
    size = cfg.size
    coarse = _coarse_size(size)
    coarse_spacing = grid.spacing * (size - 1) / (coarse - 1)
    v = spatial.smooth_random_field((1, 3, coarse, coarse, coarse), cfg.velocity_sigma_mm / coarse_spacing,
                                    cfg.velocity_std_mm / coarse_spacing, gen)
    u_svf = spatial.resize_displacement(spatial.integrate_velocity(v, cfg.integration_steps), (size,) * 3)
    matrix = spatial.random_affine(1, 3, max_rotation_deg=cfg.max_rotation_deg, max_scale=cfg.max_scale,
                                   max_shear=cfg.max_shear, max_translation=cfg.max_translation_mm / grid.spacing,
                                   generator=gen)
    u_affine = spatial.affine_displacement(matrix, (size,) * 3)
    return spatial.compose(u_affine, u_svf)                             # x -> A(phi_svf(x))


@contextlib.contextmanager
def _one_torch_thread():
    """Run torch on a single thread inside the block, then restore the previous setting.

    Why: every tensor here is small (at most 5 x 64³), so splitting each operation over threads gains
    little, while on a busy machine (CI, shared cores) the threads spin waiting for one another. We
    measured 0.04 s per 32³ subject on one thread against 0.2-0.75 s on two cores under load.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rician(signal: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """|signal + complex Gaussian noise|: the magnitude image an MR scanner returns (Rician statistics)."""
    real = signal + sigma * torch.randn(signal.shape, generator=gen)
    imag = sigma * torch.randn(signal.shape, generator=gen)
    return torch.sqrt(real ** 2 + imag ** 2)


def make_brain_subject(seed: int, cfg: BrainConfig | None = None, *, age: float | None = None,
                       has_lesion: bool | None = None, site: int | None = None) -> dict[str, Any]:
    """One synthetic subject; the same ``seed`` (and overrides) always gives the same arrays.

    ``age``, ``has_lesion`` and ``site`` override the values drawn from the seed; every random stream
    (anatomy, lesions, image noise) is separate, so changing ``age`` alone keeps the same anatomy.

    Returns image (X, Y, Z, 4) float32 in [0, 1] (channels ``BRAIN_CHANNELS``), lowdose (same),
    label (X, Y, Z) uint8 (``BRAIN_LABELS``), affine (4, 4), displacement (3, X, Y, Z) float32
    (voxels: subject voxel x sits at template voxel x + u(x)), probabilities (X, Y, Z, 5) float32
    (channel k = label k: the partial-volume fractions the image was rendered from) and attributes
    (a dict of scalars: age, site, has_lesion, n_lesions, lesion_ml, csf_ml, gm_ml, wm_ml, seed).
    """
    cfg = cfg or BrainConfig()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    streams = np.random.SeedSequence(int(seed)).spawn(4)  # attributes, anatomy, lesions, image noise
    rng = np.random.default_rng(streams[0])
    # 0. attributes: always drawn, then overridden, so an override does not shift the other draws
    drawn_age = float(rng.uniform(*cfg.age_range))
    drawn_lesion = bool(rng.random() < cfg.lesion_probability)
    drawn_site = int(rng.integers(len(cfg.sites)))
    age = drawn_age if age is None else age
    if not isinstance(age, (int, float, np.number)) or not math.isfinite(age) or not 0 <= age <= 130:
        raise ValueError(f"age: expected a number of years in [0, 130], got {age!r}")
    has_lesion = drawn_lesion if has_lesion is None else has_lesion
    if not isinstance(has_lesion, (bool, np.bool_)):
        raise ValueError(f"has_lesion: expected True or False, got {has_lesion!r}")
    site = drawn_site if site is None else site
    if not isinstance(site, (int, np.integer)) or not 0 <= site < len(cfg.sites):
        raise ValueError(f"site: expected an integer in [0, {len(cfg.sites) - 1}], got {site!r}")
    style = cfg.sites[site]

    grid = _template_grid(cfg.size, float(cfg.margin_mm))
    with torch.no_grad(), _one_torch_thread():
        # 2. ageing, in template space
        tissues, u_ventricles = _age_template(grid, atrophy_strength(age, cfg), cfg)
        # 3. lesions, in template space (drawn even without lesions, to keep the streams aligned)
        lesion, n_lesions = _lesions(grid, tissues[:, 2:3], np.random.default_rng(streams[2]),
                                     _torch_generator(streams[2]), cfg)
        if not has_lesion:
            lesion, n_lesions = torch.zeros_like(lesion), 0
        # 4. this subject's anatomy, composed with the ventricle flow: one resampling of all maps
        u_subject = _anatomy(grid, _torch_generator(streams[1]), cfg)
        u = spatial.compose(u_ventricles, u_subject)                    # x -> phi_vent(phi_subject(x))
        wm_left = tissues[:, 2:3] - lesion
        maps = torch.cat([tissues[:, :2], wm_left, lesion, tissues[:, 3:4]], dim=1)  # CSF GM WM lesion mask
        maps = spatial.warp(maps, u).clamp(0.0, 1.0)                    # (1, 5, D, H, W)
        probabilities, mask = maps[:, :4], maps[:, 4:5]                  # (1, 4, *S): CSF GM WM lesion
        label = _labels(torch.cat([maps[:, :3], mask], dim=1), maps[:, 3:4] if has_lesion else None)
        if has_lesion and not (label == 4).any():
            # a very small lesion can fall between voxels after resampling: keep its most likely voxel
            label.view(-1)[maps[0, 3].argmax()] = 4
        # 5. contrasts: jittered tissue means, site gamma, bias field, Rician noise, normalisation
        noise_gen = _torch_generator(streams[3])
        means = torch.tensor([cfg.intensities[c] for c in BRAIN_CHANNELS])               # (4, 4)
        means = means * (1 + cfg.intensity_jitter * (2 * torch.rand(means.shape, generator=noise_gen) - 1))
        clean = _render(probabilities, means, torch.tensor(style.gamma))                 # (1, 4, *S)
        # one bias field for all channels: it comes from the receive coil, shared by the sequences
        bias = torch.exp(spatial.smooth_random_field((1, 1, *clean.shape[2:]), cfg.bias_sigma_mm / grid.spacing,
                                                     style.bias, noise_gen))
        clean = clean * bias
        top = float(means.max())
        image = _rician(clean, style.noise * top, noise_gen)
        lowdose = _rician(spatial.gaussian_blur(clean, cfg.lowdose_blur_vox),
                          style.noise * cfg.lowdose_noise_factor * top, noise_gen)
        # scale each channel so its bright end of the brain (99.5th percentile) is 1
        inside = mask[0, 0] > 0.5
        scale = torch.quantile(image[0][:, inside], 0.995, dim=1)                        # (4,)
        scale = scale.view(1, -1, 1, 1, 1).clamp_min(1e-6)
        image = (image / scale).clamp(0.0, 1.0)
        lowdose = (lowdose / scale).clamp(0.0, 1.0)

    voxel_ml = grid.spacing ** 3 / 1000.0
    counts = torch.bincount(label.view(-1).long(), minlength=5).tolist()
    attributes = {
        "age": round(float(age), 1), "site": int(site), "has_lesion": bool(has_lesion),
        "n_lesions": int(n_lesions), "lesion_ml": round(counts[4] * voxel_ml, 3),
        "csf_ml": round(counts[1] * voxel_ml, 2), "gm_ml": round(counts[2] * voxel_ml, 2),
        "wm_ml": round(counts[3] * voxel_ml, 2), "seed": int(seed),
    }
    # channel k of the probabilities is label k: background, CSF, GM, WM, lesion
    probabilities = torch.cat([(1.0 - probabilities.sum(1, keepdim=True)).clamp(0.0, 1.0), probabilities], 1)
    return {
        "image": image[0].permute(1, 2, 3, 0).numpy().astype(np.float32),        # (X, Y, Z, 4)
        "lowdose": lowdose[0].permute(1, 2, 3, 0).numpy().astype(np.float32),    # (X, Y, Z, 4)
        "label": label.numpy().astype(np.uint8),                                # (X, Y, Z)
        "affine": grid.affine.copy(),
        "displacement": u[0].numpy().astype(np.float32),                        # (3, X, Y, Z)
        "probabilities": probabilities[0].permute(1, 2, 3, 0).numpy(),          # (X, Y, Z, 5)
        "attributes": attributes,
    }


# ----------------------------------------------------------------------------------------------
# A whole dataset in the MSD layout
# ----------------------------------------------------------------------------------------------

def make_brain_dataset(out: str | Path, *, n: int = 64, size: int = 64, seed: int = 0,
                       test_fraction: float = 0.2, lesion_fraction: float = 0.3,
                       cfg: BrainConfig | None = None, progress: bool = True) -> Path:
    """Generate ``n`` subjects and write them under ``out`` (MSD layout, see ``msd.py``); returns ``out``.

    Subject i uses ``subject_seed(seed, i)``, so it is the same subject whatever ``n``.
    ``size`` and ``lesion_fraction`` override those fields of ``cfg``. A seeded shuffle picks
    round(n * test_fraction) subjects for the test split.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive number of subjects, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size: expected an integer edge length >= 16 voxels, got {size!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in [0, 1), got {test_fraction!r}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction: expected a value in [0, 1], got {lesion_fraction!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file; expected a folder (or nothing) to write the dataset into")
    cfg = replace(cfg or BrainConfig(), size=size, lesion_probability=lesion_fraction)
    n_test = int(round(n * test_fraction))
    test_ids = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())

    def cases() -> Iterator[Case]:
        jobs = [(subject_seed(seed, i), cfg, {}) for i in range(n)]
        made = in_workers(_dataset_member, jobs, work=_work(cfg), desc=f"brains {size}^3", progress=progress)
        for i, s in enumerate(made):
            yield Case(id=f"brain_{i:03d}", split="test" if i in test_ids else "train", image=s["image"],
                       affine=s["affine"], label=s["label"], extra_images={"lowdose": s["lowdose"]},
                       attributes=s["attributes"])

    spacing = float(_template_grid(cfg.size, float(cfg.margin_mm)).spacing)
    return write_msd_dataset(
        out, cases(), name="gen3d-brain",
        description=("Synthetic brains grown from the ICBM 2009a (MNI152) template: random diffeomorphic "
                     "anatomy, age-driven atrophy, optional white-matter lesions, 4 MR contrasts from "
                     "3 sites, and a low-dose (blurred, noisier) copy of every image."),
        modality={str(i): c for i, c in enumerate(BRAIN_CHANNELS)},
        labels={str(i): name for i, name in enumerate(BRAIN_LABELS)},
        extra={"spacing_mm": [spacing] * 3, "seed": int(seed), "size": int(size),
               "config": _jsonable(asdict(cfg))},
    )


def _jsonable(x: Any) -> Any:
    """Tuples to lists, recursively, so the config reads naturally in dataset.json."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def ventricle_volume_ml(label: Any, spacing: Any, csf: int = 1, depth_mm: float = 12.0) -> float:
    """Volume (ml) of the CSF deep inside the brain: the ventricles, without the CSF of the sulci.

    ``label`` is a 3D label map (0 outside the brain, ``csf`` for cerebrospinal fluid), ``spacing``
    its voxel size in mm. A CSF voxel counts if it lies more than ``depth_mm`` from the outside of
    the brain (Euclidean distance transform of the mask ``label > 0``).
    """
    from scipy import ndimage

    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if lab.ndim != 3:
        raise ValueError(f"label: expected a 3D label map (X, Y, Z), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and not (np.isfinite(lab).all() and (lab == np.round(lab)).all()):
        raise ValueError("label: expected integer labels, got fractional or non-finite values")
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing: expected three positive voxel sizes in mm, got {spacing!r}")
    depth = ndimage.distance_transform_edt(lab > 0, sampling=sp)               # mm to the outside
    return float(((lab == csf) & (depth > depth_mm)).sum() * np.prod(sp) / 1000.0)


# ----------------------------------------------------------------------------------------------
# More subjects of a dataset's population, in memory (the yardstick encoder's training cohort)
# ----------------------------------------------------------------------------------------------

def brain_config_of(folder: str | Path) -> BrainConfig:
    """The :class:`BrainConfig` a brain dataset was generated with, read from its ``dataset.json``."""
    import json

    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DataError(path, "not found; expected a brain dataset folder made by `gen3d data brain`")
    saved = json.loads(path.read_text()).get("config")
    if not isinstance(saved, dict):
        raise DataError(path, "has no generator 'config'; only datasets made by gen3d can be extended")
    tupled = lambda v: tuple(v) if isinstance(v, list) else v                                   # noqa: E731
    try:
        sites = tuple(SiteStyle(**{k: tupled(v) for k, v in s.items()}) for s in saved["sites"])
        return BrainConfig(**{k: tupled(v) for k, v in saved.items() if k not in ("sites", "intensities")},
                           sites=sites, intensities={k: tuple(v) for k, v in saved["intensities"].items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"its generator config does not describe a brain cohort ({exc})") from None


def brain_cohort(cfg: BrainConfig, seeds: Any, *, channels: tuple[int, ...] = (0,), size: int | None = None,
                 overrides: Any = None, desc: str = "cohort") -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Subjects ``make_brain_subject(seed, cfg, **override)`` for each seed, as the dataset reader serves them.

    ``overrides``: one dict per seed (``age``, ``has_lesion``, ``site``), or None: the same
    anatomy made older, without lesions or at another site.

    Returns images (N, len(channels), size, size, size) float32, resampled from ``cfg.size``
    trilinearly exactly as :class:`~gen3d_lessons.data.datasets.VolumeDataset` resamples, and
    one attribute dict per subject (:func:`make_brain_subject`'s, plus ``ventricle_ml``). About
    0.2-0.4 s per subject at 64³ on one core, made on every core (:func:`~gen3d_lessons.data.workers.in_workers`).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one subject seed")
    size = cfg.size if size is None else int(size)
    overrides = [{}] * len(seeds) if overrides is None else list(overrides)
    if len(overrides) != len(seeds):
        raise ValueError(f"overrides: expected one dict per seed ({len(seeds)}), got {len(overrides)}")
    jobs = [(seed, cfg, dict(override), tuple(channels), size) for seed, override in zip(seeds, overrides)]
    made = list(in_workers(_cohort_member, jobs, work=_work(cfg), desc=desc))
    return torch.stack([x for x, _ in made]), [a for _, a in made]


def _cohort_member(job: tuple) -> tuple[torch.Tensor, dict[str, Any]]:
    """One subject of :func:`brain_cohort`: its chosen channels at ``size``³ (C, size, size, size) and
    its attributes with ``ventricle_ml``; small enough to send back from a worker process."""
    import torch.nn.functional as F

    seed, cfg, override, channels, size = job
    s = make_brain_subject(seed, cfg, **override)
    x = torch.from_numpy(np.ascontiguousarray(s["image"][..., list(channels)])).permute(3, 0, 1, 2)
    if tuple(x.shape[1:]) != (size,) * 3:
        with _one_torch_thread():
            x = F.interpolate(x[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    spacing = np.abs(np.diag(s["affine"]))[:3]
    return x.contiguous(), {**s["attributes"], "ventricle_ml": round(ventricle_volume_ml(s["label"], spacing), 2)}


def _work(cfg: BrainConfig) -> float:
    """A subject's cost relative to one at 64³ (:func:`~gen3d_lessons.data.workers.in_workers`)."""
    return (cfg.size / 64) ** 3


def _dataset_member(job: tuple) -> dict[str, Any]:
    """One subject of :func:`make_brain_dataset`: what the dataset writes of it."""
    seed, cfg, override = job
    s = make_brain_subject(seed, cfg, **override)
    return {key: s[key] for key in ("image", "lowdose", "label", "affine", "attributes")}
