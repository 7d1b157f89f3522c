"""A procedural 3D+t cardiac cine MR phantom: short-axis bSSFP volumes of a beating heart.

Everything is built from geometry and MR physics, in four steps:

1. **Anatomy.** The LV cavity (endocardium) and the epicardium are prolate ellipsoids sharing one
   long axis, cut at the base by a plane and closed at the apex; the myocardium is the shell
   between them. The RV cavity is a larger ellipsoid beside the LV minus the LV epicardium: a
   crescent wrapped around the septum. Each surface is an implicit function, evaluated on the
   voxel grid with vectorised numpy.
2. **Motion.** The LV cavity volume follows a smooth curve ``V(t) = EDV (1 - EF s(t))``: ED at
   frame 0, ES at ``round(0.35 T)``. The cavity shrinks radially and along the long axis (the apex
   stays put, the base descends). Myocardium is incompressible, so at every frame the epicardium
   is placed where the shell keeps its ED volume: the wall thickens in systole.
3. **Pathology.** ACDC-like classes change the sizes, the wall, the EF and which wall segments
   move: NOR normal, HCM thick (septal) wall, DCM large round LV with low EF, MINF a thinned
   akinetic segment, ARV a dilated, poorly contracting RV.
4. **Contrast.** bSSFP signal depends on T2/T1: blood and fat bright, myocardium and muscle dark,
   lungs (little proton density) darker still. A smooth coil sensitivity multiplies the image and
   the magnitude of complex Gaussian noise makes it Rician.

The *heart frame* has its origin at the LV endocardial apex, ``z`` along the long axis towards
the base, ``-x`` towards the RV (the septum sits at angle ``theta = pi``), ``+y`` anterior.
Lengths are in mm, volumes in ml. Arrays are ``(X, Y, Z)`` or ``(X, Y, Z, T)``; ``Z`` is the
slice (long-axis) direction, with slices ``slice_ratio`` times thicker than the in-plane pixels.
Labels follow ACDC: 0 background, 1 RV, 2 MYO (LV myocardium), 3 LV (blood pool).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Iterable, Iterator

import numpy as np

from . import subject_seed
from .msd import Case, write_msd_dataset
from .nifti import spacing_affine

HEART_CLASSES = ("NOR", "HCM", "DCM", "MINF", "ARV")
HEART_LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}


@dataclass(frozen=True)
class HeartClass:
    """The ranges ``(lo, hi)`` one ACDC-like class draws its subjects from.

    ``ef_lv`` / ``ef_rv`` are the accepted ejection-fraction ranges (%): the EF measured on the
    generated labels falls inside (targets are drawn from the inner 70 % of these two ranges).
    """

    ef_lv: tuple[float, float]
    ef_rv: tuple[float, float]
    edv_ml: tuple[float, float]          # LV end-diastolic volume
    wall_mm: tuple[float, float]         # LV wall thickness at ED
    aspect: tuple[float, float]          # long / short semi-axis of the LV cavity (low: spherical)
    rv_width: tuple[float, float]        # RV crescent width / septal epicardial radius
    septal_bulge: tuple[float, float] = (0.0, 0.0)  # extra septal wall, fraction (asymmetric HCM)
    infarct: bool = False                # a thinned akinetic wall segment


HEART_CLASS_RANGES = {
    "NOR": HeartClass(ef_lv=(55, 70), ef_rv=(45, 65), edv_ml=(110, 170), wall_mm=(7, 10),
                      aspect=(2.2, 2.6), rv_width=(0.4, 0.6)),
    "HCM": HeartClass(ef_lv=(60, 80), ef_rv=(45, 65), edv_ml=(85, 140), wall_mm=(12, 18),
                      aspect=(2.1, 2.5), rv_width=(0.35, 0.55), septal_bulge=(0.2, 0.45)),
    "DCM": HeartClass(ef_lv=(10, 35), ef_rv=(40, 60), edv_ml=(220, 300), wall_mm=(6, 8.5),
                      aspect=(1.7, 2.1), rv_width=(0.35, 0.5)),
    "MINF": HeartClass(ef_lv=(25, 45), ef_rv=(45, 65), edv_ml=(150, 220), wall_mm=(8, 10.5),
                       aspect=(2.0, 2.4), rv_width=(0.4, 0.6), infarct=True),
    "ARV": HeartClass(ef_lv=(55, 70), ef_rv=(10, 40), edv_ml=(100, 150), wall_mm=(7, 10),
                      aspect=(2.2, 2.6), rv_width=(0.8, 1.1)),
}

# Relative bSSFP signal of each tissue (steady state ~ sqrt(T2/T1) x proton density).
BSSFP_SIGNAL = {"air": 0.0, "lung": 0.05, "myocardium": 0.25, "muscle": 0.35,
                "fat": 0.75, "blood": 0.85}


@dataclass
class HeartConfig:
    """Grid, cycle, pose and scanner settings shared by every subject of a dataset."""

    size: int = 64                 # voxels per edge of the cubic grid (X = Y = Z)
    frames: int = 16               # T, frames over one cardiac cycle
    fov_mm: float = 160.0          # in-plane field of view: in-plane spacing = fov_mm / size
    slice_ratio: float = 2.0       # slice spacing / in-plane spacing (thick short-axis slices)
    es_fraction: float = 0.35      # ES frame = round(es_fraction * T)
    long_axis_share: float = 0.25  # beta: c ~ V^beta, a^2 ~ V^(1-beta); < 0.5 keeps cavities nested
    tilt_deg: float = 12.0         # max tilt of the long axis away from the slice normal
    spin_deg: float = 15.0         # max rotation about the slice normal
    shift_mm: float = 6.0          # max random shift of the heart along each axis
    noise: float = 0.03            # Rician noise sigma, relative to the blood signal
    bias: float = 0.2              # strength of the smooth coil-sensitivity field
    bits: int = 12                 # stored magnitude levels 2^bits - 1, as scanners store images

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 16:
            raise ValueError(f"HeartConfig.size must be an integer >= 16, got {self.size!r}")
        if not isinstance(self.frames, (int, np.integer)) or self.frames < 2:
            raise ValueError(f"HeartConfig.frames must be an integer >= 2, got {self.frames!r}")
        for name in ("fov_mm", "slice_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HeartConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.es_fraction < 1:
            raise ValueError(f"HeartConfig.es_fraction must be in (0, 1), got {self.es_fraction!r}")
        if not 0 < self.long_axis_share < 0.5:
            raise ValueError("HeartConfig.long_axis_share must be in (0, 0.5) so that systolic "
                             f"cavities stay nested, got {self.long_axis_share!r}")
        if not isinstance(self.bits, (int, np.integer)) or not 8 <= self.bits <= 16:
            raise ValueError(f"HeartConfig.bits must be an integer in [8, 16], got {self.bits!r}")
        for name in ("tilt_deg", "spin_deg", "shift_mm", "noise", "bias"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"HeartConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm): square in-plane pixels, thicker slices along Z."""
        dx = self.fov_mm / self.size
        return (dx, dx, dx * self.slice_ratio)

    @property
    def es_frame(self) -> int:
        """End systole, ~35 % into the cycle; never frame 0 (ED) and never past the last frame."""
        return int(min(max(round(self.es_fraction * self.frames), 1), self.frames - 1))


