"""The book's yardstick for generated 3D volumes: one table, the same in every synthesis chapter.

How good is a set of generated brains? No single number says it, so every synthesis chapter
prints the same columns, each answering one question, for its model *and* for reference rows
measured in the same run:

====================  ==============================================================  ============
column                question                                                        space
====================  ==============================================================  ============
``fd``                do the samples' features have the real mean and covariance?     encoder
``kid``               the same, without FD's small-sample bias (unbiased, ± std)      encoder
``mmd``               the same with an RBF kernel (:func:`gen3d_lessons.metrics.mmd`) encoder
``one_nn``            can a 1-nearest-neighbour classifier tell samples from reals?   encoder
``ms_ssim``           how alike are two samples? (compare with ``ms_ssim_real``)      voxels
``mem_ratio``         are samples nearer the training set than new real brains are?   voxels
``mem_frac``          which fraction of samples is nearer a training brain than any   voxels
                      held-out real brain is?
====================  ==============================================================  ============

"Encoder" is the feature space of a small 3D network (:class:`~gen3d_lessons.models.encoder.Encoder3D`)
trained here, once, on the phantoms' training split to predict age, site, lesions and tissue
volumes (with the augmentations and weight decay of :data:`RECIPE`, without which it memorises
the ~50 training brains), then frozen and cached with the version of the data it saw
(:func:`load_or_train_encoder`). FD and KID computed in it are "FD / KID in our encoder": they
rank models on this cohort; they are not comparable with FID numbers from 2D papers.

Every chapter gets the same encoder: call ``load_or_train_encoder(ensure_dataset("brain"),
size=run.size)`` with the other arguments left at their defaults. The step cap ends its
training (about 15–25 s on one CPU core at 32³), the clock only guards against a stuck
machine, and a file lock makes two chapters that miss the cache at once train it once.
:func:`memorisation_passed` is the pass/fail rule of the memorisation columns, and
:func:`fd_probe` follows FD while a generator trains.

The reference rows (:func:`reference_rows`) say what the numbers mean on this cohort:

- **held-out real** — real brains the generator never saw, scored like samples: the floor,
  the best a generator can hope for with this many samples;
- **mean + noise** — the voxel-wise mean training volume plus independent Gaussian noise with
  the voxel-wise standard deviation: right first and second moments per voxel, no anatomy;
- **copy of training** — training volumes returned as "samples": perfect-looking numbers
  everywhere except the memorisation columns, which is why those columns exist.

Shapes: volumes ``(N, C, D, H, W)`` (tensors or arrays, in the dataset's intensity units as
:class:`~gen3d_lessons.data.datasets.VolumeDataset` serves them); features ``(N, F)``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from ..data import data_root
from ..data.datasets import VolumeDataset, read_dataset
from ..data.io import check_volume
from ..metrics import _features, _sq_dists, mmd
from ..models.encoder import Encoder3D, EncoderConfig
from ..training import fit, load_model, save_model
from ..profiles import step_cap

__all__ = ["frechet_distance", "kid", "mmd", "one_nn_accuracy", "ms_ssim", "ms_ssim_diversity", "memorisation",
           "data_version", "load_volumes", "encoder_step", "YardstickEncoder", "load_or_train_encoder",
           "evaluate_samples", "mean_noise_baseline", "reference_rows", "table", "memorisation_passed", "fd_probe",
           "RECIPE", "ENCODER_STEPS"]


# 1. Distances between two sets of features (N, F) and (M, F) ---------------------------------

def _pair(feats_a: Any, feats_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")   # (N, F), (M, F) float64
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_b: {b.shape[1]} features per sample do not match feats_a's {a.shape[1]}")
    return a, b


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, our encoder).

    ``FD = ||mu_a − mu_b||² + Tr(S_a + S_b − 2 (S_a S_b)^{1/2})`` (Heusel et al. 2017), with
    ``mu`` the feature means and ``S`` the sample covariances. 0 for identical sets.

    With fewer samples than features the covariances are singular; ``scipy.linalg.sqrtm`` then
    returns a matrix with tiny imaginary parts (rounding), which are dropped. If the square root
    is not finite, or its imaginary part is not tiny, ``eps · I`` is added to both covariances
    and it is taken again. FD is biased upwards by small samples: compare rows that use the
    same numbers of samples.
    """
    a, b = _pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)                                   # (F,)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))                        # (F, F)
    s_b = np.atleast_2d(np.cov(b, rowvar=False))

    def sqrt_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "matrix is singular": handled below
            root = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(root).all():
            return None
        if np.iscomplexobj(root):
            scale = max(1.0, float(np.abs(root).max()))
            if np.abs(root.imag).max() > 1e-3 * scale:
                return None
            root = root.real
        return root

    root = sqrt_product(s_a, s_b)
    if root is None:                                   # regularise the singular covariances
        offset = eps * np.eye(len(s_a))
        root = sqrt_product(s_a + offset, s_b + offset)
        if root is None:
            raise FloatingPointError("frechet_distance: the covariance square root is not finite even with "
                                     f"eps={eps}; pass a larger eps")
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(root))


