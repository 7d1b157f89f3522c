"""The book's yardstick for generated 3D volumes: one table, the same in every synthesis chapter.

How good is a set of generated brains? No single number says it, so every synthesis chapter
prints the same columns, each answering one question, for its model *and* for reference rows
measured in the same run (each column is a function of :mod:`gen3d_lessons.metrics.generative`):

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
:func:`~gen3d_lessons.metrics.generative.memorisation_passed` is the pass/fail rule of the
memorisation columns, and :func:`fd_probe` follows FD while a generator trains.

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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data import data_root
from ..data.batches import Batches
from ..data.datasets import VolumeDataset, read_dataset
from ..metrics.checks import as_volumes
from ..metrics.generative import frechet_distance, kid, memorisation, mmd, ms_ssim_diversity, one_nn_accuracy
from ..models.encoder import Encoder3D, EncoderConfig
from ..training import fit, load_model, save_model
from ..training.encoder import encoder_step
from ..profiles import step_cap

__all__ = ["data_version", "load_volumes", "YardstickEncoder", "load_or_train_encoder", "evaluate_samples",
           "mean_noise_baseline", "reference_rows", "table", "fd_probe", "RECIPE", "ENCODER_STEPS"]


# 1. The encoder: data version, training, cache -----------------------------------------------

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
        x = as_volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s))
        self.model.eval()
        out = [self.model.features(x[i:i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, volumes: Any) -> dict[str, np.ndarray]:
        """The heads' predictions in natural units: age (years), site, lesion probability, volumes (ml)."""
        s = self.config.size
        x = as_volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s)).to(self.device)
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
    augment = RECIPE["augment"]
    loader = Batches(_standardise(train_raw, targets), batch_size, seed, augment=("image",),
                     flip_p=augment["flip_lr"], shift=augment["shift_voxels"], gain=augment["gain"])
    t0 = time.perf_counter()
    history = fit(partial(encoder_step, model=model, optimizer=optimizer), loader, max_steps=max_steps,
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


# 2. One entry point, and the reference rows --------------------------------------------------

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
    x, ref, tr, ho = (as_volumes(v, name, shape) for v, name in
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
    t = as_volumes(train, "train")
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
    tr, ho = as_volumes(train, "train"), as_volumes(heldout, "heldout")
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
