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
trained here, once, to predict age, site, lesions and the tissue, ventricle and lesion volumes of
hundreds of *new* brains that the phantom draws from the dataset's population (its generator
config, other seeds), with the augmentations, weight decay and schedule of :data:`RECIPE`; then
frozen and cached with the version of the data (:func:`load_or_train_encoder`). A second cohort
of new brains, the check cohort, is saved beside it to test it (:func:`heads_table`) and to put
it on trial (:mod:`gen3d_lessons.tasks.sensitivity`, chapter 7). FD and KID computed in it are
"FD / KID in our encoder": they rank models on this cohort; they are not comparable with FID
numbers from 2D papers.

Every chapter gets the same encoder: call ``load_or_train_encoder(ensure_dataset("brain"),
size=run.size)`` with the other arguments left at their defaults (``make data`` runs
``gen3d yardstick``, which trains it once: about three minutes to draw the cohorts and two and a
half to train on two CPU cores). The step cap ends its training, the clock only guards against a
stuck machine, and a file lock makes two chapters that miss the cache at once train it once.
:func:`~gen3d_lessons.metrics.generative.memorisation_passed` is the pass/fail rule of the
memorisation columns, and :func:`fd_probe` follows FD while a generator trains.
:func:`save_samples` and :func:`load_samples` carry samples from one chapter to another (chapter 7
scores those of chapters 3 and 5), only for the version of the data they were drawn from.

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
from ..metrics.generative import (MemorisationCheck, frechet_distance, kid, memorisation, mmd, ms_ssim_diversity,
                                  one_nn_accuracy)
from ..models.encoder import Encoder3D, EncoderConfig
from ..training import fit, load_model, save_model
from ..training.encoder import encoder_step
from ..profiles import step_cap

__all__ = ["data_version", "load_volumes", "YardstickEncoder", "load_or_train_encoder", "random_encoder", "cohort_seeds", "VOLUMES", "evaluate_samples",
           "mean_noise_baseline", "reference_rows", "table", "fd_probe", "RECIPE", "ENCODER_STEPS", "samples_path",
           "save_samples", "load_samples"]


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


VOLUMES = ("csf_ml", "gm_ml", "wm_ml", "ventricle_ml", "lesion_ml")   # what the volume head may predict


def _targets(images: torch.Tensor, attributes: Sequence[Mapping[str, Any]], source: str) -> dict[str, Any]:
    """Images and raw targets: image, age, site, lesion, volumes (ml: those of :data:`VOLUMES` the
    cases carry, named in ``"volume_names"``)."""
    for key in ("age", "site", "has_lesion", "csf_ml", "gm_ml", "wm_ml"):
        if key not in attributes[0]:
            raise ValueError(f"{source}: cases have no attribute {key!r}; the yardstick encoder needs the brain "
                             "phantoms' age, site, has_lesion, csf_ml, gm_ml, wm_ml")
    names = [k for k in VOLUMES if k in attributes[0]]
    column = lambda k, dtype=torch.float32: torch.tensor([float(a[k]) for a in attributes], dtype=dtype)  # noqa: E731
    return {"image": images,                                                                  # (N, C, D, H, W)
            "age": column("age"), "site": column("site").long(), "lesion": column("has_lesion"),  # (N,) each
            "volumes": torch.stack([column(k) for k in names], 1),                            # (N, V)
            "volume_names": names}


def _split_targets(folder: Path, split: str, size: int, channels: Sequence[str | int]) -> dict[str, Any]:
    """The targets of one split of the dataset, as :class:`VolumeDataset` serves its images."""
    ds = VolumeDataset(folder, split, keys=("image",), channels=list(channels), size=size)
    items = [ds[i] for i in range(len(ds))]
    attrs = [{k: v.item() for k, v in it.items() if isinstance(v, torch.Tensor) and v.numel() == 1} for it in items]
    return _targets(torch.stack([it["image"] for it in items]), attrs, str(folder))


def cohort_seeds(folder: str | Path, which: str, n: int) -> list[int]:
    """The subject seeds of the first ``n`` brains of the encoder's training cohort (``which="cohort"``)
    or of its check cohort (``"check"``): subjects ``first + i`` of the dataset's seed (see :data:`RECIPE`).

    The dataset itself holds subjects 0 .. N - 1 (:func:`~gen3d_lessons.data.subject_seed`), so
    indices from a million on are brains the dataset does not hold. With these seeds the phantom
    can make the same subjects again, e.g. at another age or site.
    """
    from ..data import subject_seed

    if which not in ("cohort", "check"):
        raise ValueError(f"which: expected 'cohort' or 'check', got {which!r}")
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a brain dataset folder")
    seed = int(json.loads(path.read_text()).get("seed", 0))
    return [subject_seed(seed, RECIPE[f"{which}_first"] + i) for i in range(int(n))]