def _mmd2_unbiased(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> float:
    """Unbiased MMD² from the three kernel matrices (diagonals of the within-set ones dropped)."""
    n, m = len(k_aa), len(k_bb)
    return float((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2.0 * k_ab.mean())


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID, Bińkowski et al. 2018): mean and std of unbiased MMD² over subsets.

    The kernel is the cubic polynomial ``k(x, y) = (xᵀy / F + 1)³``. Each of ``subsets`` rounds
    draws ``min(subset_size, N, M)`` samples from each set without replacement and computes the
    unbiased MMD² (so KID is about 0, possibly slightly negative, for one distribution, whatever
    the sample size: unlike FD it has no small-sample bias). Returns ``(mean, std)``.
    """
    a, b = _pair(feats_a, feats_b)
    if not (isinstance(subsets, int) and subsets >= 1 and isinstance(subset_size, int) and subset_size >= 2):
        raise ValueError(f"subsets >= 1 and subset_size >= 2 must be integers, got {subsets!r}, {subset_size!r}")
    f = a.shape[1]
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)

    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / f + 1.0) ** 3

    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        values.append(_mmd2_unbiased(k(x, x), k(y, y), k(x, y)))
    return float(np.mean(values)), float(np.std(values))


def one_nn_accuracy(feats_a: Any, feats_b: Any) -> float:
    """Leave-one-out 1-nearest-neighbour two-sample test (Lopez-Paz & Oquab 2017).

    Pool both sets, label each point by its set, and classify every point by the label of its
    nearest *other* point (Euclidean). Returns the balanced accuracy (mean of the two sets'
    accuracies), which equals plain accuracy when N = M and stays near 0.5 for one distribution
    when the sets differ in size. 0.5: indistinguishable; 1.0: separable; **below 0.5**: samples
    sit on top of reals, the signature of copies (each copy's neighbour is its original).
    """
    a, b = _pair(feats_a, feats_b)
    x = np.concatenate([a, b])                                         # (N + M, F)
    label = np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
    d2 = _sq_dists(x, x)
    np.fill_diagonal(d2, np.inf)                                       # leave one out
    correct = label[d2.argmin(1)] == label
    return float(0.5 * (correct[~label].mean() + correct[label].mean()))


# 2. Voxel-space statistics: diversity and memorisation ----------------------------------------

# The first three of Wang et al.'s (2003) five MS-SSIM scale weights, renormalised: at 32³ there
# is room for three scales (32³, 16³, 8³), not five.
MS_SSIM_WEIGHTS = tuple(w / (0.0448 + 0.2856 + 0.3001) for w in (0.0448, 0.2856, 0.3001))


def _ms_ssim_kernel(edge: int) -> int:
    """The largest Gaussian window (5 or 3) that MONAI accepts for three scales at this edge.

    MONAI requires ``edge // (len(weights) − 1)² > kernel_size − 1``, i.e. ``edge // 4 >= k``.
    """
    for k in (5, 3):
        if edge // (len(MS_SSIM_WEIGHTS) - 1) ** 2 > k - 1:
            return k
    raise ValueError(f"volumes: an edge of {edge} voxels is too small for 3-scale MS-SSIM (need >= 12)")


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """MS-SSIM of each pair ``(x[i], y[i])`` with MONAI, 3 scales, window 5 (3 below 20³): (B,).

    ``x`` and ``y`` are (B, C, D, H, W) with the same shape; 1 for identical volumes.
    """
    from monai.metrics.regression import compute_ms_ssim

    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"x, y: expected two (B, C, D, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    k = _ms_ssim_kernel(min(x.shape[2:]))
    return compute_ms_ssim(x.float(), y.float(), spatial_dims=3, data_range=float(data_range), kernel_size=k,
                           kernel_sigma=1.5 if k == 5 else 1.0, weights=MS_SSIM_WEIGHTS)[:, 0]


def ms_ssim_diversity(volumes: Any, data_range: float, max_pairs: int = 100, seed: int = 0,
                      batch_size: int = 25) -> float:
    """Mean MS-SSIM over random pairs of distinct volumes of one set (Odena et al. 2017).

    Lower means more diverse. Alone it means little: compare with the same statistic on real
    volumes. Samples much *more* alike than real pairs are a sign of mode collapse; mean + noise
    samples are alike in their anatomy and differ only in noise. ``data_range`` must be the same
    for every set compared (e.g. the training volumes' max − min). Uses all pairs if there are at
    most ``max_pairs``, else ``max_pairs`` random ones.
    """
    v = _volumes(volumes, "volumes")
    n = len(v)
    if n < 2:
        raise ValueError(f"volumes: need at least 2 volumes for pairs, got {n}")
    i, j = np.triu_indices(n, k=1)
    if len(i) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
        i, j = i[pick], j[pick]
    values = [ms_ssim(v[i[s:s + batch_size]], v[j[s:s + batch_size]], data_range)
              for s in range(0, len(i), batch_size)]
    return float(torch.cat(values).mean())


def memorisation(samples: Any, train: Any, heldout: Any) -> dict[str, float]:
    """Are samples closer to the training set than to new real volumes? (voxel space)

    For every sample ``s``: ``a(s)``, its distance to the nearest training volume, and ``b(s)``,
    its distance to the nearest held-out real volume; ``q(s) = a(s) / b(s)``. A copy of a
    training volume has ``q = 0``. A new brain, however good or bad, is about as near the
    training set as it is near other new brains. The same ``q`` for every held-out real volume
    (with ``b`` its distance to the nearest *other* held-out volume; a sample identical to a
    held-out volume is treated the same way) calibrates what "as near" means with these set
    sizes. Distances are RMS differences over voxels divided by the standard deviation of the
    training voxels (0: an exact copy; about 1.4: two unrelated images of the same contrast).
    Returns:

    - ``mem_ratio = median q(samples) / median q(held-out)``: about 1 when samples are no nearer
      the training set than new brains are, well below 1 for a generator that reproduces training
      volumes, 0 for copies.
    - ``mem_frac``: the fraction of samples that look copied, with ``q`` below half the median
      ``q`` of the held-out volumes: at least twice as near a training volume, relative to other
      new brains, as a typical new brain is (about 0 for held-out volumes, 1 for copies).
    - ``mem_median``: ``median a(samples)``, and ``mem_median_heldout``: ``median a(held-out)``.

    Why the ratio to the distance to held-out volumes, and not ``a`` alone: a blurry sample (the
    average brain, say) is close in voxel space to *every* brain, training or not; measured by
    ``a`` alone it would look like memorisation. Voxel space, not feature space, because a copy
    is a copy voxel by voxel, whereas the encoder could map two different brains onto nearby
    features; the cost is that a copy shifted by a voxel no longer looks close. Inputs may also
    be feature arrays (N, F). Needs at least 2 held-out volumes.
    """
    s, t, h = (_features(a, name) for a, name in ((samples, "samples"), (train, "train"), (heldout, "heldout")))
    if not s.shape[1] == t.shape[1] == h.shape[1]:
        raise ValueError(f"samples, train, heldout: need the same number of voxels per volume, got "
                         f"{s.shape[1]}, {t.shape[1]}, {h.shape[1]}")
    scale = float(t.std()) * math.sqrt(t.shape[1])                     # ||x - y|| -> RMS in units of std
    if scale == 0:
        raise ValueError("train: all training voxels are equal, distances cannot be normalised")

    def nearest_other(d2: np.ndarray) -> np.ndarray:                   # nearest non-identical volume
        d2 = np.where(d2 <= 1e-12 * scale ** 2, np.inf, d2)
        return np.sqrt(d2.min(1)) / scale

    a_s = np.sqrt(_sq_dists(s, t).min(1)) / scale                       # (N,) to the nearest training volume
    a_h = np.sqrt(_sq_dists(h, t).min(1)) / scale                       # (M,)
    b_s, b_h = nearest_other(_sq_dists(s, h)), nearest_other(_sq_dists(h, h))   # to the nearest held-out one
    q_s, q_h = a_s / np.maximum(b_s, 1e-12), a_h / np.maximum(b_h, 1e-12)
    return {"mem_ratio": float(np.median(q_s) / max(np.median(q_h), 1e-12)),
            "mem_frac": float((q_s < 0.5 * np.median(q_h)).mean()),
            "mem_median": float(np.median(a_s)), "mem_median_heldout": float(np.median(a_h))}


# 3. The encoder: data version, training, cache -----------------------------------------------

def _volumes(x: Any, name: str, shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """A checked float32 CPU tensor (N, C, D, H, W)."""
    check_volume(x, name, ndim=5, shape=shape)
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.float()


def data_version(folder: str | Path, size: int, channels: Sequence[str | int]) -> dict[str, Any]:
    """What the encoder was trained on: dataset folder name, manifest hash, size and channels.

    The manifest (``manifest.csv``; ``dataset.json`` for real MSD folders without one) lists
    every file with its SHA-256, so its hash changes whenever a volume or attribute changes.
    """
    folder = Path(folder)
    listing = folder / "manifest.csv" if (folder / "manifest.csv").is_file() else folder / "dataset.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.csv or dataset.json; is this a dataset folder?")
    return {"dataset": folder.name, "manifest_sha256": hashlib.sha256(listing.read_bytes()).hexdigest()[:16],
            "size": int(size), "channels": [c if isinstance(c, str) else int(c) for c in channels]}


def load_volumes(folder: str | Path, split: str, size: int = 32,
                 channels: Sequence[str | int] = ("T1",)) -> torch.Tensor:
    """All images of one split as one tensor (N, C, size, size, size), float32."""
    ds = VolumeDataset(folder, split, keys=("image",), channels=list(channels), size=size)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def _targets(folder: Path, split: str, size: int, channels: Sequence[str | int]) -> dict[str, torch.Tensor]:
    """Images and raw targets of one split: image, age, site, lesion, volumes (CSF, GM, WM in ml)."""
    ds = VolumeDataset(folder, split, keys=("image",), channels=list(channels), size=size)
    items = [ds[i] for i in range(len(ds))]
    for key in ("age", "site", "has_lesion", "csf_ml", "gm_ml", "wm_ml"):
        if key not in items[0]:
            raise ValueError(f"{folder}: cases have no attribute {key!r}; the yardstick encoder needs the brain "
                             "phantoms' age, site, has_lesion, csf_ml, gm_ml, wm_ml")
    return {"image": torch.stack([it["image"] for it in items]),                           # (N, C, D, H, W)
            "age": torch.stack([it["age"].float() for it in items]),                       # (N,)
            "site": torch.stack([it["site"].long() for it in items]),                      # (N,)
            "lesion": torch.stack([it["has_lesion"].float() for it in items]),             # (N,)
            "volumes": torch.stack([torch.stack([it[k].float() for k in ("csf_ml", "gm_ml", "wm_ml")])
                                    for it in items])}                                     # (N, 3)


# How the encoder is trained beyond the settings a caller may change. Part of the cache key, so
# that a change here retrains it. Without augmentation and weight decay the encoder memorises the
# ~50 training brains: held-out brains then land as far from the training set in feature space
# as the mean-plus-noise baseline does, and the yardstick cannot tell a real brain from noise.
RECIPE = {"augment": {"flip_lr": 0.5, "shift_voxels": 2, "gain": 0.1}, "weight_decay": 0.05, "optimizer": "AdamW"}
ENCODER_STEPS = 1500          # the default step cap: the number that ends training, on any machine


class _ShuffledBatches:
    """Batches of a dict of tensors in a seeded random order, a fresh order each pass.

    Augmentations that change none of the targets: each volume is mirrored along its first
    spatial axis (left-right in the phantoms) with probability ``flip_lr``, shifted by up to
    ``shift_voxels`` voxels along each axis (a circular shift: the phantoms have an empty
    border), and its intensities scaled by a gain in ``1 ± gain``.
    """

    def __init__(self, data: Mapping[str, torch.Tensor], batch_size: int, seed: int,
                 flip_lr: float = 0.5, shift_voxels: int = 0, gain: float = 0.0):
        self.data, self.batch_size = data, min(batch_size, len(data["image"]))
        self.flip_lr, self.shift, self.gain = flip_lr, int(shift_voxels), gain
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.data["image"])
        order = torch.randperm(n, generator=self.g)
        for s in range(0, n - self.batch_size + 1, self.batch_size):       # drop the last partial batch
            idx = order[s:s + self.batch_size]
            batch = {k: v[idx] for k, v in self.data.items()}
            x, b = batch["image"], len(idx)                                   # (B, C, D, H, W)
            flip = torch.rand(b, generator=self.g) < self.flip_lr             # (B,)
            x = torch.where(flip[:, None, None, None, None], x.flip(2), x)
            if self.shift:
                shifts = torch.randint(-self.shift, self.shift + 1, (b, 3), generator=self.g).tolist()
                x = torch.stack([torch.roll(x[k], tuple(shifts[k]), dims=(1, 2, 3)) for k in range(b)])
            if self.gain:
                x = x * (1 + self.gain * (2 * torch.rand(b, 1, 1, 1, 1, generator=self.g) - 1))
            batch["image"] = x
            yield batch


def encoder_step(model: Encoder3D, optimizer: torch.optim.Optimizer,
                 batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """One multi-task step: age, volumes (MSE on standardised values), site (CE), lesion (BCE).

    The four losses are summed with weight 1: with standardised regression targets each starts
    near 1, like the classification losses.
    """
    device = next(model.parameters()).device
    # 1. data
    b = {k: v.to(device) for k, v in batch.items()}
    # 2. forward: every head from the same features
    model.train()
    out = model(b["image"])
    # 3. one loss per task
    losses = {"age": F.mse_loss(out["age"], b["age"]),
              "site": F.cross_entropy(out["site"], b["site"]),
              "lesion": F.binary_cross_entropy_with_logits(out["lesion"], b["lesion"]),
              "volumes": F.mse_loss(out["volumes"], b["volumes"])}
    loss = sum(losses.values())
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}


@dataclass
class YardstickEncoder:
    """A trained, frozen :class:`Encoder3D` with what it was trained on and how well it did.

    ``features(volumes) -> (N, F)`` NumPy array is all the metrics need. ``heldout`` holds the
    sanity check on the test split (age MAE, site and lesion accuracy, each beside the trivial
    predictor's); ``cached`` says whether it was loaded from ``path`` rather than trained now.
    """

    model: Encoder3D
    config: EncoderConfig
    data: dict[str, Any]                  # data_version(...)
    targets: dict[str, Any]               # means and stds that standardised age and volumes
    training: dict[str, Any]              # steps, seconds, stopped_by, max_steps, batch_size, lr, seed
    heldout: dict[str, float]
    path: Path
    cached: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def features(self, volumes: Any, batch_size: int = 16) -> np.ndarray:
        """Features (N, F) of volumes (N, C, size, size, size) in the dataset's intensity units."""
        s = self.config.size
        x = _volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s))
        self.model.eval()
        out = [self.model.features(x[i:i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, volumes: Any) -> dict[str, np.ndarray]:
        """The heads' predictions in natural units: age (years), site, lesion probability, volumes (ml)."""
        s = self.config.size
        x = _volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s)).to(self.device)
        self.model.eval()
        out = self.model(x)
        t = self.targets
        return {"age": (out["age"].cpu().numpy() * t["age_std"] + t["age_mean"]),
                "site": out["site"].argmax(1).cpu().numpy(),
                "lesion": torch.sigmoid(out["lesion"]).cpu().numpy(),
                "volumes": out["volumes"].cpu().numpy() * np.array(t["vol_std"]) + np.array(t["vol_mean"])}


def _heldout_report(enc: YardstickEncoder, train: Mapping[str, torch.Tensor],
                    test: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How well the heads predict the test split, beside the trivial predictor from the training split."""
    from sklearn.metrics import roc_auc_score

    p = enc.predict(test["image"])
    age, site, lesion, vols = (test[k].numpy() for k in ("age", "site", "lesion", "volumes"))
    train_age = train["age"].numpy()
    r2 = lambda y, yhat: float(1 - ((y - yhat) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))  # noqa: E731
    majority_site = np.bincount(train["site"].numpy()).argmax()
    majority_lesion = float(train["lesion"].numpy().mean() >= 0.5)
    both = 0 < lesion.sum() < len(lesion)
    return {"n_test": float(len(age)),
            "age_mae": float(np.abs(p["age"] - age).mean()),
            "age_mae_baseline": float(np.abs(train_age.mean() - age).mean()),   # predict the training mean
            "age_r2": r2(age, p["age"]),
            "site_acc": float((p["site"] == site).mean()),
            "site_acc_baseline": float((site == majority_site).mean()),         # predict the commonest site
            "lesion_acc": float(((p["lesion"] >= 0.5) == (lesion >= 0.5)).mean()),
            "lesion_acc_baseline": float((lesion == majority_lesion).mean()),
            "lesion_auc": float(roc_auc_score(lesion, p["lesion"])) if both else math.nan,
            "volumes_r2": float(np.mean([r2(vols[:, k], p["volumes"][:, k]) for k in range(3)]))}


def _standardise(raw: Mapping[str, torch.Tensor], t: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = dict(raw)
    out["age"] = (raw["age"] - t["age_mean"]) / t["age_std"]
    out["volumes"] = (raw["volumes"] - torch.tensor(t["vol_mean"])) / torch.tensor(t["vol_std"])
    return out


def load_or_train_encoder(dataset_folder: str | Path, size: int = 32, channels: Sequence[str | int] = ("T1",),
                          budget_s: float | None = 900.0, max_steps: int = ENCODER_STEPS,
                          device: torch.device | str = "cpu",
                          config: EncoderConfig | None = None, batch_size: int = 8, lr: float = 2e-3,
                          seed: int = 0, cache_dir: str | Path | None = None) -> YardstickEncoder:
    """The frozen yardstick encoder for a dataset: loaded from the cache if it matches, else trained.

    The cache file is ``<cache_dir>/yardstick_<hash>.pt`` (default ``data/models/``), where the
    hash covers the data version (:func:`data_version`: dataset folder name, manifest hash, size,
    channels), the encoder config, the training settings (``max_steps``, ``batch_size``, ``lr``,
    ``seed``) and the :data:`RECIPE` — but not ``budget_s``, which is only a fuse (training
    that has not reached ``max_steps`` by then fails loudly). Training is seeded and ends at
    ``max_steps``, so every chapter gets the same encoder (and every machine the same one up to
    floating-point rounding, which thread counts change). Training uses the dataset's ``train`` split; the sanity
    numbers in ``heldout`` use its ``test`` split.
    """
    folder = Path(dataset_folder)
    device = torch.device(device)
    index = read_dataset(folder)
    if config is None:
        n_sites = int(index.attributes_table()["site"].max()) + 1 if len(index) else 1
        config = EncoderConfig(in_channels=len(channels), size=size, n_sites=n_sites)
    if config.in_channels != len(channels) or config.size != size:
        raise ValueError(f"config: in_channels={config.in_channels}, size={config.size} do not match "
                         f"channels={tuple(channels)} and size={size}")
    version = data_version(folder, size, channels)
    # a dry run (GEN3D_MAX_STEPS) trains, and caches, an encoder of its own
    settings = {"max_steps": step_cap(max_steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}
    key = json.dumps({"data": version, "encoder": asdict(config), "training": settings, "recipe": RECIPE},
                     sort_keys=True)
    path = Path(cache_dir) if cache_dir is not None else data_root() / "models"
    path = path / f"yardstick_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"

    # Two chapters that miss the cache at the same moment train it once: the second one waits
    # for the lock, then finds the file.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.is_file():
                return _load_encoder(path, version, settings, device)
            return _train_encoder(folder, path, version, settings, config, channels, budget_s, device)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load_encoder(path: Path, version: Mapping[str, Any], settings: Mapping[str, Any],
                  device: torch.device) -> YardstickEncoder:
    """A cache hit: rebuild the model from the saved config and check what it was trained on."""
    saved: dict[str, Any] = {}
    model = load_model(path, lambda c: (saved.update(c), Encoder3D(EncoderConfig(**c["encoder"])))[1], device)
    if saved.get("data") != version or any(saved["training"].get(k) != v for k, v in settings.items()):
        raise ValueError(f"{path}: was trained on {saved.get('data')}, not {version}; delete it to retrain")
    enc = YardstickEncoder(model.requires_grad_(False), EncoderConfig(**saved["encoder"]), dict(version),
                           saved["targets"], saved["training"], saved["heldout"], path, True, device)
    print(f"yardstick encoder: loaded {path.name} ({enc.training['steps']} steps on {version['dataset']})")
    return enc


def _train_encoder(folder: Path, path: Path, version: Mapping[str, Any], settings: Mapping[str, Any],
                   config: EncoderConfig, channels: Sequence[str | int], budget_s: float | None,
                   device: torch.device) -> YardstickEncoder:
    """A cache miss: train with fit, then freeze, check on the test split and save."""
    size, max_steps, batch_size, lr, seed = (config.size, settings["max_steps"], settings["batch_size"],
                                             settings["lr"], settings["seed"])
    # 1. the data: both splits, targets standardised with the training split's statistics
    train_raw, test_raw = (_targets(folder, s, size, channels) for s in ("train", "test"))
    # 2. train
    ages, vols = train_raw["age"], train_raw["volumes"]
    targets = {"age_mean": float(ages.mean()), "age_std": float(ages.std().clamp_min(1e-6)),
               "vol_mean": vols.mean(0).tolist(), "vol_std": vols.std(0).clamp_min(1e-6).tolist()}
    torch.manual_seed(seed)
    model = Encoder3D(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=RECIPE["weight_decay"])
    loader = _ShuffledBatches(_standardise(train_raw, targets), batch_size, seed, **RECIPE["augment"])
    t0 = time.perf_counter()
    history = fit(lambda batch, i: encoder_step(model, optimizer, batch), loader, max_steps=max_steps,
                  budget_s=budget_s, desc="yardstick encoder")
    training = {**settings, "steps": history.steps, "seconds": round(time.perf_counter() - t0, 2),
                "stopped_by": history.stopped_by, "final_loss": history.mean_last("loss", 20)}
    # 3. freeze, check on the test split, save
    model.eval().requires_grad_(False)
    enc = YardstickEncoder(model, config, dict(version), targets, training, {}, path, False, device)
    enc.heldout = _heldout_report(enc, train_raw, test_raw)
    save_model(path, model, {"encoder": asdict(config), "data": version, "targets": targets,
                             "training": training, "heldout": enc.heldout})
    return enc


# 4. One entry point, and the reference rows --------------------------------------------------

def evaluate_samples(samples: Any, *, reference: Any, train: Any, heldout: Any, encoder: YardstickEncoder,
                     seed: int = 0, kid_subsets: int = 100, ms_ssim_pairs: int = 100,
                     ms_ssim_real: float | None = None, set_size: int | None = None) -> dict[str, float]:
    """Every column of the yardstick for one set of samples (N, C, D, H, W).

    ``reference`` are the real volumes the samples are compared with in feature space (normally
    the training split, which the generator learned); ``train`` and ``heldout`` are the training
    and held-out real volumes of the memorisation check. MS-SSIM uses the training volumes'
    value range for every set. Returns ``n`` (the number of samples), ``fd``, ``kid``,
    ``kid_std``, ``mmd``, ``one_nn``, ``ms_ssim`` (mean pairwise among the samples),
    ``ms_ssim_real`` (the same among the reference), ``mem_ratio``, ``mem_frac``, ``mem_median``,
    ``mem_median_heldout``. FD depends on the number of samples: score every row of a table
    with the same ``n`` (:func:`reference_rows` uses ``len(heldout)``).

    ``ms_ssim_real`` may be passed in (e.g. from a reference row) to skip recomputing it: it
    depends only on ``reference``, ``train`` and ``seed``.

    ``set_size``: score the samples in disjoint sets of ``set_size`` (the first
    ``len(samples) // set_size`` sets) and average FD, KID, MMD and 1-NN over the sets; ``n`` is
    then ``set_size`` and ``fd_sets`` the number of sets. A generator can make as many samples as
    we like, the held-out row cannot: several sets of the held-out row's size keep its
    small-sample bias and shrink the noise. MS-SSIM and memorisation use all samples.
    """
    s = encoder.config.size
    shape = (None, encoder.config.in_channels, s, s, s)
    x, ref, tr, ho = (_volumes(v, name, shape) for v, name in
                      ((samples, "samples"), (reference, "reference"), (train, "train"), (heldout, "heldout")))
    size = len(x) if set_size is None else int(set_size)
    if not 2 <= size <= len(x):
        raise ValueError(f"set_size: expected 2..{len(x)} (the number of samples), got {set_size!r}")
    # 1. features of every set, from the frozen encoder; the feature metrics per set of `size`
    f_all, f_ref = encoder.features(x), encoder.features(ref)
    per_set = []
    for k in range(len(x) // size):
        f_x = f_all[k * size:(k + 1) * size]                                        # (size, F)
        kid_mean, kid_std = kid(f_x, f_ref, subsets=kid_subsets, seed=seed)
        per_set.append({"fd": frechet_distance(f_x, f_ref), "kid": kid_mean, "kid_std": kid_std,
                        "mmd": mmd(f_x, f_ref), "one_nn": one_nn_accuracy(f_x, f_ref)})
    out = {"n": float(size), **{key: float(np.mean([m[key] for m in per_set])) for key in per_set[0]}}
    if set_size is not None:
        out["fd_sets"] = float(len(per_set))
    # 2. diversity and memorisation, in voxel space
    data_range = float(tr.max() - tr.min())
    out["ms_ssim"] = ms_ssim_diversity(x, data_range, ms_ssim_pairs, seed)
    out["ms_ssim_real"] = (ms_ssim_diversity(ref, data_range, ms_ssim_pairs, seed) if ms_ssim_real is None
                           else float(ms_ssim_real))
    out.update(memorisation(x, tr, ho))
    return out


def mean_noise_baseline(train: Any, n: int, rng: np.random.Generator | int = 0) -> torch.Tensor:
    """``n`` "samples": the voxel-wise mean training volume + Gaussian noise with the voxel-wise std.

    Each voxel gets its own mean and standard deviation over the training volumes, and the noise
    is independent between voxels: every voxel's distribution has the right first two moments,
    but there is no anatomy — the trivial baseline a generator must beat.
    """
    t = _volumes(train, "train")
    rng = np.random.default_rng(rng)
    mu, sd = t.mean(0), t.std(0)                                             # (C, D, H, W)
    eps = torch.from_numpy(rng.standard_normal((n, *mu.shape)).astype(np.float32))
    return mu + sd * eps                                                      # (n, C, D, H, W)


def reference_rows(train: Any, heldout: Any, encoder: YardstickEncoder,
                   rng: np.random.Generator | int = 0) -> dict[str, dict[str, float]]:
    """The three reference rows, each with ``len(heldout)`` samples and ``reference = train``.

    ``"held-out real"`` (the floor), ``"mean + noise"`` (:func:`mean_noise_baseline`) and
    ``"copy of training"`` (``len(heldout)`` training volumes drawn without replacement).
    """
    rng = np.random.default_rng(rng)
    tr, ho = _volumes(train, "train"), _volumes(heldout, "heldout")
    n = len(ho)
    if n > len(tr):
        raise ValueError(f"heldout: {n} volumes but only {len(tr)} training volumes to copy")
    seed = int(rng.integers(2**31))
    rows = {"held-out real": ho,
            "mean + noise": mean_noise_baseline(tr, n, rng),
            "copy of training": tr[torch.from_numpy(rng.choice(len(tr), n, replace=False))]}
    out: dict[str, dict[str, float]] = {}
    real = None                                       # MS-SSIM among the reference: computed once
    for name, x in rows.items():
        out[name] = evaluate_samples(x, reference=tr, train=tr, heldout=ho, encoder=encoder, seed=seed,
                                     ms_ssim_real=real)
        real = out[name]["ms_ssim_real"]
    return out


def memorisation_passed(row: Mapping[str, float], max_frac: float = 0.2, min_ratio: float = 0.8) -> bool:
    """The memorisation check of one row of the table: does the set look like *new* brains?

    It passes when at most ``max_frac`` of the samples look copied (``mem_frac``) and the samples
    are, in the median, at least ``min_ratio`` times as far from the training set (relative to
    new brains) as held-out brains are (``mem_ratio``); see :func:`memorisation`. Held-out real
    brains pass (``mem_ratio`` is 1 by construction); copies of training volumes fail (1 and 0).
    """
    return bool(row["mem_frac"] <= max_frac and row["mem_ratio"] >= min_ratio)


def fd_probe(encoder: YardstickEncoder, reference: Any, n: int, seed: int = 0,
             condition: torch.Tensor | None = None):
    """A function ``probe(generator) -> {"fd": ...}`` to follow FD during training.

    ``generator.sample(n, condition, generator=torch_generator)`` must return (n, C, D, H, W)
    volumes (the GANs of :mod:`gen3d_lessons.models.gan` do). The same ``n`` codes (from
    ``seed``) are used at every call, so that the curve shows the generator changing, not the
    draw; the reference features are computed once.
    """
    f_ref = encoder.features(reference)

    def probe(generator: torch.nn.Module) -> dict[str, float]:
        x = generator.sample(n, condition, generator=torch.Generator().manual_seed(seed))
        return {"fd": frechet_distance(encoder.features(x), f_ref)}

    return probe


COLUMNS = ("fd", "kid", "mmd", "ms_ssim", "one_nn", "mem_ratio", "mem_frac")


def table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = COLUMNS):
    """Rows ``{name: evaluate_samples(...)}`` as a pandas DataFrame, one row per model or baseline."""
    import pandas as pd

    return pd.DataFrame({name: {c: row[c] for c in columns} for name, row in rows.items()}).T