# ----------------------------------------------------------------------------------------------
# 1. Shapes: implicit functions that return a signed distance in *voxels* (negative inside)
# ----------------------------------------------------------------------------------------------

def _ellipsoid_distance(q, radii, metric) -> np.ndarray:
    """Approximate signed distance, in voxel units, to the ellipsoid ``|q / radii| = 1``.

    ``q = (qx, qy, qz)`` are offsets (mm) from the centre along the ellipsoid's axes, ``radii`` its
    semi-axes (scalars or arrays, e.g. radii that vary with the angle) and ``metric`` the voxel
    metric in those axes (``R^T diag(spacing^2) R``). With ``k0 = |q/r|`` the implicit
    function ``F = k0 - 1`` has gradient ``g / k0``, ``g = q / r^2``; dividing ``F`` by the length
    of that gradient *measured in voxel steps* (``sqrt(g^T M g)``, ``M`` = the voxel metric) gives
    how many voxels away the surface is along its normal -- what a partial-volume ramp needs on
    an anisotropic grid.
    """
    ux, uy, uz = q[0] / radii[0], q[1] / radii[1], q[2] / radii[2]
    k0 = np.sqrt(ux * ux + uy * uy + uz * uz)
    gx, gy, gz = ux / radii[0], uy / radii[1], uz / radii[2]
    m = [[float(v) for v in row] for row in np.asarray(metric)]   # python floats keep float32
    gn2 = (m[0][0] * gx * gx + m[1][1] * gy * gy + m[2][2] * gz * gz
           + 2 * (m[0][1] * gx * gy + m[0][2] * gx * gz + m[1][2] * gy * gz))
    k0_safe = np.maximum(k0, 1e-6)
    # |grad F| in voxel steps = sqrt(gn2) / k0, finite at the centre (it scales like 1/r).
    return (k0 - 1) / np.maximum(np.sqrt(gn2) / k0_safe, 1e-6)


