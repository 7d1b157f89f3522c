"""Unsupervised anomaly detection: learn what healthy looks like, flag what does not fit.

Every detector turns a volume ``x: (B, C, D, H, W)`` into an anomaly map ``a: (B, 1, D, H, W)``
(higher = more anomalous) after seeing healthy volumes only. Each one builds an *expected healthy
version* of the subject and takes the residual against it:

* :class:`ZScoreAtlas` — the classical baseline: a per-voxel mean and standard deviation of the
  healthy cohort in the shared template space, and ``z = (x - mean) / std`` at the same
  anatomical place of a new subject;
* :class:`ResidualDetector` — a VAE or CVAE trained on healthy volumes reconstructs the healthy
  version of its input; ``a = x - x_hat`` (after Uzunova et al. 2019, who used a CVAE);
* :class:`VQTransformerDetector` — a VQ-VAE turns the volume into a grid of codes, an
  autoregressive transformer gives every code its probability given the codes before it, codes
  less likely than a threshold are *resampled*, and the residual against the decoded "healed"
  grid, weighted towards the resampled places, is the map (after Pinaya et al. 2022);
* :class:`StandardisedDetector` — any of these maps turned into a z-score against the same
  detector's maps of healthy subjects, voxel by voxel in template space.

**Registration.** Brains differ in shape, so "the same voxel" means the same anatomical place
only after registration to a template. Our phantoms are generated *from* one template and
carry their exact map to it (``displacement``: subject voxel ``x`` sits at template voxel
``x + u(x)``), so here registration is exact: :func:`to_template` and :func:`to_subject` move
volumes between the two spaces. A detector with ``registered=True`` works in template space
(the model was trained on registered volumes) and needs every subject's displacement; its map
is always returned in the subject's own space.

:func:`score` is the checked entry point: ``score(detector, image, condition=..., displacement=...)``;
:func:`score_cohort` calls it on every subject of a :class:`Cohort`, a batch at a time.
:func:`gen3d_lessons.metrics.detection.evaluate` measures maps against lesion masks: voxel-level
AUROC and AUPRC, the best Dice any threshold of the map reaches, and a volume-level AUROC
(healthy vs. lesioned subjects); :func:`~gen3d_lessons.metrics.detection.detection_table` puts
every detector's numbers in one table.

Lesions in our phantoms are bright on FLAIR and T2, so the maps are *signed* by default
(``polarity="bright"``: ``x - x_hat``): a voxel darker than expected is less suspicious than one
that matches, which is what a radiologist looking for hyperintensities wants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import spatial
from ..data.errors import DataError
from ..data.io import check_volume

POLARITIES = ("bright", "dark", "both")


# 1. The chapter's data: phantom subjects with their maps to the template -------------------------

@dataclass
class Cohort:
    """In-memory subjects of the brain phantom, with what anomaly detection needs.

    ``image`` (N, C, D, H, W) float32 in subject space, ``label`` (N, D, H, W) uint8 (4 = lesion),
    ``displacement`` (N, 3, D, H, W) each subject's exact map to the template, ``attributes``
    one dict per subject (age, site, has_lesion, lesion_ml, ...), ``spacing_mm`` the voxel size.
    """

    image: torch.Tensor
    label: torch.Tensor
    displacement: torch.Tensor
    attributes: list[dict[str, Any]]
    spacing_mm: float = 1.0       # isotropic voxel size

    def __len__(self) -> int:
        return len(self.image)

    @property
    def lesion(self) -> torch.Tensor:
        """(N, D, H, W) bool: the lesion voxels (label 4)."""
        return self.label == 4

    @property
    def brain(self) -> torch.Tensor:
        """(N, D, H, W) bool: every voxel inside the brain (any label > 0), where maps are judged."""
        return self.label > 0

    @property
    def has_lesion(self) -> np.ndarray:
        """(N,) bool: which subjects carry lesions."""
        return np.array([bool(a["has_lesion"]) for a in self.attributes])


def phantom_cohort(n_healthy: int, n_lesioned: int = 0, *, size: int = 32, seed: int = 0,
                   channels: Sequence[str] = ("FLAIR",), lesion_radius_mm: tuple[float, float] | None = None,
                   progress: bool = True) -> Cohort:
    """``n_healthy`` subjects without lesions, then ``n_lesioned`` with, generated in memory.

    The files of ``ensure_dataset("brain")`` hold no displacements, and their lesion share is
    fixed; a detector that registers needs both, so this makes the subjects directly with
    :func:`~gen3d_lessons.data.brain.make_brain_subject` (about 15 ms each at 32³). Subject i
    uses ``subject_seed(seed, i)``: two cohorts with different ``seed`` share no subject.
    ``lesion_radius_mm`` overrides the phantom's lesion size (``BrainConfig.lesion_radius_mm``).
    """
    from ..data import subject_seed
    from ..data.brain import BRAIN_CHANNELS, BrainConfig, make_brain_subject
    from ..progress import progress as bar

    for name, n in (("n_healthy", n_healthy), ("n_lesioned", n_lesioned)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {n!r}")
    if n_healthy + n_lesioned < 1:
        raise ValueError("n_healthy + n_lesioned: expected at least one subject")
    unknown = [c for c in channels if c not in BRAIN_CHANNELS]
    if unknown or not channels:
        raise ValueError(f"channels: expected names among {BRAIN_CHANNELS}, got {tuple(channels)}")
    cfg = BrainConfig(size=size)
    if lesion_radius_mm is not None:
        cfg = replace(cfg, lesion_radius_mm=tuple(float(r) for r in lesion_radius_mm))
    which = [BRAIN_CHANNELS.index(c) for c in channels]
    n = n_healthy + n_lesioned
    subjects = [make_brain_subject(subject_seed(seed, i), cfg, has_lesion=i >= n_healthy)
                for i in bar(range(n), desc=f"brains {size}³", disable=not progress)]
    image = np.stack([s["image"][..., which] for s in subjects])               # (N, D, H, W, C)
    return Cohort(image=torch.from_numpy(image).permute(0, 4, 1, 2, 3).contiguous(),   # (N, C, D, H, W)
                  label=torch.from_numpy(np.stack([s["label"] for s in subjects])),
                  displacement=torch.from_numpy(np.stack([s["displacement"] for s in subjects])),
                  attributes=[s["attributes"] for s in subjects],
                  spacing_mm=float(abs(subjects[0]["affine"][0, 0])))


def age_site_condition(attributes: Sequence[dict[str, Any]], n_sites: int = 3) -> torch.Tensor:
    """The CVAE's condition c: (N, 1 + n_sites) = (age / 100, one-hot site)."""
    rows = []
    for i, a in enumerate(attributes):
        site = int(a["site"])
        if not 0 <= site < n_sites:
            raise ValueError(f"attributes[{i}]: site {site} is outside [0, {n_sites - 1}]")
        rows.append([float(a["age"]) / 100.0] + [float(site == s) for s in range(n_sites)])
    return torch.tensor(rows, dtype=torch.float32)