def _cohort(folder: Path, which: str, n: int, size: int, channels: Sequence[str | int]) -> dict[str, Any]:
    """``n`` new brains of the dataset's population (its generator config), never in the dataset."""
    from ..data.brain import BRAIN_CHANNELS, brain_config_of, brain_cohort

    index = [BRAIN_CHANNELS.index(c) if isinstance(c, str) else int(c) for c in channels]
    images, attrs = brain_cohort(brain_config_of(folder), cohort_seeds(folder, which, n), channels=tuple(index),
                                 size=size, desc="encoder cohort" if which == "cohort" else "check cohort")
    return _targets(images, attrs, f"{folder} (generated {which} cohort)")


# How the encoder is trained beyond the settings a caller may change. Part of the cache key, so
# that a change here retrains it. The encoder learns from a cohort of new brains drawn from the
# dataset's own generator (hundreds, where the dataset's training split has ~50): with ~50 brains
# it memorises them, and with a few hundred it learns to read age and volumes on brains it never
# saw. Augmentation and weight decay still help; the check cohort, drawn the same way, measures it.
RECIPE = {"augment": {"flip_lr": 0.5, "shift_voxels": 2, "gain": 0.1}, "weight_decay": 0.05, "optimizer": "AdamW",
          "schedule": {"one_cycle_warmup": 0.1}, "cohort_first": 1_000_000, "check_first": 2_000_000}
ENCODER_STEPS = 5000          # the default step cap: the number that ends training, on any machine
ENCODER_CONFIG = dict(channels=(16, 32, 64), feature_dim=64, pool="mean+max")   # the default EncoderConfig