def _occupancy(d_vox) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre lies ``d_vox`` voxels from a surface."""
    return np.clip(0.5 - d_vox, 0.0, 1.0)


def _angular_bump(theta, centre: float, half_width: float, taper: float = np.deg2rad(25)):
    """1 within ``half_width`` of angle ``centre``, a cosine taper to 0 over ``taper`` radians."""
    delta = np.abs((theta - centre + np.pi) % (2 * np.pi) - np.pi)   # wrapped angular distance
    x = np.clip((delta - half_width) / taper, 0.0, 1.0)
    return 0.5 * (1 + np.cos(np.pi * x))


def _truncated_ellipsoid_integral(c, h):
    """``G`` in ``V = pi mean_theta(a^2) G``: the volume of ``r^2/a^2 + u^2/c^2 <= 1, u <= h``.

    ``int_{-c}^{h} (1 - u^2/c^2) du = h + 2c/3 - h^3 / (3 c^2)`` (``u`` from the centre; the
    apex at ``u = -c``, the base plane at ``u = h``).
    """
    return h + 2 * c / 3 - h ** 3 / (3 * c ** 2)


# ----------------------------------------------------------------------------------------------
# 2. One subject's anatomy at ED, drawn from its class
# ----------------------------------------------------------------------------------------------

@dataclass
class HeartAnatomy:
    """ED geometry (mm) and pose of one subject; ``CardiacCycle`` says how it moves."""

    pathology: str
    a0: float               # LV cavity short semi-axis at ED
    c0: float               # LV cavity long semi-axis at ED (centre at z = c, apex at z = 0)
    f_base: float           # base plane at z = (1 + f_base) c: how far above the equator
    w0: float               # LV wall thickness at ED
    apex_wall: float        # apical wall / lateral wall thickness
    edv_target: float       # ml
    ef_target: float        # %
    septal_bulge: float     # extra septal thickness, fraction
    infarct_theta: float    # centre angle of the infarct (rad)
    infarct_half_width: float
    w_scar: float           # wall thickness in the infarct (0 when there is none)
    rv_anchor: float        # x of the septal end of the RV ellipsoid
    rv_a0: tuple[float, float, float]   # RV ellipsoid semi-axes at ED (x, y, z)
    rv_yz: tuple[float, float]          # RV ellipsoid centre (y, z)
    rv_wall: float
    ef_rv_target: float     # %
    la_radii: tuple[float, float, float]
    la_xy: tuple[float, float]
    ra_radii: tuple[float, float, float]
    ra_xy: tuple[float, float]
    rotation: np.ndarray    # (3, 3) heart frame -> scanner axes: p = R q + origin
    origin: np.ndarray      # (3,) mm, scanner position of the heart-frame origin

    def motion_weight(self, theta):
        """m(theta): 1 where the wall moves, 0 in the akinetic infarct."""
        if self.w_scar == 0:
            return 1.0
        return 1.0 - _angular_bump(theta, self.infarct_theta, self.infarct_half_width)

    def thickness_profile(self, theta):
        """tau(theta): wall thickness relative to ``w``; > 1 at the septum in asymmetric HCM."""
        if self.septal_bulge == 0:
            return 1.0
        return 1.0 + self.septal_bulge * _angular_bump(theta, np.pi, np.deg2rad(45))

    @property
    def angular(self) -> bool:
        """Whether the wall varies with the angle (then voxels need their angle theta)."""
        return self.w_scar > 0 or self.septal_bulge > 0


def _uniform(rng, lo_hi, inner: float = 1.0) -> float:
    """A draw from ``lo_hi``, or from its central ``inner`` fraction."""
    lo, hi = lo_hi
    pad = 0.5 * (1 - inner) * (hi - lo)
    return float(rng.uniform(lo + pad, hi - pad))


def _random_rotation(rng, tilt_deg: float, spin_deg: float) -> np.ndarray:
    """Spin about the slice normal, then tilt the long axis by <= ``tilt_deg`` towards any side."""
    psi = np.deg2rad(rng.uniform(-spin_deg, spin_deg))
    spin = np.array([[np.cos(psi), -np.sin(psi), 0], [np.sin(psi), np.cos(psi), 0], [0, 0, 1]])
    alpha, phi = np.deg2rad(rng.uniform(0, tilt_deg)), rng.uniform(0, 2 * np.pi)
    k = np.array([np.cos(phi), np.sin(phi), 0.0])       # in-plane tilt axis (Rodrigues' formula)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    tilt = np.eye(3) + np.sin(alpha) * kx + (1 - np.cos(alpha)) * kx @ kx
    return tilt @ spin


def sample_anatomy(rng: np.random.Generator, cfg: HeartConfig, pathology: str) -> HeartAnatomy:
    """Draw one subject's ED geometry and pose from the ranges of its class."""
    if pathology not in HEART_CLASS_RANGES:
        raise ValueError(f"pathology must be one of {HEART_CLASSES}, got {pathology!r}")
    klass = HEART_CLASS_RANGES[pathology]
    # 1. LV cavity: EDV and aspect fix the semi-axes, V = pi a^2 G(c, f c) with c = aspect * a.
    edv, aspect = _uniform(rng, klass.edv_ml), _uniform(rng, klass.aspect)
    f_base = float(rng.uniform(0.2, 0.35))
    g = _truncated_ellipsoid_integral(1.0, f_base)               # G for c = 1
    a0 = (edv * 1000.0 / (np.pi * aspect * g)) ** (1 / 3)
    c0 = aspect * a0
    # 2. wall, septal bulge, infarct
    w0 = _uniform(rng, klass.wall_mm)
    bulge = _uniform(rng, klass.septal_bulge)
    infarct_theta = float(rng.uniform(0, 2 * np.pi))
    infarct_half_width = float(np.deg2rad(rng.uniform(35, 55)))
    w_scar = float(rng.uniform(0.35, 0.5) * w0) if klass.infarct else 0.0
    # 3. RV: an ellipsoid from just past the LV axis (anchor) to the free wall, a crescent
    #    of width ~ rv_width * (septal epicardial radius) once the LV epicardium is removed.
    r_septum = a0 + w0 * (1 + bulge)
    anchor = float(rng.uniform(0.1, 0.35) * r_septum)
    width = _uniform(rng, klass.rv_width) * r_septum
    rv_ax = 0.5 * (anchor + r_septum + width)
    rv_ay = float(rng.uniform(1.2, 1.4)) * (a0 + w0) * (1.1 if pathology == "ARV" else 1.0)
    length = (1 + f_base) * c0
    rv_az = float(rng.uniform(0.55, 0.65)) * length
    rv_yz = (float(rng.uniform(0.0, 0.15)) * r_septum, 0.75 * length)
    # 4. atria above the base plane (unlabelled, as in ACDC)
    la_radii = tuple(float(v) for v in a0 * rng.uniform(0.7, 0.9, size=3))
    ra_radii = tuple(float(v) for v in a0 * rng.uniform(0.7, 0.9, size=3))
    la_xy = (0.3 * a0, -0.5 * a0)
    ra_xy = (anchor - rv_ax - 0.1 * a0, -0.3 * a0)
    # 5. pose: a small random rotation of the long axis; the heart's middle goes to the FOV
    #    centre + a random shift (_keep_in_view may move it back inside the grid)
    rotation = _random_rotation(rng, cfg.tilt_deg, cfg.spin_deg)
    shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, size=3)
    anat = HeartAnatomy(
        pathology=pathology, a0=float(a0), c0=float(c0), f_base=f_base, w0=w0,
        apex_wall=float(rng.uniform(0.7, 0.9)), edv_target=edv,
        ef_target=_uniform(rng, klass.ef_lv, inner=0.7), septal_bulge=bulge,
        infarct_theta=infarct_theta, infarct_half_width=infarct_half_width, w_scar=w_scar,
        rv_anchor=anchor, rv_a0=(rv_ax, rv_ay, rv_az), rv_yz=rv_yz,
        rv_wall=float(rng.uniform(3.0, 4.0)), ef_rv_target=_uniform(rng, klass.ef_rv, inner=0.7),
        la_radii=la_radii, la_xy=la_xy, ra_radii=ra_radii, ra_xy=ra_xy,
        rotation=rotation, origin=np.zeros(3))
    anat.origin = shift - rotation @ _heart_centre(anat)
    return anat


def _heart_centre(anat: HeartAnatomy) -> np.ndarray:
    """Middle of the heart's ED bounding box (heart frame): this point goes to the FOV centre."""
    x_lo = anat.rv_anchor - 2 * anat.rv_a0[0]
    x_hi = anat.a0 + anat.w0
    z_top = (1 + anat.f_base) * anat.c0 + 1.5 * max(anat.la_radii[2], anat.ra_radii[2])
    return np.array([0.5 * (x_lo + x_hi), 0.0, 0.5 * (z_top - anat.w0)])


# ----------------------------------------------------------------------------------------------
# 3. The cardiac cycle: cavity volume curve, incompressible myocardium
# ----------------------------------------------------------------------------------------------

def contraction_profile(frames: int, es_frame: int) -> np.ndarray:
    """``s(t)`` in [0, 1]: 0 at ED (frame 0), 1 at ES; cosine contraction, then cosine relaxation.

    ``s`` is strictly positive at every other frame, so ED is the largest cavity and ES the
    smallest. The cycle is periodic: frame ``T`` would be ED again.
    """
    phi, phi_es = np.arange(frames) / frames, es_frame / frames
    contraction = 0.5 * (1 - np.cos(np.pi * phi / phi_es))
    relaxation = 0.5 * (1 + np.cos(np.pi * (phi - phi_es) / (1 - phi_es)))
    return np.where(phi <= phi_es, contraction, relaxation)


@dataclass
class CardiacCycle:
    """Per-frame shape parameters, each an array of shape (T,)."""

    s: np.ndarray        # contraction state, 0 at ED, 1 at ES
    volume: np.ndarray   # prescribed LV cavity volume V(t), ml
    rho: np.ndarray      # radial scale of the moving endocardium: a = a0 (1 - m (1 - rho))
    c: np.ndarray        # LV cavity long semi-axis (centre at z = c, apex fixed at z = 0)
    w: np.ndarray        # wall thickness of moving myocardium (thickens in systole)
    rho_rv: np.ndarray   # RV scale: the free wall moves towards the septum (set by fit_to_voxels)