# 2. Registration: between subject space and template space ---------------------------------------

def invert_displacement(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The displacement ``v`` of the inverse map: ``phi_u(phi_v(y)) = y``, by fixed-point iteration.

    From ``y + v(y) + u(y + v(y)) = y`` follows ``v = -u ∘ (id + v)``; iterating it converges
    for smooth, invertible maps whose displacement changes slowly (Chen et al. 2008).
    ``u``: (B, 3, D, H, W) in voxels.
    """
    v = -u
    for _ in range(iterations):
        v = -spatial.warp(u, v, padding_mode="border")
    return v


def to_template(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Subject-space volumes (B, C, D, H, W) moved into template space, given their maps ``u`` (B, 3, D, H, W).

    Template voxel y shows what the subject has at ``phi_u^{-1}(y)``: a pull through the inverse map.
    """
    return spatial.warp(x, invert_displacement(u.to(x.dtype)))


def to_subject(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Template-space volumes (B or 1, C, D, H, W) pulled into each subject's space: ``y(x + u(x))``."""
    if y.shape[0] == 1 and u.shape[0] > 1:
        y = y.expand(u.shape[0], *y.shape[1:])
    return spatial.warp(y, u.to(y.dtype))


# 3. Detectors --------------------------------------------------------------------------------------

def signed_residual(x: torch.Tensor, expected: torch.Tensor, polarity: str = "bright") -> torch.Tensor:
    """``x - expected`` (bright anomalies), ``expected - x`` (dark) or ``|x - expected|`` (both)."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity: expected one of {POLARITIES}, got {polarity!r}")
    r = x - expected
    return r if polarity == "bright" else -r if polarity == "dark" else r.abs()


class Detector:
    """Base class: ``detector(x, condition=None, displacement=None) -> (B, 1, D, H, W)``.

    ``in_channels``: the image channels it reads; ``spatial_shape``: the grid it was built for
    (None: any); ``needs``: the context it cannot work without ("condition", "displacement").
    """

    in_channels: int = 1
    spatial_shape: tuple[int, ...] | None = None
    needs: tuple[str, ...] = ()


@dataclass
class ZScoreAtlas(Detector):
    """Per-voxel healthy mean and standard deviation, ``z = (x - mean) / (std + eps)`` on ``channel``.

    With ``registered=True`` the statistics live in template space and are pulled into each
    subject through its displacement; with ``registered=False`` they are taken voxel by voxel
    in subject space, as if every brain had the same shape (they do not).
    """

    mean: torch.Tensor            # (1, C, D, H, W)
    std: torch.Tensor             # (1, C, D, H, W)
    channel: int = 0
    polarity: str = "bright"
    eps: float = 0.01             # floor on std: voxels outside the head have std ~ 0
    registered: bool = True

    @classmethod
    def fit(cls, images: torch.Tensor, *, registered: bool = True, channel: int = 0,
            polarity: str = "bright", eps: float = 0.01) -> "ZScoreAtlas":
        """Statistics of healthy ``images`` (N, C, D, H, W): in template space (see :func:`to_template`)
        when ``registered``, else as they come."""
        check_volume(images, "images", ndim=5)
        if images.shape[0] < 2:
            raise ValueError(f"images: a standard deviation needs at least 2 volumes, got {images.shape[0]}")
        if not 0 <= channel < images.shape[1]:
            raise ValueError(f"channel: expected an index in [0, {images.shape[1] - 1}], got {channel}")
        x = torch.as_tensor(images).float()
        return cls(mean=x.mean(0, keepdim=True), std=x.std(0, keepdim=True), channel=channel,
                   polarity=polarity, eps=eps, registered=registered)

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[2:])

    @property
    def needs(self) -> tuple[str, ...]:
        return ("displacement",) if self.registered else ()

    def expected(self, x: torch.Tensor, displacement: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The healthy mean and std at every voxel of each subject: each (B, C, D, H, W)."""
        if self.registered:
            return to_subject(self.mean, displacement), to_subject(self.std, displacement)
        b = x.shape[0]
        return self.mean.expand(b, -1, -1, -1, -1), self.std.expand(b, -1, -1, -1, -1)

    def __call__(self, x, condition=None, displacement=None):
        mean, std = self.expected(x, displacement)
        c = slice(self.channel, self.channel + 1)
        return signed_residual(x[:, c], mean[:, c], self.polarity) / (std[:, c] + self.eps)


@dataclass
class ResidualDetector(Detector):
    """``a = x - x_hat`` on one channel, ``x_hat`` the model's reconstruction at the posterior mean.

    ``model`` is a :class:`~gen3d_lessons.models.vae.VAE3D` (a CVAE if its ``cond_dim > 0``:
    then the condition is needed). With ``registered=True`` the model was trained in template
    space: the input goes there, is reconstructed, and the reconstruction comes back.
    """

    model: Any
    channel: int = 0
    polarity: str = "bright"
    registered: bool = True

    @property
    def in_channels(self) -> int:
        return int(self.model.cfg.in_channels)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return (int(self.model.cfg.size),) * 3

    @property
    def needs(self) -> tuple[str, ...]:
        return (("condition",) if self.model.cfg.cond_dim > 0 else ()) + (("displacement",) if self.registered else ())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, condition: torch.Tensor | None = None,
                    displacement: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat in the subject's space, (B, C, D, H, W)."""
        self.model.eval()
        if not self.registered:
            return self.model.reconstruct(x, condition)
        # 1. into template space, 2. reconstruct there, 3. back into the subject
        return to_subject(self.model.reconstruct(to_template(x, displacement), condition), displacement)

    def __call__(self, x, condition=None, displacement=None):
        c = slice(self.channel, self.channel + 1)
        return signed_residual(x[:, c], self.reconstruct(x, condition, displacement)[:, c], self.polarity)


@dataclass
class VQTransformerDetector(Detector):
    """Heal the code grid with the transformer, decode it, and take the residual.

    1. ``k = vqvae.codes(x)`` (in template space if ``registered``), read in raster order;
    2. walk the sequence in order: wherever ``p(k_t | k_<t) < threshold`` (given the codes
       before it, already healed), replace ``k_t`` by the transformer's most likely code —
       one forward pass per resampled code, all volumes of the batch in step;
    3. ``x_healed = vqvae.decode_codes(k_healed)`` and ``r = x - x_healed`` on ``channel``;
    4. ``a = r * (mask_floor + m)``, ``m`` the mask of resampled codes brought up to voxels and
       smoothed: the residual counts mostly where the transformer found something unlikely.

    Pinaya et al. drew the replacement from ``p(. | k_<t)``; taking the most likely code makes
    the map deterministic. ``max_resampled`` caps the number of replaced codes per volume.
    """

    vqvae: Any
    transformer: Any
    threshold: float = 0.01
    max_resampled: int = 64
    mask_floor: float = 0.1
    mask_sigma: float = 1.0       # voxels: how far the weight of a resampled code spreads
    channel: int = 0
    polarity: str = "bright"
    registered: bool = True

    @property
    def in_channels(self) -> int:
        return int(self.vqvae.cfg.in_channels)

    @property
    def needs(self) -> tuple[str, ...]:
        return ("displacement",) if self.registered else ()

    @torch.no_grad()
    def heal(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(healed codes (B, d, h, w), resampled mask (B, d, h, w) bool)."""
        from ..models.vqvae import to_grid, to_sequence

        self.transformer.eval()
        s = to_sequence(codes).clone()                                   # (B, T)
        B, T = s.shape
        resampled = torch.zeros_like(s, dtype=torch.bool)
        done_until = torch.zeros(B, dtype=torch.long, device=s.device)  # positions < this are final
        positions = torch.arange(T, device=s.device)
        for _ in range(self.max_resampled):
            logits = self.transformer(s)                                 # (B, T, K)
            p = logits.softmax(-1).gather(2, s.unsqueeze(2)).squeeze(2)  # (B, T): p(k_t | k_<t)
            unlikely = (p < self.threshold) & (positions[None] >= done_until[:, None])
            if not unlikely.any():
                break
            # the first unlikely position of each volume: its prefix is final, so p there is exact
            t = torch.where(unlikely.any(1), unlikely.float().argmax(1), torch.full_like(done_until, T))
            rows = torch.nonzero(t < T).squeeze(1)
            s[rows, t[rows]] = logits[rows, t[rows]].argmax(-1)
            resampled[rows, t[rows]] = True
            done_until = torch.where(t < T, t + 1, torch.full_like(t, T))
        shape = tuple(codes.shape[1:])
        return to_grid(s, shape), to_grid(resampled, shape)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, displacement: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_healed (B, C, D, H, W), weight of resampled codes (B, 1, D, H, W) in [0, 1]), subject space."""
        self.vqvae.eval()
        # 1. codes of the volume (in template space if registered), 2. heal them, 3. decode
        x_in = to_template(x, displacement) if self.registered else x
        healed, resampled = self.heal(self.vqvae.codes(x_in))
        x_healed = self.vqvae.decode_codes(healed)
        # the mask of resampled codes at voxel resolution, smoothed
        m = F.interpolate(resampled[:, None].float(), size=tuple(x.shape[2:]), mode="trilinear")
        m = spatial.gaussian_blur(m, self.mask_sigma).clamp(0.0, 1.0)
        if self.registered:
            x_healed, m = to_subject(x_healed, displacement), to_subject(m, displacement)
        return x_healed, m

    def __call__(self, x, condition=None, displacement=None):
        c = slice(self.channel, self.channel + 1)
        x_healed, m = self.reconstruct(x, displacement)
        return signed_residual(x[:, c], x_healed[:, c], self.polarity) * (self.mask_floor + m)


@dataclass
class StandardisedDetector(Detector):
    """Another detector's map as a z-score against its maps of *healthy* subjects, voxel by voxel.

    Even on healthy brains a model errs more at some places than at others (at tissue borders,
    where a blurry reconstruction misses the edge). Fitted on healthy subjects the model never
    trained on, ``mean`` and ``std`` of the map at every template voxel say how large the map
    usually is there, and ``a_std = (a - mean) / (std + eps)``: the atlas baseline's
    standardisation, applied to the residual instead of the image. Needs every subject's
    displacement.
    """

    detector: Detector
    mean: torch.Tensor            # (1, 1, D, H, W), template space
    std: torch.Tensor             # (1, 1, D, H, W)
    eps: float = 0.01

    @classmethod
    def fit(cls, detector: Detector, images: Any, *, displacement: Any, condition: Any = None,
            eps: float = 0.01) -> "StandardisedDetector":
        """Statistics of ``detector``'s maps of healthy ``images`` (N, C, D, H, W), in template space."""
        maps = score(detector, images, condition=condition, displacement=displacement)      # (N, 1, D, H, W)
        if maps.shape[0] < 2:
            raise ValueError(f"images: a standard deviation needs at least 2 volumes, got {maps.shape[0]}")
        in_template = to_template(maps, torch.as_tensor(displacement).float())
        device = _device_of(detector)
        return cls(detector=detector, mean=in_template.mean(0, keepdim=True).to(device),
                   std=in_template.std(0, keepdim=True).to(device), eps=eps)

    @property
    def in_channels(self) -> int:
        return self.detector.in_channels

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[2:])

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.detector.needs, "displacement")))

    def __call__(self, x, condition=None, displacement=None):
        a = self.detector(x, condition, displacement)
        return (a - to_subject(self.mean, displacement)) / (to_subject(self.std, displacement) + self.eps)


