"""Unsupervised anomaly detection: learn what healthy looks like, flag what does not fit.

Every detector turns a volume ``x: (B, C, D, H, W)`` into an anomaly map ``a: (B, 1, D, H, W)``
(higher = more anomalous) after seeing healthy volumes only:

* :class:`ZScoreAtlas` — the classical baseline: bring every healthy subject into the shared
  template space, keep a per-voxel mean and standard deviation, and score a new subject by the
  z-score of each voxel against the healthy voxels at the same anatomical place. It needs each
  subject's map to the template (a registration; our phantoms come with the exact one).
* :class:`ResidualDetector` — a VAE or CVAE trained on healthy volumes reconstructs the healthy
  version of its input; the residual ``x - x_hat`` is large where the input is not healthy
  (after Uzunova et al. 2019, who used a CVAE).
* :class:`VQTransformerDetector` — a VQ-VAE turns the volume into a grid of codes, an
  autoregressive transformer gives every code its probability given the codes before it, codes
  less likely than a threshold are *resampled* (replaced by the transformer's most likely code),
  and the residual against the decoded "healed" grid is the anomaly map (after Pinaya et al. 2022).

:func:`score` is the checked entry point: ``score(detector, image, condition=..., displacement=...)``.
:func:`evaluate` measures maps against lesion masks: voxel-level AUROC and AUPRC, the best Dice
any threshold of the map reaches, and a volume-level AUROC (healthy vs. lesioned subjects).

Lesions in our phantoms are bright on FLAIR and T2, so the maps are *signed* by default
(``polarity="bright"``: ``x - x_hat``): a voxel darker than expected is less suspicious than one
that matches, which is what a radiologist looking for hyperintensities wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from . import spatial
from .data.errors import DataError
from .data.io import check_volume

POLARITIES = ("bright", "dark", "both")


# 1. Shared pieces ------------------------------------------------------------------------------

def signed_residual(x: torch.Tensor, expected: torch.Tensor, polarity: str = "bright") -> torch.Tensor:
    """``x - expected`` (bright anomalies), ``expected - x`` (dark) or ``|x - expected|`` (both)."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity: expected one of {POLARITIES}, got {polarity!r}")
    r = x - expected
    return r if polarity == "bright" else -r if polarity == "dark" else r.abs()


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