_THETA = np.linspace(0, 2 * np.pi, 720, endpoint=False)   # quadrature for mean_theta(a^2)


def _epicardial_radius(anat: HeartAnatomy, a, w, m, tau):
    """A_e(theta) = a + tau (m w + (1 - m) w_scar): the scar keeps its thin wall."""
    return a + tau * (m * w + (1 - m) * anat.w_scar)


def solve_cardiac_cycle(anat: HeartAnatomy, cfg: HeartConfig) -> CardiacCycle:
    """Shape parameters of every frame, from the volume curve and conservation of myocardium.

    Continuous geometry (exact volumes of truncated ellipsoids); ``fit_to_voxels`` then makes the
    voxelised labels honour the same volumes.
    """
    beta = cfg.long_axis_share
    s = contraction_profile(cfg.frames, cfg.es_frame)
    m = np.broadcast_to(anat.motion_weight(_THETA), _THETA.shape)
    tau = np.broadcast_to(anat.thickness_profile(_THETA), _THETA.shape)
    # 1. cavity volume curve V(t) = EDV (1 - EF s(t)); the long axis takes the share c ~ V^beta
    v0 = np.pi * anat.a0 ** 2 * _truncated_ellipsoid_integral(anat.c0, anat.f_base * anat.c0)
    v = v0 * (1 - anat.ef_target / 100 * s)
    c = anat.c0 * (v / v0) ** beta
    # 2. radial scale rho: mean_theta (1 - m + m rho)^2 = V / (pi a0^2 G) is a quadratic in rho
    target = v / (np.pi * anat.a0 ** 2 * _truncated_ellipsoid_integral(c, anat.f_base * c))
    qa, qb, qc = np.mean(m * m), 2 * np.mean((1 - m) * m), np.mean((1 - m) ** 2) - target
    disc = qb * qb - 4 * qa * qc
    if np.any(disc < 0):
        raise ValueError(f"{anat.pathology}: EF {anat.ef_target:.0f} % cannot be reached with "
                         "this akinetic segment")
    rho = (-qb + np.sqrt(disc)) / (2 * qa)
    a = anat.a0 * (1 - m[None, :] * (1 - rho[:, None]))                    # (T, n_theta)

    # 3. epicardium: V_epi(w) - V(t) = V_myo(ED); V_epi grows with w, so bisect (all frames at once)
    def epicardial_volume(w):                                              # w: (T,)
        a_e = _epicardial_radius(anat, a, w[:, None], m, tau)
        c_e = c + anat.apex_wall * w
        return np.pi * np.mean(a_e ** 2, axis=1) * _truncated_ellipsoid_integral(c_e, anat.f_base * c)

    v_myo = epicardial_volume(np.full(len(s), anat.w0))[0] - v0
    lo, hi = np.zeros_like(s), np.full_like(s, 6 * anat.w0 + 30)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        too_thin = epicardial_volume(mid) < v + v_myo
        lo, hi = np.where(too_thin, mid, lo), np.where(too_thin, hi, mid)
    return CardiacCycle(s=s, volume=v / 1000.0, rho=rho, c=c, w=0.5 * (lo + hi), rho_rv=np.ones_like(s))


# ----------------------------------------------------------------------------------------------
# 4. The voxel grid: surfaces at one frame, and volumes that survive voxelisation
# ----------------------------------------------------------------------------------------------

@dataclass
class VoxelGrid:
    """Heart-frame coordinates of the voxels in the heart's box, and what every frame reuses."""

    x: np.ndarray            # heart-frame coordinates (mm), float32, the box's shape
    y: np.ndarray
    z: np.ndarray
    r2: np.ndarray           # x^2 + y^2: distance^2 from the long axis
    pxy: np.ndarray          # [x y] M [x y]^T: the in-plane part of |grad|^2 in voxel steps
    qxy: np.ndarray          # M02 x + M12 y: the cross term with the long axis
    m: np.ndarray | float    # motion weight m(theta) per voxel (1: moves, 0: akinetic)
    tau: np.ndarray | float  # wall-thickness profile tau(theta) per voxel
    metric: np.ndarray       # M = R^T diag(spacing^2) R: lengths in voxel steps, heart frame
    voxel_ml: float

    @property
    def base_scale(self) -> float:
        """Voxel steps per mm along the long axis (the base plane's normal)."""
        return float(1.0 / np.sqrt(self.metric[2, 2]))


def voxel_grid(anat: HeartAnatomy, points_mm: np.ndarray, spacing) -> VoxelGrid:
    """Map scanner points (3, ...) in mm into the heart frame: q = R^T (p - origin)."""
    rotation = anat.rotation.astype(np.float32)
    shifted = points_mm - anat.origin.astype(np.float32).reshape(3, *[1] * (points_mm.ndim - 1))
    x, y, z = np.einsum("ji,j...->i...", rotation, shifted)                # (3, ...) -> 3 x (...)
    metric = anat.rotation.T @ np.diag(np.square(spacing)) @ anat.rotation
    mm = [[float(v) for v in row] for row in metric]
    theta = np.arctan2(y, x) if anat.angular else None
    return VoxelGrid(
        x=x, y=y, z=z, r2=x * x + y * y,
        pxy=mm[0][0] * x * x + mm[1][1] * y * y + 2 * mm[0][1] * x * y, qxy=mm[0][2] * x + mm[1][2] * y,
        m=anat.motion_weight(theta) if anat.angular else 1.0,
        tau=anat.thickness_profile(theta) if anat.angular else 1.0,
        metric=metric, voxel_ml=float(np.prod(spacing)) / 1000.0)


def _lv_distance(grid: VoxelGrid, zc2, qz, a, c: float):
    """``_ellipsoid_distance`` for an ellipsoid (a, a, c) on the long axis, reusing the static
    in-plane terms: with g = (x/a^2, y/a^2, zc/c^2), g^T M g = pxy/a^4 + 2 qxy zc/(a^2 c^2) + M22 zc^2/c^4."""
    ia2, ic2 = 1.0 / (a * a), 1.0 / (c * c)
    k0 = np.sqrt(grid.r2 * ia2 + zc2 * ic2)
    gn2 = grid.pxy * (ia2 * ia2) + qz * (2 * ic2 * ia2) + zc2 * (float(grid.metric[2, 2]) * ic2 * ic2)
    return (k0 - 1) / np.maximum(np.sqrt(np.maximum(gn2, 0)) / np.maximum(k0, 1e-6), 1e-6)