# 4. The checked entry point ----------------------------------------------------------------------

def _as_batch(a: Any, name: str, dims: int) -> tuple[torch.Tensor, bool]:
    """numpy or torch -> float tensor with a batch axis; True if the input had none."""
    what = {1: "(K,) or a batch (B, K)", 4: "(C, D, H, W) or a batch (B, C, D, H, W)"}[dims]
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise DataError(None, f"{name}: expected an array or tensor of shape {what}, got {type(a).__name__}")
    if len(a.shape) not in (dims, dims + 1):
        hint = {2: " (a 2D image? detectors score whole 3D volumes)",
                3: " (a volume without its channel axis? add one: x[None])"}.get(len(a.shape), "") if dims == 4 else ""
        raise DataError(None, f"{name}: expected shape {what}, got {tuple(a.shape)}{hint}")
    check_volume(a, name)
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
    single = t.ndim == dims
    return (t[None] if single else t), single


def score(detector: Detector, image: Any, *, condition: Any = None, displacement: Any = None) -> torch.Tensor:
    """The anomaly map of ``image`` under ``detector``, higher = more anomalous.

    ``image``: one volume (C, D, H, W) or a batch (B, C, D, H, W), numpy or torch, C matching
    the detector; ``condition``: (K,) or (B, K) for a CVAE; ``displacement``: (3, D, H, W) or
    (B, 3, D, H, W), subject voxel -> template voxel, for a registered detector. Returns
    (1, D, H, W) or (B, 1, D, H, W) like the input. Raises ``ValueError`` with the reason for bad input.
    """
    if not isinstance(detector, Detector):
        raise TypeError(f"detector: expected a ZScoreAtlas, ResidualDetector, VQTransformerDetector or "
                        f"StandardisedDetector, got {type(detector).__name__}")
    # 1. the image: 3D volume(s) with channels, finite, of the detector's channels and grid
    x, single = _as_batch(image, "image", 4)
    if x.shape[1] != detector.in_channels:
        raise DataError(None, f"image: expected {detector.in_channels} channel(s) (C, D, H, W), got shape "
                              f"{tuple(x.shape[1:])}; a channels-last (X, Y, Z, C) array must be moved "
                              f"to (C, X, Y, Z) first")
    grid = detector.spatial_shape
    if grid is not None and tuple(x.shape[2:]) != tuple(grid):
        raise DataError(None, f"image: this detector was built for volumes of {tuple(grid)} voxels, "
                              f"got {tuple(x.shape[2:])}; resample the volume first")
    # 2. the context: a condition (K,) per volume, a displacement (3, D, H, W) per volume
    context: dict[str, torch.Tensor | None] = {"condition": None, "displacement": None}
    for key, value, dims in (("condition", condition, 1), ("displacement", displacement, 4)):
        if value is None:
            if key in detector.needs:
                raise ValueError(f"{key}: {type(detector).__name__} needs a {key} for every volume")
            continue
        t, _ = _as_batch(value, key, dims)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"{key}: {t.shape[0]} given for {x.shape[0]} volume(s)")
        if key == "displacement" and tuple(t.shape[1:]) != (3, *x.shape[2:]):
            raise DataError(None, f"displacement: expected shape (3, {', '.join(map(str, x.shape[2:]))}) per "
                                  f"volume, got {tuple(t.shape[1:])}")
        inner = detector.detector if isinstance(detector, StandardisedDetector) else detector
        k = getattr(getattr(getattr(inner, "model", None), "cfg", None), "cond_dim", None)
        if key == "condition" and k is not None and t.shape[1] != k:
            raise ValueError(f"condition: this model takes {k} values per volume, got {t.shape[1]}")
        context[key] = t
    # 3. the map, on the detector's device, returned on the CPU
    device = _device_of(detector)
    with torch.no_grad():
        a = detector(x.to(device), **{k: (v.to(device) if v is not None else None) for k, v in context.items()})
    a = a.float().cpu()
    return a[0] if single else a