@dataclass
class YardstickEncoder:
    """A trained, frozen :class:`Encoder3D` with what it was trained on and how well it did.

    ``features(volumes) -> (N, F)`` NumPy array is all the metrics need. ``heldout`` holds the
    sanity check on the dataset's test split (age MAE and R², site and lesion accuracy, each
    beside the trivial predictor's, lesion AUC, volumes R²); ``check``, the same on the check
    cohort of new brains (empty when the encoder learned from the training split only);
    ``cached`` says whether it was loaded from ``path`` rather than trained now.
    """

    model: Encoder3D
    config: EncoderConfig
    data: dict[str, Any]                  # data_version(...)
    targets: dict[str, Any]               # means and stds that standardised age and volumes
    training: dict[str, Any]              # steps, seconds, stopped_by, max_steps, batch_size, lr, seed, cohort
    heldout: dict[str, float]
    path: Path
    cached: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    check: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def features(self, volumes: Any, batch_size: int = 16) -> np.ndarray:
        """Features (N, F) of volumes (N, C, size, size, size) in the dataset's intensity units."""
        s = self.config.size
        x = as_volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s))
        self.model.eval()
        out = [self.model.features(x[i:i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()

    @torch.no_grad()
    def predict(self, volumes: Any, batch_size: int = 32) -> dict[str, np.ndarray]:
        """The heads' predictions in natural units: age (years), site, lesion probability, volumes
        (N, V) in ml (the columns named by ``targets["volume_names"]``)."""
        s = self.config.size
        x = as_volumes(volumes, "volumes", shape=(None, self.config.in_channels, s, s, s))
        self.model.eval()
        parts = [self.model(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
        out = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
        t = self.targets
        return {"age": (out["age"].numpy() * t["age_std"] + t["age_mean"]),
                "site": out["site"].argmax(1).numpy(),
                "lesion": torch.sigmoid(out["lesion"]).numpy(),
                "volumes": out["volumes"].numpy() * np.array(t["vol_std"]) + np.array(t["vol_mean"])}

    def check_cohort(self) -> tuple[torch.Tensor, Any]:
        """The check cohort's volumes (N, C, size³) and attribute table: new brains of the dataset's
        population that neither the encoder nor any generator saw (saved beside the encoder)."""
        import pandas as pd

        file = _check_path(self.path)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no check cohort beside this encoder (it learned from the training "
                                    "split only, or the file was removed; delete the encoder to retrain)")
        saved = torch.load(file, map_location="cpu", weights_only=True)
        return saved["image"], pd.DataFrame(saved["attributes"])


def _check_path(path: Path) -> Path:
    return path.with_name(path.stem + "_check.pt")


def _heldout_report(enc: YardstickEncoder, train: Mapping[str, Any], test: Mapping[str, Any]) -> dict[str, float]:
    """How well the heads predict held-out brains, beside the trivial predictor from the training data."""
    from sklearn.metrics import roc_auc_score

    p = enc.predict(test["image"])
    age, site, lesion, vols = (test[k].numpy() for k in ("age", "site", "lesion", "volumes"))
    train_age = train["age"].numpy()
    r2 = lambda y, yhat: float(1 - ((y - yhat) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))  # noqa: E731
    majority_site = np.bincount(train["site"].numpy()).argmax()
    majority_lesion = float(train["lesion"].numpy().mean() >= 0.5)
    both = 0 < lesion.sum() < len(lesion)
    shared = [k for k in test["volume_names"] if k in train["volume_names"]]
    out = {"n_test": float(len(age)),
           "age_mae": float(np.abs(p["age"] - age).mean()),
           "age_mae_baseline": float(np.abs(train_age.mean() - age).mean()),   # predict the training mean
           "age_r2": r2(age, p["age"]),
           "site_acc": float((p["site"] == site).mean()),
           "site_acc_baseline": float((site == majority_site).mean()),         # predict the commonest site
           "lesion_acc": float(((p["lesion"] >= 0.5) == (lesion >= 0.5)).mean()),
           "lesion_acc_baseline": float((lesion == majority_lesion).mean()),
           "lesion_auc": float(roc_auc_score(lesion, p["lesion"])) if both else math.nan,
           **{f"{k}_r2": r2(vols[:, test["volume_names"].index(k)], p["volumes"][:, train["volume_names"].index(k)])
              for k in shared}}
    out["volumes_r2"] = float(np.mean([out[f"{k}_r2"] for k in ("csf_ml", "gm_ml", "wm_ml")]))   # the tissues
    return out


def _standardise(raw: Mapping[str, Any], t: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    out["age"] = (raw["age"] - t["age_mean"]) / t["age_std"]
    out["volumes"] = (raw["volumes"] - torch.tensor(t["vol_mean"])) / torch.tensor(t["vol_std"])
    return out


def load_or_train_encoder(dataset_folder: str | Path, size: int = 32, channels: Sequence[str | int] = ("T1",),
                          budget_s: float | None = 900.0, max_steps: int = ENCODER_STEPS,
                          device: torch.device | str = "cpu",
                          config: EncoderConfig | None = None, batch_size: int = 16, lr: float = 2e-3,
                          seed: int = 0, cache_dir: str | Path | None = None, cohort: int = 600,
                          check: int = 160) -> YardstickEncoder:
    """The frozen yardstick encoder for a dataset: loaded from the cache if it matches, else trained.

    It learns from ``cohort`` new brains drawn from the dataset's generator (``cohort=0``: from
    the dataset's training split), and is checked on ``check`` more new brains (the check
    cohort, saved beside it) and on the dataset's test split.

    The cache file is ``<cache_dir>/yardstick_<hash>.pt`` (default ``data/models/``), where the
    hash covers the data version (:func:`data_version`: dataset folder name, manifest hash, size,
    channels), the encoder config, the training settings (``max_steps``, ``batch_size``, ``lr``,
    ``seed``, ``cohort``, ``check``) and the :data:`RECIPE` — but not ``budget_s``, which is only
    a fuse (training that has not reached ``max_steps`` by then fails loudly). Training is seeded
    and ends at ``max_steps``, so every chapter gets the same encoder (and every machine the same
    one up to floating-point rounding, which thread counts change). A dry run
    (``GEN3D_MAX_STEPS``) caps the cohorts as it caps the steps, at no fewer than ``batch_size``.
    """
    folder = Path(dataset_folder)
    device = torch.device(device)
    index = read_dataset(folder)
    if config is None:
        n_sites = int(index.attributes_table()["site"].max()) + 1 if len(index) else 1
        n_volumes = len(VOLUMES) if cohort else sum(k in index.attributes_table() for k in VOLUMES)
        config = EncoderConfig(in_channels=len(channels), size=size, n_sites=n_sites, n_volumes=n_volumes,
                               **ENCODER_CONFIG)
    if config.in_channels != len(channels) or config.size != size:
        raise ValueError(f"config: in_channels={config.in_channels}, size={config.size} do not match "
                         f"channels={tuple(channels)} and size={size}")
    if not (isinstance(cohort, int) and isinstance(check, int) and cohort >= 0 and check >= 0 and (check or not cohort)):
        raise ValueError(f"cohort, check: expected numbers of new brains >= 0 (check > 0 with a cohort), "
                         f"got {cohort!r}, {check!r}")
    version = data_version(folder, size, channels)
    # a dry run (GEN3D_MAX_STEPS) trains, and caches, an encoder of its own
    capped = lambda n: n and max(step_cap(n), int(batch_size))                          # noqa: E731
    settings = {"max_steps": step_cap(max_steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "cohort": capped(cohort), "check": capped(check)}
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
                           saved["targets"], saved["training"], saved["heldout"], path, True, device,
                           saved.get("check", {}))
    print(f"yardstick encoder: loaded {path.name} ({enc.training['steps']} steps on {version['dataset']})")
    return enc


def _train_encoder(folder: Path, path: Path, version: Mapping[str, Any], settings: Mapping[str, Any],
                   config: EncoderConfig, channels: Sequence[str | int], budget_s: float | None,
                   device: torch.device) -> YardstickEncoder:
    """A cache miss: make the cohorts, train with fit, then freeze, check, save."""
    size, max_steps, batch_size, lr, seed = (config.size, settings["max_steps"], settings["batch_size"],
                                             settings["lr"], settings["seed"])
    t0 = time.perf_counter()
    # 1. the data: a generated cohort (or the training split); targets standardised with its statistics
    if settings["cohort"]:
        train_raw = _cohort(folder, "cohort", settings["cohort"], size, channels)
        check_raw = _cohort(folder, "check", settings["check"], size, channels)
    else:
        train_raw, check_raw = _split_targets(folder, "train", size, channels), None
    test_raw = _split_targets(folder, "test", size, channels)
    if config.n_volumes != len(train_raw["volume_names"]):
        raise ValueError(f"config: n_volumes={config.n_volumes}, but the training brains carry "
                         f"{train_raw['volume_names']}")
    made_s = time.perf_counter() - t0
    # 2. train
    ages, vols = train_raw["age"], train_raw["volumes"]
    targets = {"age_mean": float(ages.mean()), "age_std": float(ages.std().clamp_min(1e-6)),
               "vol_mean": vols.mean(0).tolist(), "vol_std": vols.std(0).clamp_min(1e-6).tolist(),
               "volume_names": train_raw["volume_names"]}
    torch.manual_seed(seed)
    model = Encoder3D(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=RECIPE["weight_decay"])
    # the learning rate climbs to lr over the first 10 % of the steps, then anneals to ~0 (a run of
    # a few steps, a smoke test or a dry run, warms up for at least 1.5 steps: both phases need a length)
    warm = max(RECIPE["schedule"]["one_cycle_warmup"], 1.5 / max(max_steps, 1))
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max_steps, pct_start=warm)
                 if max_steps >= 2 else None)
    augment = RECIPE["augment"]
    loader = Batches(_standardise(train_raw, targets), batch_size, seed, augment=("image",),
                     flip_p=augment["flip_lr"], shift=augment["shift_voxels"], gain=augment["gain"])
    t1 = time.perf_counter()
    history = fit(partial(encoder_step, model=model, optimizer=optimizer, scheduler=scheduler), loader,
                  max_steps=max_steps, budget_s=budget_s, desc="yardstick encoder")
    training = {**settings, "steps": history.steps, "seconds": round(time.perf_counter() - t1, 2),
                "cohort_seconds": round(made_s, 2), "stopped_by": history.stopped_by,
                "final_loss": history.mean_last("loss", 20)}
    # 3. freeze, check on the held-out brains, save (the check cohort beside the model)
    model.eval().requires_grad_(False)
    enc = YardstickEncoder(model, config, dict(version), targets, training, {}, path, False, device)
    enc.heldout = _heldout_report(enc, train_raw, test_raw)
    if check_raw is not None:
        enc.check = _heldout_report(enc, train_raw, check_raw)
        names = check_raw["volume_names"]
        attributes = {"age": check_raw["age"].tolist(), "site": check_raw["site"].tolist(),
                      "has_lesion": check_raw["lesion"].bool().tolist(),
                      **{k: check_raw["volumes"][:, j].tolist() for j, k in enumerate(names)}}
        torch.save({"image": check_raw["image"].contiguous(), "attributes": attributes}, _check_path(path))
    save_model(path, model, {"encoder": asdict(config), "data": version, "targets": targets,
                             "training": training, "heldout": enc.heldout, "check": enc.check})
    return enc


def random_encoder(encoder: YardstickEncoder, seed: int = 1) -> YardstickEncoder:
    """The control: an encoder of the same shape with the random weights it had before training.

    Seeded (``torch.manual_seed(seed)``) and frozen; it never saw a brain. FD in its features
    shows what training the yardstick adds.
    """
    torch.manual_seed(seed)
    model = Encoder3D(encoder.config).to(encoder.device).eval().requires_grad_(False)
    return YardstickEncoder(model, encoder.config, dict(encoder.data), dict(encoder.targets),
                            {"steps": 0, "seed": int(seed)}, {}, encoder.path, False, encoder.device)


# 2. One entry point, and the reference rows --------------------------------------------------

def evaluate_samples(samples: Any, *, reference: Any, train: Any, heldout: Any, encoder: YardstickEncoder,
                     seed: int = 0, kid_subsets: int = 100, ms_ssim_pairs: int = 100,
                     ms_ssim_real: float | None = None, set_size: int | None = None,
                     reference_features: np.ndarray | None = None,
                     memorisation_check: MemorisationCheck | None = None) -> dict[str, float]:
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
    depends only on ``reference``, ``train`` and ``seed``; so may ``reference_features``,
    ``encoder.features(reference)``, when many sets are scored against one reference, and
    ``memorisation_check``, a :class:`~gen3d_lessons.metrics.generative.MemorisationCheck` of
    ``train`` and ``heldout``.

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
    f_all = encoder.features(x)
    f_ref = encoder.features(ref) if reference_features is None else reference_features
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
    out.update(memorisation(x, tr, ho) if memorisation_check is None else memorisation_check(x))
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


# 3. Reading a table: ratios to the baseline, the numbers to record (chapter 3 and after) -------

__all__ += ["Splits", "load_splits", "heads_table", "fd_to", "ratio_table", "row_summary", "best_model", "table_metrics",
            "condition_readback"]

BASELINE = "mean + noise"           # the reference row every model must beat


@dataclass
class Splits:
    """The brain cohort as a generative chapter uses it, volumes ``(N, C, size, size, size)``;
    unpack it, ``train, val, heldout, train_attrs, val_attrs = load_splits(...)``.

    ``train`` is what a generator learns from; ``val`` (drawn at random from the training split)
    only chooses checkpoints; ``heldout`` (the test split) is never seen by any model.
    ``train_attrs`` and ``val_attrs`` are the attribute tables (age, site, ...) in the order of
    the volumes.
    """

    train: torch.Tensor
    val: torch.Tensor
    heldout: torch.Tensor
    train_attrs: Any                 # pandas DataFrame, one row per volume of train
    val_attrs: Any                   # one row per volume of val

    def __iter__(self):
        return iter((self.train, self.val, self.heldout, self.train_attrs, self.val_attrs))


def load_splits(folder: str | Path, size: int = 32, seed: int = 0, n_val: int | None = None,
                channels: Sequence[str | int] = ("T1",)) -> Splits:
    """The dataset's training split divided into training and validation volumes, and its test split.

    ``n_val`` volumes (default: as many as the test split holds) are drawn without replacement
    with ``numpy.random.default_rng(seed)``; the rest, in their original order, are the training
    volumes.
    """
    train_all, heldout = (load_volumes(folder, split, size=size, channels=channels) for split in ("train", "test"))
    attrs = read_dataset(folder).attributes_table().query("split == 'train'")      # one row per volume of train_all
    if len(attrs) != len(train_all):
        raise ValueError(f"{folder}: {len(attrs)} attribute rows for {len(train_all)} training volumes")
    n_val = len(heldout) if n_val is None else int(n_val)
    if not 0 < n_val < len(train_all):
        raise ValueError(f"n_val: expected 1..{len(train_all) - 1} validation volumes, got {n_val}")
    is_val = np.isin(np.arange(len(train_all)), np.random.default_rng(seed).choice(len(train_all), n_val, replace=False))
    (train, train_attrs), (val, val_attrs) = ((train_all[torch.from_numpy(m)], attrs[m]) for m in (~is_val, is_val))
    return Splits(train, val, heldout, train_attrs, val_attrs)


HEADS = {"age MAE (years)": "age_mae", "age R²": "age_r2", "site accuracy": "site_acc",
         "lesion accuracy": "lesion_acc", "lesion AUC": "lesion_auc", "tissue volumes R²": "volumes_r2",
         "ventricle volume R²": "ventricle_ml_r2", "lesion volume R²": "lesion_ml_r2"}


def heads_table(encoder: YardstickEncoder):
    """How well the encoder's heads predict brains it never saw, as a pandas DataFrame with one
    row per measure: on the dataset's test split (``encoder.heldout``), on the check cohort of
    new brains when there is one (``encoder.check``, many more brains, so steadier numbers), and
    the trivial guess from the training data (the mean age, the commonest site, the commoner
    lesion status) on the test split."""
    import pandas as pd

    h = encoder.heldout
    columns = {f"test split (n={int(h['n_test'])})": h}
    if encoder.check:
        columns[f"check cohort (n={int(encoder.check['n_test'])})"] = encoder.check
    out = {name: {m: col.get(k, math.nan) for m, k in HEADS.items()} for name, col in columns.items()}
    out["trivial guess"] = {m: h.get(f"{k}_baseline", math.nan) for m, k in HEADS.items()}
    return pd.DataFrame(out)


def fd_to(encoder: YardstickEncoder, reference: Any, volumes: Mapping[str, Any]) -> dict[str, float]:
    """FD of each set of ``volumes`` ``{name: (N, C, D, H, W)}`` to one ``reference`` set, in the
    encoder's features: e.g. the reference rows on the scale of a probe that compares with a
    validation split (:func:`fd_probe`)."""
    f_ref = encoder.features(reference)
    return {name: frechet_distance(encoder.features(x), f_ref) for name, x in volumes.items()}


def ratio_table(rows: Mapping[str, Mapping[str, float]], baseline: str = BASELINE,
                columns: Sequence[str] = COLUMNS):
    """:func:`table` with two more columns: ``FD / baseline``, a row's FD as a fraction of the
    baseline's (1: no better than the baseline, 0: a perfect FD), and ``memorisation check``
    (pass / fail, :func:`~gen3d_lessons.metrics.generative.memorisation_passed`)."""
    from ..metrics.generative import memorisation_passed

    if baseline not in rows:
        raise ValueError(f"baseline: {baseline!r} is not a row; rows: {', '.join(rows)}")
    t = table(rows, columns)
    t["FD / baseline"] = t.fd / t.fd[baseline]
    t["memorisation check"] = ["pass" if memorisation_passed(rows[r]) else "fail" for r in t.index]
    return t


def row_summary(rows: Mapping[str, Mapping[str, float]], name: str, baseline: str = BASELINE) -> dict[str, float]:
    """What prose says about one row: ``ratio`` (its FD / the baseline's), ``one_nn``, ``ms_ssim``, ``mem_ratio``."""
    if name not in rows or baseline not in rows:
        raise ValueError(f"rows: need {name!r} and {baseline!r}; rows: {', '.join(rows)}")
    return {"ratio": rows[name]["fd"] / rows[baseline]["fd"], **{c: rows[name][c] for c in ("one_nn", "ms_ssim", "mem_ratio")}}


def best_model(rows: Mapping[str, Mapping[str, float]], models: Sequence[str], baseline: str = BASELINE,
               rival: str = "PCA Gaussian samples") -> dict[str, Any]:
    """The comparisons the result of a synthesis chapter makes, read from its table.

    Returns ``name``, the model with the lowest FD (the first of equals, in ``models``' order);
    its ``ratio``, FD / the baseline's; ``below_rival``, whether its FD is below the ``rival`` row's
    (the classical generator to beat); ``all_beat_baseline``, whether every model's FD is below the
    baseline's; and ``memorisation``, whether the best passes the memorisation check.
    """
    from ..metrics.generative import memorisation_passed

    missing = [r for r in (*models, baseline, rival) if r not in rows]
    if not models or missing:
        raise ValueError(f"rows: need the models, {baseline!r} and {rival!r}; missing {missing or 'models'}")
    ratios = {m: rows[m]["fd"] / rows[baseline]["fd"] for m in models}
    name = min(ratios, key=ratios.get)
    return {"name": name, "ratio": ratios[name], "below_rival": bool(rows[name]["fd"] < rows[rival]["fd"]),
            "all_beat_baseline": all(r < 1 for r in ratios.values()), "memorisation": memorisation_passed(rows[name])}


def table_metrics(rows: Mapping[str, Mapping[str, float]], models: Sequence[str], baseline: str = BASELINE,
                  mem_also: Sequence[str] = ("PCA Gaussian samples",)) -> dict[str, float]:
    """A table's numbers as metrics to record: ``FD <row>`` of every row, ``FD ratio <model>`` (its
    FD / the baseline's), ``1-NN <row>``, and ``mem_ratio`` of the models and of the rows in ``mem_also``."""
    missing = [r for r in (*models, baseline, *mem_also) if r not in rows]
    if missing:
        raise ValueError(f"rows: no {missing}; rows: {', '.join(rows)}")
    return {**{f"FD {r}": rows[r]["fd"] for r in rows},
            **{f"FD ratio {m}": rows[m]["fd"] / rows[baseline]["fd"] for m in models},
            **{f"1-NN {r}": rows[r]["one_nn"] for r in rows},
            **{f"mem_ratio {r}": rows[r]["mem_ratio"] for r in [*models, *mem_also]}}


@torch.no_grad()
def condition_readback(generator: torch.nn.Module, encoder: YardstickEncoder, condition: Any, n: int, *,
                       sites: Sequence[int] = (0, 1, 2), ages: Sequence[float] = (25, 85), age: float = 55,
                       site: int = 0, seed: int = 3) -> dict[str, Any]:
    """Does a conditional generator obey its condition? The encoder's heads, which never saw a
    generated brain, judge ``n`` samples per request.

    ``condition(ages, sites) -> c (n, K)`` builds the generator's condition from ``n`` ages (years)
    and sites; ``generator.sample(n, c, generator=...)`` draws. The same codes ``z`` (from ``seed``)
    serve every request, so that only the condition changes. Returns ``site_acc`` ``{site: fraction
    of samples asked for that site (at ``age``) whose site the head reads back}``, ``site_mean``
    (their mean; chance is ``1 / len(sites)``) and ``age_pred`` ``{age: mean age the head reads on
    samples asked for that age (at ``site``)}``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of samples, got {n!r}")
    z = lambda: torch.Generator().manual_seed(seed)                         # noqa: E731  the same codes each time
    draw = lambda a, s: generator.sample(n, condition([a] * n, [s] * n), generator=z()).cpu()   # noqa: E731
    site_acc = {s: float((encoder.predict(draw(age, s))["site"] == s).mean()) for s in sites}
    age_pred = {a: float(encoder.predict(draw(a, site))["age"].mean()) for a in ages}
    return {"site_acc": site_acc, "site_mean": float(np.mean(list(site_acc.values()))), "age_pred": age_pred}


# 4. Samples of any size, measured at the encoder's (chapter 4) ------------------------------

__all__ += ["to_encoder_size", "compare_samples"]


def to_encoder_size(volumes: torch.Tensor, encoder: YardstickEncoder) -> torch.Tensor:
    """Volumes (N, C, D, H, W) resampled (trilinear) to the encoder's size³; unchanged if already there.

    The encoder is trained once, at one size; a chapter whose models work at another size
    measures their samples (and its real volumes) at the encoder's.
    """
    if not isinstance(volumes, torch.Tensor) or volumes.ndim != 5:
        raise ValueError(f"volumes: expected a tensor (N, C, D, H, W), got "
                         f"{tuple(volumes.shape) if isinstance(volumes, torch.Tensor) else type(volumes).__name__}")
    s = encoder.config.size
    if volumes.shape[-1] == s:
        return volumes
    return torch.nn.functional.interpolate(volumes, size=(s, s, s), mode="trilinear", align_corners=False)


def compare_samples(samples: Mapping[str, torch.Tensor], train: torch.Tensor, heldout: torch.Tensor,
                    encoder: YardstickEncoder, *, reuse_real_diversity: bool = False) -> dict[str, dict[str, float]]:
    """The yardstick's rows for several sets of samples, after the three :func:`reference_rows`.

    ``reuse_real_diversity`` takes every set's ``ms_ssim_real`` from the held-out row instead of
    drawing its pairs anew (with ``evaluate_samples``' default seed): a few seconds less per set.

    Every volume (samples, ``train``, ``heldout``) is first brought to the encoder's size
    (:func:`to_encoder_size`); each set is scored with :func:`evaluate_samples` against the
    training volumes. Returns ``{name: row}``: the reference rows, then one per set, ready for
    :func:`table`.
    """
    if not isinstance(samples, Mapping) or not samples:
        raise ValueError("samples: expected a non-empty dict {name: volumes (N, C, D, H, W)}")
    tr, ho = to_encoder_size(train, encoder), to_encoder_size(heldout, encoder)
    rows = reference_rows(tr, ho, encoder)
    # the reference's own diversity, once (its pairs are drawn with the reference rows' seed), or per set
    real = rows["held-out real"]["ms_ssim_real"] if reuse_real_diversity else None
    rows |= {name: evaluate_samples(to_encoder_size(x, encoder), reference=tr, train=tr, heldout=ho, encoder=encoder,
                                    ms_ssim_real=real) for name, x in samples.items()}
    return rows


# 5. FD over several draws (chapter 5) ---------------------------------------------------------

__all__ += ["fd_of_draws", "draws_table"]


def fd_of_draws(draws: Any, encoder: YardstickEncoder, reference: np.ndarray) -> np.ndarray:
    """FD of each draw against the ``reference`` features (N, F): one value per draw.

    ``draws`` is an iterable of sets of volumes (n, C, D, H, W) of any size (each is brought to
    the encoder's, :func:`to_encoder_size`). With a few dozen brains, FD changes noticeably from
    one draw of ``n`` samples to the next; several draws of the same ``n`` give its mean and
    spread, which one draw cannot.
    """
    out = [frechet_distance(encoder.features(to_encoder_size(torch.as_tensor(x).cpu(), encoder)), reference)
           for x in draws]
    if not out:
        raise ValueError("draws: expected at least one set of volumes")
    return np.array(out)


def draws_table(fds: Mapping[str, Any], baseline: str = BASELINE):
    """FD over draws, one row per generator (a pandas DataFrame): ``FD`` (the mean over its draws),
    ``FD (std)`` and ``/ <baseline>``, the mean as a multiple of the ``baseline`` row's mean.

    ``fds`` maps a name to the FDs of its draws (:func:`fd_of_draws`); give every generator the
    same number of draws of the same size, so that the means are comparable.
    """
    import pandas as pd

    if not isinstance(fds, Mapping) or baseline not in fds:
        raise ValueError(f"fds: expected a dict {{name: FD per draw}} with the baseline {baseline!r}")
    fds = {name: np.asarray(f, dtype=float) for name, f in fds.items()}
    t = pd.DataFrame({name: {"FD": f.mean(), "FD (std)": f.std()} for name, f in fds.items()}).T
    return t.assign(**{f"/ {baseline}": t["FD"] / fds[baseline].mean()})


# 6. Samples one chapter saves for another to score (chapters 3 and 5 for chapter 7) ------------

def samples_path(name: str, suffix: str = "") -> Path:
    """Where saved samples live: ``data_root()/samples/<name><suffix>.pt``. ``suffix`` is the run's
    ``model_suffix``, so that a smoke or dry run never replaces a real run's samples."""
    return data_root() / "samples" / f"{name}{suffix}.pt"


def save_samples(name: str, samples: Any, *, model: str, folder: str | Path, suffix: str = "") -> Path:
    """Save generated volumes (N, 1, s, s, s) as :func:`samples_path` ``(name, suffix)``, with the
    model's name and the version of the dataset in ``folder`` that the model learned from
    (atomically). Chapter 3 saves its best GAN's samples and chapter 5 its latent diffusion
    model's, for chapter 7 to score beside its own generators."""
    from ..training.fit import save_checked

    x = as_volumes(samples, "samples", shape=(None, 1, None, None, None)).contiguous()   # finite, one channel
    path = samples_path(name, suffix)
    return save_checked({"samples": x, "model": str(model), "data": data_version(folder, x.shape[-1], ("T1",))},
                        path, "samples")


def load_samples(name: str, folder: str | Path, size: int, suffix: str = "") -> dict[str, Any] | None:
    """The samples :func:`save_samples` wrote, resampled to ``size``³ (trilinear): a dict with
    ``samples`` (N, 1, size, size, size) and ``model``. ``None``, with a line that says why, when
    there is no file (the chapter that saves it has not run in this profile) or when the samples
    were drawn from another version of the data in ``folder``. A corrupt file is an error that
    names it."""
    from ..training.fit import read_checked

    path = samples_path(name, suffix)
    if not path.is_file():
        print(f"{path.name}: not found (the chapter that saves it has not run in this profile)")
        return None
    saved = read_checked(path, "sample file", "samples")
    missing = {"samples", "model", "data"} - set(saved)
    if missing:
        raise ValueError(f"{path}: not a sample file (missing {', '.join(sorted(missing))})")
    x = as_volumes(saved["samples"], f"{path}: samples")
    now = data_version(folder, x.shape[-1], ("T1",))
    if any(saved["data"].get(k) != now[k] for k in ("dataset", "manifest_sha256")):
        print(f"{path.name}: drawn from another version of the data ({saved['data'].get('dataset')}), not used")
        return None
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    return {"samples": x, "model": saved["model"]}