def _frame_shape(anat: HeartAnatomy, cycle: CardiacCycle, t: int, grid: VoxelGrid):
    """LV radii at frame t: cavity a (per voxel or scalar), epicardium a_e, long semi-axes, base."""
    c, w, rho = float(cycle.c[t]), float(cycle.w[t]), float(cycle.rho[t])
    a = anat.a0 * (1 - grid.m * (1 - rho))
    a_e = _epicardial_radius(anat, a, w, grid.m, grid.tau)
    return a, a_e, c, c + anat.apex_wall * w, (1 + anat.f_base) * c


def _rv_radii(anat: HeartAnatomy, rho_rv: float):
    """RV ellipsoid (centre x, semi-axes) at scale rho_rv: it keeps its septal end (the anchor)."""
    ax, ay, az = anat.rv_a0
    ax, ay, az = ax * rho_rv, ay * np.sqrt(rho_rv), az * rho_rv ** 0.25
    return anat.rv_anchor - ax, (ax, ay, az)


def _surfaces(anat: HeartAnatomy, cycle: CardiacCycle, t: int, grid: VoxelGrid) -> dict[str, np.ndarray]:
    """Signed voxel distances (negative inside) of every surface at frame ``t``."""
    x, y, z = grid.x, grid.y, grid.z
    a, a_e, c, c_e, z_base = _frame_shape(anat, cycle, t, grid)
    # 1. LV: endocardium and epicardium share the centre (0, 0, c); the base plane cuts both
    zc = z - c
    zc2, qz = zc * zc, grid.qxy * zc
    fields = {"endo": _lv_distance(grid, zc2, qz, a, c), "epi": _lv_distance(grid, zc2, qz, a_e, c_e),
              "base": (z - z_base) * grid.base_scale}
    # 2. RV ellipsoid (the crescent is made in _labels / _render_heart by removing the epicardium)
    x_rv, radii = _rv_radii(anat, float(cycle.rho_rv[t]))
    fields["rv"] = _ellipsoid_distance((x - x_rv, y - anat.rv_yz[0], z - anat.rv_yz[1]), radii, grid.metric)
    # 3. atria sit on the (moving) base plane
    for name, radii, (xa, ya) in (("la", anat.la_radii, anat.la_xy), ("ra", anat.ra_radii, anat.ra_xy)):
        fields[name] = _ellipsoid_distance((x - xa, y - ya, z - (z_base + 0.7 * radii[2])), radii, grid.metric)
    return fields