def score_cohort(detector: Detector, cohort: Cohort, batch: int = 16) -> torch.Tensor:
    """The map of every subject of ``cohort`` under ``detector``, (N, D, H, W), ``batch`` subjects at a time.

    Each subject's displacement goes along, and its condition (:func:`age_site_condition`) where
    the detector needs one; a batch bounds the memory a detector needs, not the result.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    condition = age_site_condition(cohort.attributes) if "condition" in detector.needs else None
    parts = range(0, len(cohort), batch)
    return torch.cat([score(detector, cohort.image[i:i + batch], displacement=cohort.displacement[i:i + batch],
                            condition=None if condition is None else condition[i:i + batch])[:, 0] for i in parts])


def _device_of(detector: Detector) -> torch.device:
    if isinstance(detector, StandardisedDetector):
        return _device_of(detector.detector)
    for attr in ("model", "vqvae", "mean"):
        obj = getattr(detector, attr, None)
        if isinstance(obj, torch.Tensor):
            return obj.device
        if obj is not None and hasattr(obj, "parameters"):
            return next(obj.parameters()).device
    return torch.device("cpu")


__all__ = ["Cohort", "phantom_cohort", "age_site_condition", "invert_displacement", "to_template", "to_subject",
           "Detector", "ZScoreAtlas", "ResidualDetector", "VQTransformerDetector", "StandardisedDetector", "score",
           "score_cohort", "signed_residual"]