class Detector:
    """Base class: ``detector(x, condition=None, displacement=None) -> (B, 1, D, H, W)``.

    ``in_channels`` is the number of image channels the detector reads; ``needs`` names the
    context it cannot work without ("condition", "displacement").
    """

    in_channels: int = 1
    needs: tuple[str, ...] = ()

    def __call__(self, x: torch.Tensor, condition: torch.Tensor | None = None,
                 displacement: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


# 2. The baseline: voxel-wise z-score against the healthy cohort in template space --------------

@dataclass
class ZScoreAtlas(Detector):
    """Per-voxel healthy mean and standard deviation in template space.

    ``fit`` warps every healthy subject into the template (its displacement maps subject voxel x
    to template voxel x + u(x); we pull the image back through the inverse map). A new subject
    is scored in its own space: the template statistics are pulled into it through its own
    displacement, and ``z = (x - mean) / (std + eps)`` on ``channel``.
    """

    mean: torch.Tensor            # (1, C, D, H, W), template space
    std: torch.Tensor             # (1, C, D, H, W)
    channel: int = 0
    polarity: str = "bright"
    eps: float = 0.01             # floor on std: voxels outside the head have std ~ 0
    needs = ("displacement",)

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[1])

    @classmethod
    def fit(cls, images: torch.Tensor, displacements: torch.Tensor, channel: int = 0,
            polarity: str = "bright", eps: float = 0.01, chunk: int = 32) -> "ZScoreAtlas":
        """Statistics of healthy ``images`` (N, C, D, H, W) given their ``displacements`` (N, 3, D, H, W)."""
        check_volume(images, "images", ndim=5)
        check_volume(displacements, "displacements", shape=(images.shape[0], 3, *images.shape[2:]))
        if not 0 <= channel < images.shape[1]:
            raise ValueError(f"channel: expected an index in [0, {images.shape[1] - 1}], got {channel}")
        total = torch.zeros(1, *images.shape[1:])
        total_sq = torch.zeros(1, *images.shape[1:])
        with torch.no_grad():
            for i in range(0, images.shape[0], chunk):      # batched warps, bounded memory
                u = displacements[i:i + chunk].float()
                in_template = spatial.warp(images[i:i + chunk].float(), invert_displacement(u))
                total += in_template.sum(0, keepdim=True)
                total_sq += in_template.pow(2).sum(0, keepdim=True)
        n = images.shape[0]
        mean = total / n
        std = (total_sq / n - mean.pow(2)).clamp_min(0.0).sqrt() * (n / max(n - 1, 1)) ** 0.5
        return cls(mean=mean, std=std, channel=channel, polarity=polarity, eps=eps)

    def expected(self, displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The healthy mean and std pulled into subject space: each (B, C, D, H, W)."""
        b = displacement.shape[0]
        mean = spatial.warp(self.mean.expand(b, -1, -1, -1, -1), displacement)
        std = spatial.warp(self.std.expand(b, -1, -1, -1, -1), displacement)
        return mean, std

    def __call__(self, x, condition=None, displacement=None):
        mean, std = self.expected(displacement)
        c = slice(self.channel, self.channel + 1)
        return signed_residual(x[:, c], mean[:, c], self.polarity) / (std[:, c] + self.eps)


# 3. Reconstruction residuals of a VAE / CVAE (after Uzunova et al.) -----------------------------

@dataclass
class ResidualDetector(Detector):
    """``a = x - x_hat`` on one channel, ``x_hat`` the model's reconstruction at the posterior mean.

    ``model`` is a :class:`~gen3d_lessons.models.vae.VAE3D` (a CVAE if its ``cond_dim > 0``:
    then the condition is needed).
    """

    model: Any
    channel: int = 0
    polarity: str = "bright"

    @property
    def in_channels(self) -> int:
        return int(self.model.cfg.in_channels)

    @property
    def needs(self) -> tuple[str, ...]:
        return ("condition",) if self.model.cfg.cond_dim > 0 else ()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self.model.eval()
        return self.model.reconstruct(x, condition)

    def __call__(self, x, condition=None, displacement=None):
        c = slice(self.channel, self.channel + 1)
        return signed_residual(x[:, c], self.reconstruct(x, condition)[:, c], self.polarity)


# 4. VQ-VAE + transformer: resample unlikely codes, then the residual (after Pinaya et al.) ------

@dataclass
class VQTransformerDetector(Detector):
    """Heal the code grid with the transformer, decode it, and take the residual.

    1. ``k = vqvae.codes(x)``, read in raster order;
    2. walk the sequence in order: wherever ``p(k_t | k_<t) < threshold`` (given the codes
       before it, already healed), replace ``k_t`` by the transformer's most likely code —
       one forward pass per resampled code, all volumes of the batch in step;
    3. ``x_healed = vqvae.decode_codes(k_healed)`` and ``a = x - x_healed`` on ``channel``.

    Pinaya et al. drew the replacement from ``p(. | k_<t)``; taking the most likely code makes
    the map deterministic. ``max_resampled`` caps the number of replaced codes per volume.
    """

    vqvae: Any
    transformer: Any
    threshold: float = 0.01
    max_resampled: int = 64
    channel: int = 0
    polarity: str = "bright"

    @property
    def in_channels(self) -> int:
        return int(self.vqvae.cfg.in_channels)

    @torch.no_grad()
    def heal(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(healed codes (B, d, h, w), resampled mask (B, d, h, w) bool)."""
        from .models.vqvae import to_grid, to_sequence

        self.transformer.eval()
        s = to_sequence(codes).clone()                                   # (B, T)
        B, T = s.shape
        resampled = torch.zeros_like(s, dtype=torch.bool)
        done_until = torch.zeros(B, dtype=torch.long, device=s.device)  # positions < this are final
        positions = torch.arange(T, device=s.device)
        for _ in range(self.max_resampled):
            logits = self.transformer(s)                                 # (B, T, K)
            p = logits.softmax(-1).gather(2, s.unsqueeze(2)).squeeze(2)  # (B, T)
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
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_healed (B, C, D, H, W), resampled mask (B, d, h, w))."""
        self.vqvae.eval()
        healed, resampled = self.heal(self.vqvae.codes(x))
        return self.vqvae.decode_codes(healed), resampled

    def __call__(self, x, condition=None, displacement=None):
        c = slice(self.channel, self.channel + 1)
        x_healed, _ = self.reconstruct(x)
        return signed_residual(x[:, c], x_healed[:, c], self.polarity)


# 5. The checked entry point ----------------------------------------------------------------------

def _as_batch(a: Any, name: str, dims: int) -> tuple[torch.Tensor, bool]:
    """numpy or torch -> float tensor with a batch axis; True if the input had none."""
    check_volume(a, name, ndim=(dims, dims + 1))
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
    single = t.ndim == dims
    return (t[None] if single else t), single


def score(detector: Detector, image: Any, *, condition: Any = None, displacement: Any = None) -> torch.Tensor:
    """The anomaly map of ``image`` under ``detector``, higher = more anomalous.

    ``image``: one volume (C, D, H, W) or a batch (B, C, D, H, W), numpy or torch, C matching
    the detector; ``condition``: (K,) or (B, K) for a CVAE; ``displacement``: (3, D, H, W) or
    (B, 3, D, H, W), subject voxel -> template voxel, for :class:`ZScoreAtlas`. Returns (1, D, H, W)
    or (B, 1, D, H, W) like the input. Raises ``ValueError`` with the reason for bad input.
    """
    if not isinstance(detector, Detector):
        raise TypeError(f"detector: expected a ZScoreAtlas, ResidualDetector or VQTransformerDetector, "
                        f"got {type(detector).__name__}")
    x, single = _as_batch(image, "image", 4)
    if x.shape[1] != detector.in_channels:
        raise DataError(None, f"image: expected {detector.in_channels} channel(s) (C, D, H, W), got shape "
                              f"{tuple(x.shape[1:])}; a channels-last (X, Y, Z, C) array must be moved "
                              f"to (C, X, Y, Z) first")
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
        context[key] = t
    device = _device_of(detector)
    with torch.no_grad():
        a = detector(x.to(device), **{k: (v.to(device) if v is not None else None) for k, v in context.items()})
    a = a.float().cpu()
    return a[0] if single else a


def _device_of(detector: Detector) -> torch.device:
    for attr in ("model", "vqvae", "mean"):
        obj = getattr(detector, attr, None)
        if isinstance(obj, torch.Tensor):
            return obj.device
        if obj is not None and hasattr(obj, "parameters"):
            return next(obj.parameters()).device
    return torch.device("cpu")


# 6. Evaluation -----------------------------------------------------------------------------------

def _numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if hasattr(a, "dtype") and a.dtype == np.bool_:
        a = a.astype(np.uint8)              # masks may be boolean; check_volume wants numbers
    check_volume(a, name)
    return np.asarray(a)


def _pooled(maps: Any, lesions: Any, brains: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 0/1 truth of every voxel inside the brain masks, all volumes pooled."""
    a = _numpy(maps, "maps").astype(np.float64)
    y = _numpy(lesions, "lesions")
    m = _numpy(brains, "brains")
    if a.shape != y.shape or a.shape != m.shape:
        raise ValueError(f"maps {a.shape}, lesions {y.shape} and brains {m.shape} must have one shape")
    for arr, name in ((y, "lesions"), (m, "brains")):
        if not np.isin(np.unique(arr), (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (0/1 or bool), found values {np.unique(arr)[:6]}")
    inside = m.astype(bool)
    if not inside.any():
        raise ValueError("brains: the masks select no voxel")
    return a[inside], y[inside].astype(bool)


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The highest Dice of ``scores >= t`` over all thresholds t, and that t.

    Dice = 2 TP / (2 TP + FP + FN) = 2 P R / (P + R): the best point of the precision-recall curve.
    An upper bound on what a threshold chosen without labels can reach.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(truth, scores)
    dice = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(dice[:-1])) if len(thresholds) else 0
    return float(dice[i]), float(thresholds[i]) if len(thresholds) else float("nan")


def voxel_metrics(maps: Any, lesions: Any, brains: Any) -> dict[str, float]:
    """Voxel-level AUROC, AUPRC (average precision) and best Dice, all brain voxels pooled.

    ``maps``, ``lesions`` (0/1) and ``brains`` (0/1): same shape, e.g. (N, D, H, W).
    The AUPRC of a random map is the lesion fraction, reported as ``lesion_fraction``.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, y = _pooled(maps, lesions, brains)
    if y.all() or not y.any():
        raise ValueError("lesions: need both lesion and healthy voxels inside the brains to score a map")
    dice, threshold = best_dice(s, y)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "best_dice": dice, "best_threshold": threshold, "lesion_fraction": float(y.mean())}


def volume_scores(maps: Any, brains: Any, top: float = 0.002) -> np.ndarray:
    """One number per volume: the mean of its ``top`` fraction of highest in-brain scores, (N,)."""
    a = _numpy(maps, "maps").astype(np.float64)
    m = _numpy(brains, "brains").astype(bool)
    if a.shape != m.shape or a.ndim < 2:
        raise ValueError(f"maps {a.shape} and brains {m.shape}: expected one shape (N, D, H, W)")
    if not 0 < top <= 1:
        raise ValueError(f"top: expected a fraction in (0, 1], got {top}")
    out = []
    for ai, mi in zip(a, m):
        v = np.sort(ai[mi])[::-1]
        if v.size == 0:
            raise ValueError("brains: a volume's mask selects no voxel")
        out.append(v[: max(1, int(round(top * v.size)))].mean())
    return np.asarray(out)


def evaluate(maps: Any, lesions: Any, brains: Any, has_lesion: Sequence[bool] | None = None,
             top: float = 0.002) -> dict[str, float]:
    """The chapter's four numbers for one method: voxel AUROC, AUPRC, best Dice, volume AUROC.

    ``maps``, ``lesions``, ``brains``: (N, D, H, W) over the test volumes (healthy ones included:
    their false positives count). ``has_lesion``: (N,) for the volume-level AUROC (by default
    whether a volume's lesion mask is non-empty).
    """
    from sklearn.metrics import roc_auc_score

    out = voxel_metrics(maps, lesions, brains)
    y = _numpy(lesions, "lesions")
    has = (y.reshape(len(y), -1).any(1) if has_lesion is None else np.asarray(has_lesion, dtype=bool))
    if has.shape != (len(y),):
        raise ValueError(f"has_lesion: expected {len(y)} values, got shape {has.shape}")
    if has.all() or not has.any():
        out["volume_auroc"] = float("nan")         # needs healthy and lesioned volumes
    else:
        out["volume_auroc"] = float(roc_auc_score(has, volume_scores(maps, brains, top)))
    return out


__all__ = ["Detector", "ZScoreAtlas", "ResidualDetector", "VQTransformerDetector", "score", "evaluate",
           "voxel_metrics", "volume_scores", "best_dice", "invert_displacement", "signed_residual"]