def _kth_threshold(values: np.ndarray, k: int) -> float:
    """A threshold with exactly k of ``values`` below it (midway between the k-th and k+1-th)."""
    if k <= 0:
        return float(values.min()) - 1e-3 if values.size else 0.0
    if k >= values.size:
        return float(values.max()) + 1e-3
    part = np.partition(values, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def _secant(count, target: int, x0: float, step: float, tol: float, iters: int = 10) -> float:
    """Solve count(x) = target for a non-decreasing integer count(x) >= 0 by secant steps."""
    x_prev, n_prev = x0, count(x0)
    best = (abs(n_prev - target), x0)
    x = max(x0 + step * np.sign(target - n_prev), 0.0)
    for _ in range(iters):
        if best[0] <= tol:
            break
        n = count(x)
        best = min(best, (abs(n - target), x))
        slope = (n - n_prev) / (x - x_prev) if x != x_prev else 0.0
        x_next = x + (target - n) / slope if slope > 0 else x + step * np.sign(target - n)
        x_prev, n_prev, x = x, n, max(x_next, 0.0)
    return best[1]


def _masked(value, mask):
    """``value[mask]`` for a per-voxel array; a scalar (the same for every voxel) as it is."""
    return value[mask] if isinstance(value, np.ndarray) else value


def _fit_cavity(anat: HeartAnatomy, grid: VoxelGrid, c: float, volume_ml: float) -> tuple[float, int]:
    """Radial scale rho with exactly round(V / voxel) cavity voxels, and that voxel count.

    A voxel is inside when r / sqrt(1 - zc^2/c^2) < a0 (1 - m + m rho), i.e. when rho exceeds its
    own threshold rho_i: the k-th smallest threshold gives k voxels (a quantile, no search).
    """
    zc = grid.z - c
    inside_length = (grid.z < (1 + anat.f_base) * c) & (zc * zc < c * c)   # below base, above apex
    r_eff = np.sqrt(grid.r2[inside_length] / (1 - (zc[inside_length] / c) ** 2)) / anat.a0
    m = np.broadcast_to(_masked(grid.m, inside_length), r_eff.shape)
    moving = m > 0
    fixed_inside = int(np.count_nonzero(~moving & (r_eff < 1)))          # the akinetic scar
    rho_i = (r_eff[moving] - 1 + m[moving]) / m[moving]
    k = int(round(volume_ml / grid.voxel_ml))
    rho = max(_kth_threshold(rho_i, k - fixed_inside), 0.05)
    return rho, fixed_inside + int(np.count_nonzero(rho_i < rho))


def _epicardial_counter(anat: HeartAnatomy, grid: VoxelGrid, c: float, rho: float):
    """count(w): voxels inside the epicardium (below the base) for a wall thickness w."""
    zc = grid.z - c
    below = grid.z < (1 + anat.f_base) * c
    r2, zc2 = grid.r2[below], zc[below] ** 2
    m, tau = _masked(grid.m, below), _masked(grid.tau, below)
    a = anat.a0 * (1 - m * (1 - rho))

    def count(w: float) -> int:
        a_e = _epicardial_radius(anat, a, w, m, tau)
        return int(np.count_nonzero(r2 / (a_e * a_e) + zc2 / (c + anat.apex_wall * w) ** 2 < 1))
    return count


def fit_to_voxels(anat: HeartAnatomy, cycle: CardiacCycle, grid: VoxelGrid, es_frame: int) -> CardiacCycle:
    """Nudge the shape parameters so that the *voxelised* labels keep the prescribed volumes.

    Thick slices quantise the base plane: as it moves through a 5-10 mm slice the label volumes
    jump by a whole ring of tissue. Counting voxels removes the jumps:
    1. the cavity scale rho gives exactly round(V(t) / voxel) LV voxels at every frame;
    2. the wall w keeps the ED count of myocardial voxels at every frame (secant steps);
    3. the RV's ES scale gives the target RV EF (bisection); ED keeps rho_rv = 1.
    """
    rho, w = cycle.rho.copy(), cycle.w.copy()
    n_myo_ed = 0
    for t in range(len(rho)):
        c = float(cycle.c[t])
        rho[t], n_lv = _fit_cavity(anat, grid, c, float(cycle.volume[t]))
        count_epi = _epicardial_counter(anat, grid, c, float(rho[t]))
        if t == 0:                                      # ED defines the myocardium to conserve
            n_myo_ed = count_epi(float(w[0])) - n_lv
        else:
            w[t] = _secant(count_epi, n_lv + n_myo_ed, float(w[t]), 0.5, tol=max(1.0, 0.002 * n_myo_ed))
    fitted = CardiacCycle(s=cycle.s, volume=cycle.volume, rho=rho, c=cycle.c, w=w, rho_rv=cycle.rho_rv)
    fitted.rho_rv = 1 - (1 - _fit_rv_scale(anat, fitted, grid, es_frame)) * cycle.s
    return fitted


def _fit_rv_scale(anat: HeartAnatomy, cycle: CardiacCycle, grid: VoxelGrid, es: int) -> float:
    """RV scale at ES such that 1 - N_rv(ES) / N_rv(ED) is the target RV EF (bisection on rho)."""
    def free_space(t):                      # where the RV may be: below the base, outside the LV
        a, a_e, c, c_e, z_base = _frame_shape(anat, cycle, t, grid)
        zc = grid.z - c
        outside_epi = grid.r2 / (a_e * a_e) + zc * zc / (c_e * c_e) >= 1
        keep = outside_epi & (grid.z < z_base)
        return grid.x[keep], grid.y[keep], grid.z[keep]

    def rv_count(points, rho_rv):
        x_rv, (ax, ay, az) = _rv_radii(anat, rho_rv)
        x, y, z = points
        k2 = ((x - x_rv) / ax) ** 2 + ((y - anat.rv_yz[0]) / ay) ** 2 + ((z - anat.rv_yz[1]) / az) ** 2
        return int(np.count_nonzero(k2 < 1))

    n_ed = rv_count(free_space(0), 1.0)
    es_points = free_space(es)
    n_target = (1 - anat.ef_rv_target / 100) * n_ed
    lo, hi = 0.1, 1.2
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if rv_count(es_points, mid) > n_target else (mid, hi)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# 5. Labels and the bSSFP image
# ----------------------------------------------------------------------------------------------

def _labels(fields) -> np.ndarray:
    """ACDC labels from the signs of the fields at the voxel centres (uint8)."""
    below = fields["base"] < 0
    lv = (fields["endo"] < 0) & below
    epi = fields["epi"] < 0
    myo = epi & below & ~lv
    rv = (fields["rv"] < 0) & below & ~epi
    return (3 * lv + 2 * myo + rv).astype(np.uint8)


def _paint(image, occupancy, signal: float):
    """Fill a fraction ``occupancy`` of each voxel with a tissue of the given signal (in place)."""
    image += occupancy * (signal - image)


def _render_heart(image, fields, signal: dict[str, float], voxel_mm: float, rv_wall: float):
    """Paint the heart (in place) over the body: fat, walls, then blood, with partial volumes."""
    o = _occupancy
    wall = rv_wall / voxel_mm           # offsets of the fields, in (in-plane) voxels
    fat = 3.0 / voxel_mm
    below = o(fields["base"])
    above = 1 - below
    epi = o(fields["epi"])
    # 1. epicardial fat around the ventricles, atria (wall, then blood) above the base
    _paint(image, np.maximum(o(fields["epi"] - fat), o(fields["rv"] - (wall + fat))) * below, signal["fat"])
    _paint(image, np.maximum(o(fields["la"] - wall), o(fields["ra"] - wall)) * above, signal["myocardium"])
    _paint(image, np.maximum(o(fields["la"]), o(fields["ra"])) * above, signal["blood"])
    # 2. ventricular walls: LV myocardium and the thin RV free wall
    _paint(image, np.maximum(epi, o(fields["rv"] - wall)) * below, signal["myocardium"])
    # 3. blood pools
    _paint(image, o(fields["endo"]) * below, signal["blood"])
    _paint(image, o(fields["rv"]) * (1 - epi) * below, signal["blood"])


def _render_body(cfg: HeartConfig, xyz, rng, signal: dict[str, float]) -> np.ndarray:
    """The static thorax (X, Y, Z): a body ellipse with a bright fat layer, muscle, two lungs.

    ``xyz``: scanner coordinates (mm) as open grids (X, 1, 1), (1, Y, 1), (1, 1, Z).
    """
    n, fov = cfg.size, cfg.fov_mm
    metric = np.diag(np.square(cfg.spacing))
    x, y, z = xyz
    zero = np.zeros(1, np.float32)
    # 1. body: an elliptic cylinder along the slices, a subcutaneous fat layer of 6-12 mm
    rb = fov * rng.uniform(0.44, 0.49), fov * rng.uniform(0.40, 0.46)
    t_fat = rng.uniform(6.0, 12.0)
    outer = _occupancy(_ellipsoid_distance((x, y, zero), (rb[0], rb[1], 1.0), metric))
    inner = _occupancy(_ellipsoid_distance((x, y, zero), (rb[0] - t_fat, rb[1] - t_fat, 1.0), metric))
    image = np.zeros((n, n, n), np.float32)
    _paint(image, outer, signal["fat"])
    _paint(image, inner, signal["muscle"])
    # 2. lungs: one ellipsoid on either side, above the diaphragm
    z_fov = fov * cfg.slice_ratio
    for side in (-1, 1):
        centre = (side * fov * rng.uniform(0.24, 0.3), fov * rng.uniform(-0.05, 0.05), z_fov * rng.uniform(0.1, 0.2))
        radii = (fov * 0.16, rb[1] * 0.75, z_fov * 0.35)
        lung = _occupancy(_ellipsoid_distance((x - centre[0], y - centre[1], z - centre[2]), radii, metric))
        _paint(image, lung * inner, signal["lung"])
    return image


def _coil_sensitivity(cfg: HeartConfig, xyz, rng) -> np.ndarray:
    """A smooth multiplicative field exp(linear + quadratic) over the FOV, ~1 at the centre."""
    x, y, z = xyz
    half = np.array([cfg.fov_mm / 2, cfg.fov_mm / 2, cfg.fov_mm * cfg.slice_ratio / 2])
    xn, yn, zn = x / half[0], y / half[1], z / half[2]                   # in [-1, 1]
    k = rng.normal(0, 1, size=5) * cfg.bias
    log_b = k[0] * xn + k[1] * yn + 0.5 * k[2] * zn + 0.5 * k[3] * (xn ** 2 + yn ** 2) + 0.5 * k[4] * zn ** 2
    return np.exp(log_b).astype(np.float32)


def _heart_extent(anat: HeartAnatomy, cycle: CardiacCycle) -> tuple[np.ndarray, np.ndarray]:
    """Heart-frame bounding box (lo, hi) of the heart at every frame: LV, RV and atria."""
    bulge = 1 + anat.septal_bulge
    r_epi = float(np.max(anat.a0 * cycle.rho + bulge * cycle.w))
    if anat.w_scar > 0:
        r_epi = max(r_epi, anat.a0 + float(cycle.w.max()))
    z_base = (1 + anat.f_base) * anat.c0
    (ax, ay, az), (y_rv, z_rv), wall = anat.rv_a0, anat.rv_yz, anat.rv_wall
    boxes = [  # (x lo, x hi), (y lo, y hi), (z lo, z hi) of each structure
        ((-r_epi, r_epi), (-r_epi, r_epi), (-anat.apex_wall * float(cycle.w.max()), z_base)),
        ((anat.rv_anchor - 2 * ax - wall, anat.rv_anchor), (y_rv - ay - wall, y_rv + ay + wall),
         (z_rv - az - wall, z_base))]
    for radii, (xa, ya) in ((anat.la_radii, anat.la_xy), (anat.ra_radii, anat.ra_xy)):
        boxes.append(((xa - radii[0] - wall, xa + radii[0] + wall), (ya - radii[1] - wall, ya + radii[1] + wall),
                      (z_base - 2 * radii[2], z_base + 1.7 * radii[2] + wall)))
    lo = np.min([[b[i][0] for i in range(3)] for b in boxes], axis=0)
    hi = np.max([[b[i][1] for i in range(3)] for b in boxes], axis=0)
    return lo, hi


def _extent_in_scanner(anat: HeartAnatomy, cycle: CardiacCycle) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned scanner box (mm) around the rotated heart-frame box: holds everything drawn."""
    lo, hi = _heart_extent(anat, cycle)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    scanner = corners @ anat.rotation.T + anat.origin
    return scanner.min(0), scanner.max(0)


def _labelled_extent(anat: HeartAnatomy, cycle: CardiacCycle, step: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Scanner box (mm) of the labelled ventricles, sampled every ``step`` mm at ED and at the
    frame of thickest wall (the ventricles are largest at ED, the epicardium may not be)."""
    lo, hi = _heart_extent(anat, cycle)
    q = np.stack(np.meshgrid(*[np.arange(a, b + step, step) for a, b in zip(lo, hi)], indexing="ij"))
    p = np.einsum("ij,j...->i...", anat.rotation, q) + anat.origin.reshape(3, 1, 1, 1)
    grid = voxel_grid(anat, p.astype(np.float32), (1.0, 1.0, 1.0))
    inside = np.zeros(q.shape[1:], bool)
    for t in {0, int(np.argmax(cycle.w))}:
        inside |= _labels(_surfaces(anat, cycle, t, grid)) > 0
    points = p[:, inside]
    return points.min(1) - step, points.max(1) + step


def _keep_in_view(anat: HeartAnatomy, cycle: CardiacCycle, cfg: HeartConfig) -> None:
    """Move the heart (in place) so that its labels stay off the faces of the grid.

    A ventricle larger than the field of view (only on very coarse grids) is centred instead.
    """
    spacing = np.array(cfg.spacing)
    half = (cfg.size - 1) / 2 * spacing - 0.5 * spacing       # farthest allowed position, mm
    lo, hi = _labelled_extent(anat, cycle)
    move = np.maximum(-half - lo, 0) - np.maximum(hi - half, 0)
    too_big = hi - lo > 2 * half
    move[too_big] = -0.5 * (lo + hi)[too_big]
    anat.origin = anat.origin + move


def _heart_box(anat: HeartAnatomy, cycle: CardiacCycle, cfg: HeartConfig) -> tuple[slice, slice, slice]:
    """Voxel slices of a box that holds the heart at every frame (plus fat and partial volumes)."""
    spacing = np.array(cfg.spacing)
    lo, hi = _extent_in_scanner(anat, cycle)
    margin = 5.0 / spacing + 1.5                  # epicardial fat (3 mm) + partial volumes, voxels
    lo_i = np.clip(np.floor(lo / spacing + (cfg.size - 1) / 2 - margin).astype(int), 0, cfg.size)
    hi_i = np.clip(np.ceil(hi / spacing + (cfg.size - 1) / 2 + margin).astype(int) + 1, 0, cfg.size)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))


def _subject_rng(seed: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(seed)


def heart_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Volume (ml) of each structure per frame: {"RV", "MYO", "LV"} -> (T,) (scalars for 3D labels)."""
    voxel_ml = abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0
    return {name: np.count_nonzero(labels == k, axis=(0, 1, 2)) * voxel_ml
            for k, name in HEART_LABELS.items() if k > 0}


def ejection_fraction(edv, esv):
    """EF (%) = 100 (EDV - ESV) / EDV."""
    return 100.0 * (edv - esv) / edv


def make_heart_subject(seed: int, cfg: HeartConfig, *, pathology: str | None = None) -> dict:
    """One beating heart: a 3D+t bSSFP cine and its labels at every frame.

    Returns ``{"cine": (X, Y, Z, T) float32 in [0, 1], "labels": (X, Y, Z, T) uint8,
    "ed_frame": 0, "es_frame": int, "affine": (4, 4), "attributes": dict}``. The attributes are
    measured on the generated labels: ``ef_lv`` / ``ef_rv`` in %, volumes in ml.
    ``pathology=None`` draws the class from the seed.
    """
    if not isinstance(cfg, HeartConfig):
        raise TypeError(f"cfg must be a HeartConfig, got {type(cfg).__name__}")
    rng = _subject_rng(seed)
    if pathology is None:
        pathology = HEART_CLASSES[int(rng.integers(len(HEART_CLASSES)))]
    if pathology not in HEART_CLASSES:
        raise ValueError(f"pathology must be one of {HEART_CLASSES} or None, got {pathology!r}")
    n, T, es = cfg.size, cfg.frames, cfg.es_frame
    spacing = np.array(cfg.spacing)
    affine = spacing_affine(spacing, (n, n, n))
    signal = {k: v * float(rng.uniform(0.92, 1.08)) for k, v in BSSFP_SIGNAL.items()}

    # 1. anatomy and its motion over the cycle (continuous geometry), inside the field of view
    anat = sample_anatomy(rng, cfg, pathology)
    cycle = solve_cardiac_cycle(anat, cfg)
    _keep_in_view(anat, cycle, cfg)

    # 2. scanner coordinates (mm) as open grids; the static thorax and coil field
    axis = [((np.arange(n) - (n - 1) / 2) * d).astype(np.float32) for d in spacing]
    open_grid = (axis[0][:, None, None], axis[1][None, :, None], axis[2][None, None, :])
    body = _render_body(cfg, open_grid, rng, signal)
    coil = _coil_sensitivity(cfg, open_grid, rng)

    # 3. the voxels of the heart's box in the heart frame; volumes fitted to those voxels
    box = _heart_box(anat, cycle, cfg)
    grid = voxel_grid(anat, np.stack(np.meshgrid(*[a[s] for a, s in zip(axis, box)], indexing="ij")), spacing)
    cycle = fit_to_voxels(anat, cycle, grid, es)

    # 4. every frame: surfaces -> labels and the noiseless image, built (T, X, Y, Z) so that
    #    each frame is one contiguous block
    cine = np.repeat(body[None], T, axis=0)
    labels = np.zeros((T, n, n, n), np.uint8)
    for t in range(T):
        fields = _surfaces(anat, cycle, t, grid)
        labels[(t,) + box] = _labels(fields)
        _render_heart(cine[(t,) + box], fields, signal, float(spacing[0]), anat.rv_wall)  # a view

    # 5. coil sensitivity, then Rician noise: |S + sigma (n1 + i n2)| (in place: 16 MB at 64^3 x 16)
    cine *= coil[None]
    sigma = np.float32(cfg.noise * signal["blood"])
    real = rng.standard_normal(cine.shape, dtype=np.float32)
    real *= sigma
    real += cine
    np.square(real, out=real)
    imag = rng.standard_normal(cine.shape, dtype=np.float32, out=cine)      # S is no longer needed
    imag *= sigma
    np.square(imag, out=imag)
    real += imag
    np.sqrt(real, out=real)
    # 6. scale (blood ~0.75, bright coil spots < 1) and store on 2^bits - 1 levels, like the 12-bit
    #    magnitude images of a scanner: a step far below the noise, and files that gzip 3x faster
    levels = np.float32(2 ** cfg.bits - 1)
    real *= levels / np.float32(1.3 * signal["blood"])
    np.clip(real, 0.0, levels, out=real)
    np.rint(real, out=real)
    real /= levels
    cine = np.ascontiguousarray(np.moveaxis(real, 0, -1))                       # (X, Y, Z, T)
    labels = np.ascontiguousarray(np.moveaxis(labels, 0, -1))

    # 7. measure what was generated
    vol = heart_volumes_ml(labels, affine)
    attributes = {
        "pathology": pathology, "seed": int(seed), "frames": T, "ed_frame": 0, "es_frame": es,
        "edv_ml": vol["LV"][0], "esv_ml": vol["LV"][es], "ef_lv": ejection_fraction(vol["LV"][0], vol["LV"][es]),
        "rv_edv_ml": vol["RV"][0], "rv_esv_ml": vol["RV"][es],
        "ef_rv": ejection_fraction(vol["RV"][0], vol["RV"][es]),
        "myo_ml": vol["MYO"][0], "wall_mm": anat.w0,
    }
    attributes = {k: round(float(v), 2) if isinstance(v, (float, np.floating)) else v
                  for k, v in attributes.items()}
    return {"cine": cine, "labels": labels, "ed_frame": 0, "es_frame": es, "affine": affine,
            "attributes": attributes}


def _prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """Yield ``items`` in order while a background thread already makes the next ``depth``.

    Why: writing a case is mostly gzip and making one mostly numpy; both release the GIL, so
    subject i+1 is generated while subject i is compressed (about 2x faster on two cores).
    """
    queue: Queue = Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def work():
        try:
            for item in items:
                queue.put(item)
                if stop.is_set():
                    return
            queue.put(end)
        except BaseException as error:          # hand the error to the consumer, which raises it
            queue.put(("error", error))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not end:
            if isinstance(item, tuple) and item[:1] == ("error",):
                raise item[1]
            yield item
    finally:                                     # the consumer stopped: unblock and end the worker
        stop.set()
        while thread.is_alive():
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass


def make_heart_dataset(out: str | Path, *, n: int = 64, size: int = 64, frames: int = 16, seed: int = 0,
                       test_fraction: float = 0.2, progress: bool = False) -> Path:
    """Write ``n`` subjects (classes round-robin) as an MSD dataset; return its folder.

    Image = the 4D cine (X, Y, Z, T); label = the ED labels; ``<id>_es`` = the ES labels. The
    last ``round(n * test_fraction)`` subjects form the test split.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    _subject_rng(seed)                                   # validates seed
    cfg = HeartConfig(size=size, frames=frames)
    n_test = int(round(n * test_fraction))

    def cases():
        for i in range(n):
            subject = make_heart_subject(subject_seed(seed, i), cfg, pathology=HEART_CLASSES[i % len(HEART_CLASSES)])
            labels, ed, es = subject["labels"], subject["ed_frame"], subject["es_frame"]
            yield Case(id=f"heart_{i:03d}", split="test" if i >= n - n_test else "train",
                       image=subject["cine"], affine=subject["affine"], label=labels[..., ed],
                       extra_labels={"es": labels[..., es]}, attributes=subject["attributes"])

    stream = _prefetch(cases())
    if progress:
        from tqdm.auto import tqdm
        stream = tqdm(stream, total=n, desc="heart phantoms", unit="subject")
    return write_msd_dataset(
        out, stream, name="gen3d-heart",
        description="Procedural short-axis cine bSSFP phantoms of the heart (3D+t), ACDC-like classes",
        modality={"0": "cine-bSSFP"}, labels={str(k): v for k, v in HEART_LABELS.items()},
        extra={"frames": frames, "ed_frame": 0, "es_frame": cfg.es_frame, "classes": list(HEART_CLASSES),
               "spacing_mm": list(cfg.spacing), "seed": seed})
