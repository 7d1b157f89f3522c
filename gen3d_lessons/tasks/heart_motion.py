"""Generated heart motion (chapter 7): train :class:`~gen3d_lessons.models.motion.MotionVAE3D` and
check the generated hearts' ejection fractions against the real cohort, class by class.

A cardiologist reads a cine study first through a few numbers: the LV end-diastolic and
end-systolic volumes (EDV, ESV) and the ejection fraction ``EF = (EDV - ESV) / EDV``. A generator of
motion is useful only if those numbers come out right *per pathology*: a dilated cardiomyopathy
(DCM) pumps weakly, a hypertrophic one (HCM) strongly. So the test of the generator is

    for each class: the EF of generated hearts  ~  the EF of real hearts of that class,

as distributions, not only in the mean: the Wasserstein-1 distance (``scipy.stats.wasserstein_distance``)
between the two samples, held against the *split-half* distance (two random halves of the real
hearts: how far apart two honest samples of this size already are), and a two-sample
Kolmogorov-Smirnov test.

What is here, in the order a chapter uses it:

- data: :func:`load_heart_motion` reads ED and ES label maps, class and EF from a heart dataset
  folder; :func:`heart_config_of` and :func:`phantom_cohort` make *more* hearts of the same kind
  from the phantom (new subjects of the dataset's own generator), for a reference larger than
  the ~10 hearts per class of a 64-heart dataset. Both put the labels on one coarse grid as
  label fractions (:func:`label_fractions`);
- training: :func:`motion_vae_step` (one step on the negative ELBO) and :func:`train_motion_vae`;
- evaluation: :func:`motion_measures` (volumes and EF of every real and generated heart),
  :func:`ef_table` (per class and source) and :func:`goal_met`; :func:`cycle_phases` for a cine.

Volumes are sums of label *fractions* times the voxel volume: averaging full-resolution
one-hot labels onto the coarse grid keeps every structure's volume exactly, so a real heart's
EF on the coarse grid is its EF at full resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data import subject_seed
from ..data.batches import Batches
from ..data.datasets import read_dataset, load_case
from ..data.errors import DataError
from ..data.heart import HEART_CLASSES, HeartConfig, contraction_profile, make_heart_subject
from ..losses import gradient_loss, kl_to_standard_normal, soft_dice_loss
from ..models.motion import MotionVAE3D
from ..training.batch import batch_tensor
from ..training.fit import History, fit

__all__ = ["HeartMotionData", "label_fractions", "load_heart_motion", "heart_config_of", "new_subjects", "new_hearts",
           "COHORTS", "phantom_cohort", "ejection_error", "motion_vae_step", "train_motion_vae", "warmup_cosine",
           "structure_volumes_ml", "motion_measures", "split_half_w1", "ef_table", "goal_met", "cycle_phases",
           "SOURCES"]

LABELS = 4                                   # background, RV, MYO, LV (ACDC)
RV, LV = 1, 3
SOURCES = ("real", "generated", "mean motion")   # the rows of ef_table for each class


# 1. Data: ED and ES label fractions on one coarse grid ----------------------------------------

@dataclass
class HeartMotionData:
    """N hearts on one grid: ED and ES label fractions (N, 4, S, S, S), class indices (N,) into
    :data:`~gen3d_lessons.data.heart.HEART_CLASSES`, ids, and the grid's voxel edge (mm)."""

    ed: torch.Tensor
    es: torch.Tensor
    cls: torch.Tensor
    ids: list[str]
    voxel_mm: float

    def __post_init__(self):
        n = len(self.ids)
        if self.ed.shape != self.es.shape or self.ed.ndim != 5 or self.ed.shape[:2] != (n, LABELS):
            raise ValueError(f"HeartMotionData: ed and es must both be ({n}, {LABELS}, S, S, S), "
                             f"got {tuple(self.ed.shape)} and {tuple(self.es.shape)}")
        if not torch.is_floating_point(self.ed) or not torch.is_floating_point(self.es):
            raise ValueError(f"HeartMotionData: ed and es must be float label fractions, got {self.ed.dtype} "
                             f"and {self.es.dtype}")
        if self.cls.shape != (n,) or self.cls.dtype != torch.int64:
            raise ValueError(f"HeartMotionData: cls must be ({n},) int64 class indices, got {tuple(self.cls.shape)} "
                             f"{self.cls.dtype}")

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def cat(parts: Sequence["HeartMotionData"]) -> "HeartMotionData":
        """The hearts of several sets on one grid, one after the other (e.g. a dataset's and new ones)."""
        parts = list(parts)
        if not parts or not all(isinstance(p, HeartMotionData) for p in parts):
            raise ValueError("parts: expected a non-empty list of HeartMotionData")
        grids = {(p.voxel_mm, tuple(p.ed.shape[2:])) for p in parts}
        if len(grids) != 1:
            raise ValueError(f"parts: the sets lie on different grids (voxel mm, shape) {sorted(grids)}; "
                             "load them with the same voxel_mm and size")
        return HeartMotionData(torch.cat([p.ed for p in parts]), torch.cat([p.es for p in parts]),
                               torch.cat([p.cls for p in parts]), [i for p in parts for i in p.ids], parts[0].voxel_mm)

    @property
    def voxel_ml(self) -> float:
        return self.voxel_mm ** 3 / 1000.0

    @property
    def classes(self) -> list[str]:
        """The class name of every heart."""
        return [HEART_CLASSES[int(k)] for k in self.cls]


def _pool_factors(spacing: Sequence[float], voxel_mm: float, where: str) -> tuple[int, int, int]:
    """How many voxels of each axis make one ``voxel_mm`` voxel; whole numbers only."""
    factors = [voxel_mm / s for s in spacing]
    rounded = tuple(int(round(f)) for f in factors)
    if any(r < 1 or abs(f - r) > 1e-3 for f, r in zip(factors, rounded)):
        raise ValueError(f"{where}: voxels of {tuple(round(s, 3) for s in spacing)} mm do not tile {voxel_mm:g} mm "
                         "voxels; choose voxel_mm a whole multiple of every spacing")
    return rounded


def label_fractions(ed: np.ndarray, es: np.ndarray, spacing: Sequence[float], *, voxel_mm: float = 5.0,
                    size: int = 32, where: str = "labels") -> tuple[torch.Tensor, torch.Tensor]:
    """ED and ES label maps (X, Y, Z) -> label fractions (4, size, size, size) on ``voxel_mm`` voxels.

    1. one-hot, then the mean over each block of voxels that makes one ``voxel_mm`` voxel (thick
       short-axis slices and thin in-plane pixels end up as isotropic voxels, and every volume is kept);
    2. one ``size``³ window for both, centred on the box around the heart (labels > 0) at ED and
       ES, padded with background where it leaves the grid. A heart that does not fit is an error,
       not a crop.
    """
    if ed.shape != es.shape or ed.ndim != 3:
        raise ValueError(f"{where}: expected ED and ES label maps of one shape (X, Y, Z), got {ed.shape} and "
                         f"{es.shape}")
    if not voxel_mm > 0 or isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"{where}: expected voxel_mm > 0 and an integer size >= 4, got {voxel_mm!r}, {size!r}")
    for name, lab in (("ED", ed), ("ES", es)):
        if lab.min() < 0 or lab.max() >= LABELS:
            raise ValueError(f"{where}: {name} labels must be 0 (background), 1 (RV), 2 (MYO) or 3 (LV), "
                             f"found {sorted(set(np.unique(lab).tolist()) - set(range(LABELS)))}")
    pool = _pool_factors(spacing, voxel_mm, where)
    # 1. one-hot (2, K, X, Y, Z) -> block means (2, K, X', Y', Z')
    pair = torch.from_numpy(np.stack([ed, es]).astype(np.int64))
    x = F.one_hot(pair, LABELS).movedim(-1, 1).float()
    x = F.avg_pool3d(x, pool, ceil_mode=True)                          # a last partial block: its own mean
    # 2. the window: centred on the box around the heart at ED and ES
    heart = torch.nonzero(x[:, 0].amin(0) < 0.999)                     # voxels with some heart, ED or ES (M, 3)
    if not len(torch.nonzero(x[0, 0] < 0.999)):
        raise ValueError(f"{where}: the ED label map holds no heart (all background)")
    lo, hi = heart.min(0).values, heart.max(0).values
    if int((hi - lo).max()) + 1 > size:
        raise ValueError(f"{where}: the heart spans {(hi - lo + 1).tolist()} voxels of {voxel_mm:g} mm, more than "
                         f"size={size}; use a larger size or voxel_mm")
    start = ((lo + hi + 1) // 2 - size // 2).tolist()                  # window start per axis (may be < 0)
    out = torch.zeros(2, LABELS, size, size, size)
    out[:, 0] = 1.0                                                     # background outside the grid
    src, dst = [], []
    for axis, s0 in enumerate(start):
        n = x.shape[2 + axis]
        a, b = max(s0, 0), min(s0 + size, n)
        src.append(slice(a, b))
        dst.append(slice(a - s0, b - s0))
    out[(slice(None), slice(None), *dst)] = x[(slice(None), slice(None), *src)]
    return out[0], out[1]


def load_heart_motion(folder: str | Path, split: str = "train", *, voxel_mm: float = 5.0,
                      size: int = 32) -> HeartMotionData:
    """The ED and ES label maps of a heart dataset's ``split`` ("train", "test" or "all") as label
    fractions (:func:`label_fractions`), with each heart's class.

    The folder is an MSD-layout heart dataset such as ``ensure_dataset("heart")``: an ED label
    (``label``), an ES label (``es``) and a ``pathology`` attribute per case. Raises
    :class:`~gen3d_lessons.data.errors.DataError` naming the folder or file otherwise.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    index = read_dataset(folder)                                        # DataError: missing folder, layout
    records = index.cases if split == "all" else index.split(split)
    if not records:
        raise DataError(folder, f"has no {split!r} cases")
    ed, es, cls, ids = [], [], [], []
    for record in records:
        if "es" not in record.files or "label" not in record.files:
            raise DataError(folder, f"case {record.id} has no ED 'label' and ES 'es' label maps; expected a "
                                    "heart dataset such as ensure_dataset('heart')")
        pathology = record.attributes.get("pathology")
        if pathology not in HEART_CLASSES:
            raise DataError(folder, f"case {record.id}: pathology {pathology!r} is not one of {HEART_CLASSES}")
        case = load_case(record, ["label", "es"])
        a, b = label_fractions(case["label"].data, case["es"].data, case["label"].spacing, voxel_mm=voxel_mm,
                               size=size, where=str(record.files["label"]))
        ed.append(a)
        es.append(b)
        cls.append(HEART_CLASSES.index(pathology))
        ids.append(record.id)
    return HeartMotionData(torch.stack(ed), torch.stack(es), torch.tensor(cls), ids, float(voxel_mm))


def heart_config_of(folder: str | Path) -> tuple[HeartConfig, int]:
    """The :class:`~gen3d_lessons.data.heart.HeartConfig` a phantom heart dataset was made with,
    and its seed, from its ``dataset.json`` (frames, seed) and the grid of its first label map."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DataError(path, "not found; expected a heart dataset folder made by `gen3d data heart`")
    info = json.loads(path.read_text())
    if info.get("name") != "gen3d-heart" or "frames" not in info or "seed" not in info:
        raise DataError(path, "does not describe a phantom heart dataset (name 'gen3d-heart' with frames and "
                              "seed); only those can be extended with new subjects")
    record = read_dataset(folder, verify="none").cases[0]
    label = load_case(record, ["label"])["label"]
    cfg = HeartConfig(size=int(label.shape[0]), frames=int(info["frames"]))
    if not np.allclose(cfg.spacing, label.spacing, atol=1e-3):
        raise DataError(path, f"its voxels {label.spacing} are not those of HeartConfig(size={cfg.size}) "
                              f"{cfg.spacing}: not made with the default phantom settings")
    return cfg, int(info["seed"])


def phantom_cohort(cfg: HeartConfig, seeds: Sequence[int], pathologies: Sequence[str], *, voxel_mm: float = 5.0,
                   size: int = 32, prefix: str = "phantom") -> HeartMotionData:
    """New phantom hearts ``make_heart_subject(seed, cfg, pathology=p)``, as :func:`load_heart_motion`
    serves a dataset's.

    Only ED and ES are needed, and the phantom places them independently of the frames between:
    a two-frame cycle (ED, ES) gives the same label maps as ``cfg.frames`` frames, about six times
    faster (~0.08 s a heart at 64³). For subjects of a dataset's own generator, take
    ``heart_config_of(folder)`` and seeds ``subject_seed(dataset_seed, i)`` with ``i`` far beyond
    the dataset's size, e.g. from 1,000,000.
    """
    seeds, pathologies = [int(s) for s in seeds], list(pathologies)
    if not seeds or len(seeds) != len(pathologies):
        raise ValueError(f"seeds and pathologies: expected two lists of one non-zero length, got {len(seeds)} "
                         f"and {len(pathologies)}")
    from ..data.workers import in_workers

    two = replace(cfg, frames=2)
    jobs = [(seed, two, pathology, float(voxel_mm), int(size), f"{prefix} seed {seed}")
            for seed, pathology in zip(seeds, pathologies)]
    made = list(in_workers(_cohort_heart, jobs, work=(cfg.size / 64) ** 3 / 4, desc=f"{prefix} hearts"))
    return HeartMotionData(torch.stack([a for a, _ in made]), torch.stack([b for _, b in made]),
                           torch.tensor([HEART_CLASSES.index(p) for p in pathologies]),
                           [f"{prefix}_{seed}" for seed in seeds], float(voxel_mm))


def _cohort_heart(job: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The ED and ES label fractions of one heart of :func:`phantom_cohort` (run in a worker)."""
    seed, cfg, pathology, voxel_mm, size, where = job
    subject = make_heart_subject(seed, cfg, pathology=pathology)
    labels, spacing = subject["labels"], np.abs(np.diag(subject["affine"]))[:3]
    return label_fractions(labels[..., 0], labels[..., 1], spacing, voxel_mm=voxel_mm, size=size, where=where)


def new_subjects(dataset_seed: int, n: int, first: int = 1_000_000) -> tuple[list[int], list[str]]:
    """Seeds and classes (round-robin, as the dataset assigns them) of ``n`` new subjects of the
    dataset of ``dataset_seed``: subject indices ``first, first + 1, ...``, far from any dataset's."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of subjects, got {n!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first: expected a non-negative subject index, got {first!r}")
    idx = range(first, first + n)
    return [subject_seed(dataset_seed, i) for i in idx], [HEART_CLASSES[i % len(HEART_CLASSES)] for i in idx]


# The new hearts chapter 7 draws beside the dataset (cpu profile): subject indices, how many.
COHORTS = {"training": (1_000_000, 150), "reference": (2_000_000, 200)}


def new_hearts(folder: str | Path, which: str, n: int, *, voxel_mm: float = 5.0, size: int = 32) -> HeartMotionData:
    """``n`` new hearts of the dataset in ``folder`` (:func:`new_subjects` from index
    ``COHORTS[which][0]``, :func:`phantom_cohort`), made once and kept in ``data_root()/cohorts``:
    a file made for at least ``n`` of them on the same grid, for the same version of the dataset,
    is read (its first ``n``); otherwise they are made (about a tenth of a second a heart) and the
    file is written anew. ``gen3d hearts`` makes the cpu profile's cohorts with the data."""
    from ..data import data_root
    from ..training.fit import read_checked, save_checked
    from .yardstick import data_version

    if which not in COHORTS:
        raise ValueError(f"which: expected one of {sorted(COHORTS)}, got {which!r}")
    version = data_version(folder, size, ("labels",))
    path = data_root() / "cohorts" / f"hearts_{version['dataset']}_{which}.pt"
    key = {"manifest": version["manifest_sha256"], "size": int(size), "voxel_mm": float(voxel_mm)}
    if path.is_file():
        saved = read_checked(path, "heart cohort", "ed")
        if saved.get("key") == key and len(saved["ids"]) >= n:
            return HeartMotionData(saved["ed"][:n], saved["es"][:n], saved["cls"][:n], list(saved["ids"][:n]),
                                   float(voxel_mm))
    cfg, dataset_seed = heart_config_of(folder)
    made = phantom_cohort(cfg, *new_subjects(dataset_seed, n, first=COHORTS[which][0]), voxel_mm=voxel_mm, size=size,
                          prefix=which)
    save_checked({"ed": made.ed, "es": made.es, "cls": made.cls, "ids": made.ids, "key": key}, path, "ed")
    return made


# 2. Training ------------------------------------------------------------------------------------

def ejection_error(ed: torch.Tensor, es: torch.Tensor, es_hat: torch.Tensor) -> torch.Tensor:
    """``EF(ED, ES_hat) - EF(ED, ES)`` of the LV and of the RV as fractions, (B, 2), from label
    fractions (B, 4, *S): ``(V_ES - V_hat) / V_ED`` for each ventricle."""
    dims = tuple(range(2, ed.ndim))
    idx = [LV, RV]
    v_ed, v_es, v_hat = ed[:, idx].sum(dims), es[:, idx].sum(dims), es_hat[:, idx].sum(dims)   # (B, 2) voxels
    return (v_es - v_hat) / v_ed.clamp_min(1.0)


def motion_vae_step(batch: Mapping[str, Any], i: int, *, model: MotionVAE3D, optimizer: torch.optim.Optimizer,
                    beta: float = 1e-3, volume: float = 3.0, smooth: float = 0.01) -> dict[str, float]:
    """One step on the negative ELBO of the motion VAE; its reconstruction term has two parts, the
    overlap of the shapes and the two numbers a cardiologist reads first:

        loss = softDice(ES, ES_hat) + volume * mean |EF_hat - EF|      (reconstruction)
               + beta * KL(q(z | ED, ES, c) || N(0, I)) + smooth * mean |grad v|²,   ES_hat = ED o exp(v),

    with the EF errors of LV and RV as fractions (:func:`ejection_error`). Why the volume term, and
    why its absolute value: a smooth field on a 10 mm grid cannot thicken the wall exactly as the
    heart does, so Dice alone settles for a contraction 1-2 EF points short (it trades a little
    cavity overlap for wall overlap). A squared error would pull back in proportion to the error
    and stop where the two pulls balance, still short; the absolute error pulls with the same
    force until the volume is right. ``batch``: ``{"ed", "es": (B, 4, S, S, S), "cls": (B,)}``.
    Returns the loss, the mean Dice (RV, MYO, LV), the mean absolute LV EF error (EF points) and the KL.
    """
    device = next(model.parameters()).device
    # 1. data
    ed, es = batch_tensor(batch, "ed", device), batch_tensor(batch, "es", device)
    if "cls" not in batch:
        raise ValueError(f"batch: expected a 'cls' tensor of class indices, got {sorted(batch)}")
    c = batch["cls"].to(device)
    # 2. forward: encode both ends, sample z, deform ED to ES
    model.train()
    es_hat, mu, logvar, v = model(ed, es, c)
    # 3. the terms
    dice = soft_dice_loss(es, es_hat)
    ef_error = ejection_error(ed, es, es_hat)                           # (B, 2)
    kl = kl_to_standard_normal(mu, logvar).mean()
    rough = gradient_loss(v)
    loss = dice + volume * ef_error.abs().mean() + beta * kl + smooth * rough
    # 4. update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "dice": 1.0 - dice.item(),
            "ef_error": 100 * ef_error[:, 0].abs().mean().item(), "kl": kl.item()}


def train_motion_vae(model: MotionVAE3D, data: HeartMotionData, *, max_steps: int, batch: int = 4,
                     lr: float = 3e-3, beta: float = 1e-3, volume: float = 3.0, smooth: float = 0.01, seed: int = 0,
                     flip: bool = False, budget_s: float | None = None, desc: str = "motion VAE") -> History:
    """Train the motion VAE on ``data``: ``max_steps`` steps of :func:`motion_vae_step` on batches of
    ``batch`` hearts, with Adam at a rate that rises to ``lr`` and decays (:func:`warmup_cosine`).

    1. ``model.set_volume_stats`` on the training hearts (what the encoder standardises with);
    2. :func:`~gen3d_lessons.training.fit` over :class:`~gen3d_lessons.data.batches.Batches`,
       shuffled with ``seed`` (with ``flip``, also mirrored left-right: in a run this short the
       mirrored hearts, which the chapter never generates from, cost more than they teach); the
       reparameterisation noise comes from ``torch.manual_seed(seed)``, so a seed gives one model;
    3. ``model.fit_prior`` on the training hearts: the prior that generation draws from.

    ``budget_s`` is :func:`~gen3d_lessons.training.fit`'s fuse. Returns the
    :class:`~gen3d_lessons.training.History` (``loss``, ``dice``, ``ef_error`` in LV EF points, ``kl``).
    """
    if not isinstance(data, HeartMotionData):
        raise TypeError(f"data: expected HeartMotionData (load_heart_motion / phantom_cohort), "
                        f"got {type(data).__name__}")
    if tuple(data.ed.shape[2:]) != (model.cfg.size,) * 3:
        raise ValueError(f"data: hearts on a {tuple(data.ed.shape[2:])} grid, but the model expects "
                         f"{(model.cfg.size,) * 3}; load them with size={model.cfg.size}")
    if not lr > 0 or not min(beta, volume, smooth) >= 0:
        raise ValueError(f"lr must be > 0 and beta, volume, smooth >= 0, got lr={lr!r}, beta={beta!r}, "
                         f"volume={volume!r}, smooth={smooth!r}")
    torch.manual_seed(seed)
    model.set_volume_stats(data.ed, data.es, data.cls)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = Batches({"ed": data.ed, "es": data.es, "cls": data.cls}, batch, seed=seed,
                      augment=("ed", "es") if flip else ())
    vae_step = partial(motion_vae_step, model=model, optimizer=optimizer, beta=beta, volume=volume, smooth=smooth)

    def step(batch: Mapping[str, Any], i: int) -> dict[str, float]:
        for group in optimizer.param_groups:                            # the rate is a function of the step
            group["lr"] = lr * warmup_cosine(i, max_steps)
        return vae_step(batch, i)

    history = fit(step, batches, max_steps=max_steps, budget_s=budget_s, desc=desc)
    model.fit_prior(data.ed, data.es, data.cls)
    return history


def warmup_cosine(i: int, steps: int, warmup: float = 0.1) -> float:
    """The learning-rate factor at step ``i`` of ``steps``: a linear rise over the first ``warmup``
    share of the run, then half a cosine down to 0. The last steps take small, precise moves: an EF
    point is a few hundredths of a voxel of wall motion."""
    rise = max(1, int(warmup * steps))
    if i < rise:
        return (i + 1) / rise
    return 0.5 * (1 + np.cos(np.pi * min(i - rise, steps - rise) / max(steps - rise, 1)))


# 3. Evaluation ----------------------------------------------------------------------------------

def structure_volumes_ml(fractions: torch.Tensor, voxel_ml: float) -> dict[str, torch.Tensor]:
    """LV and RV volumes (ml) of label fractions (B, 4, *S): sums of fractions times the voxel volume."""
    dims = tuple(range(1, fractions.ndim - 1))                        # the spatial axes once a label is picked
    return {"LV": fractions[:, LV].sum(dims) * voxel_ml, "RV": fractions[:, RV].sum(dims) * voxel_ml}


def _rows(source: str, data: HeartMotionData, es: torch.Tensor, draw: int) -> pd.DataFrame:
    ed_vol, es_vol = structure_volumes_ml(data.ed, data.voxel_ml), structure_volumes_ml(es, data.voxel_ml)
    edv, esv = ed_vol["LV"].numpy(), es_vol["LV"].numpy()
    return pd.DataFrame({"id": data.ids, "class": data.classes, "source": source, "draw": draw,
                         "EDV": edv, "ESV": esv, "EF": 100 * (edv - esv) / edv,
                         "RV EF": 100 * (1 - es_vol["RV"].numpy() / ed_vol["RV"].numpy())})


@torch.no_grad()
def motion_measures(model: MotionVAE3D, data: HeartMotionData, *, draws: int = 4, seed: int = 0,
                    chunk: int = 16) -> pd.DataFrame:
    """LV EDV, ESV (ml), EF and RV EF (%) of every heart of ``data``, one row per heart and source:

    - ``"real"``: its own ED and ES;
    - ``"generated"``: its ED deformed by the model with ``draws`` fresh codes z ~ p(z | c) each
      (:meth:`~gen3d_lessons.models.motion.MotionVAE3D.prior_z`, seeded with ``seed``), so
      ``draws`` rows per heart;
    - ``"mean motion"``: its ED deformed with the prior's mean code, the typical motion of its
      class for its shape: what the model makes without its stochastic part (the baseline).

    Columns: id, class, source, draw, EDV, ESV, EF, RV EF.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws: expected a positive integer, got {draws!r}")
    if not isinstance(data, HeartMotionData):
        raise TypeError(f"data: expected HeartMotionData (load_heart_motion / phantom_cohort), "
                        f"got {type(data).__name__}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()

    def deform(mean: bool) -> torch.Tensor:                             # ES of every heart, chunk by chunk
        parts = []
        for a in range(0, len(data), chunk):
            ed, c = data.ed[a:a + chunk].to(device), data.cls[a:a + chunk].to(device)
            parts.append(model.deform(ed, c, model.prior_z(c, generator, mean=mean)).cpu())
        return torch.cat(parts)

    try:
        frames = [_rows("real", data, data.es, 0), _rows("mean motion", data, deform(mean=True), 0)]
        frames += [_rows("generated", data, deform(mean=False), k) for k in range(draws)]
    finally:
        model.train(was_training)
    return pd.concat(frames, ignore_index=True)


def split_half_w1(values: np.ndarray, splits: int = 20, seed: int = 0) -> float:
    """The mean Wasserstein-1 distance between two random halves of ``values`` over ``splits``
    seeded splits: how far apart two samples of half the size already are by chance."""
    from scipy.stats import wasserstein_distance

    values = np.asarray(values, dtype=float)
    if len(values) < 4:
        raise ValueError(f"values: a split-half distance needs at least 4 values, got {len(values)}")
    rng = np.random.default_rng(seed)
    half = len(values) // 2
    distances = []
    for _ in range(splits):
        order = rng.permutation(len(values))
        distances.append(wasserstein_distance(values[order[:half]], values[order[half:2 * half]]))
    return float(np.mean(distances))


def ef_table(measures: pd.DataFrame, *, splits: int = 20, seed: int = 0) -> pd.DataFrame:
    """Per class and source (real, generated, mean motion): the EF and volumes beside the real ones.

    Rows ``(class, source)``; columns ``n``, ``EF`` and ``EF sd`` (%), ``EDV`` and ``ESV`` (mean ml),
    ``RV EF`` (mean %), ``W1`` (Wasserstein-1 distance of the EF sample to the real one, %),
    ``split-half W1`` (the real hearts' own split-half distance, the bar, on every row of the class)
    and ``KS p`` (two-sample Kolmogorov-Smirnov p-value against the real EFs). The real rows have
    W1 = 0 and KS p = 1 by definition.
    """
    from scipy.stats import ks_2samp, wasserstein_distance

    missing = {"class", "source", "EF", "EDV", "ESV", "RV EF"} - set(measures.columns)
    if missing:
        raise ValueError(f"measures: missing the columns {sorted(missing)}; expected motion_measures(...)'s table")
    rows = {}
    for name in [k for k in HEART_CLASSES if k in set(measures["class"])]:
        of_class = measures[measures["class"] == name]
        real = of_class.loc[of_class["source"] == "real", "EF"].to_numpy()
        if len(real) == 0:
            raise ValueError(f"measures: class {name} has no real hearts to compare with")
        bar = split_half_w1(real, splits, seed) if len(real) >= 4 else float("nan")
        for source in [s for s in SOURCES if s in set(of_class["source"])]:
            part = of_class[of_class["source"] == source]
            ef = part["EF"].to_numpy()
            rows[(name, source)] = {
                "n": len(part), "EF": ef.mean(), "EF sd": ef.std(ddof=1) if len(ef) > 1 else float("nan"),
                "EDV": part["EDV"].mean(), "ESV": part["ESV"].mean(), "RV EF": part["RV EF"].mean(),
                "W1": wasserstein_distance(ef, real), "split-half W1": bar, "KS p": ks_2samp(ef, real).pvalue}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["class", "source"])
    return table


def goal_met(table: pd.DataFrame, source: str = "generated", alpha: float = 0.05) -> pd.Series:
    """Per class, whether ``source``'s EF distribution matches the real one: its W1 is below the
    real hearts' split-half W1, or the KS test does not tell them apart (p > ``alpha``).

    A class with fewer than 4 real hearts has no split-half distance, and a KS test on so few
    hearts cannot reject anything: its answer is False (not shown to match), not a pass.
    """
    sources = table.index.get_level_values("source")
    if source not in sources:
        raise ValueError(f"source: {source!r} is not in the table; it has {sorted(set(sources))}")
    rows = table.xs(source, level="source")
    matches = (rows["W1"] < rows["split-half W1"]) | (rows["KS p"] > alpha)
    return (rows["split-half W1"].notna() & matches).rename(f"goal met ({source})")


def cycle_phases(frames: int, es_fraction: float = 0.35) -> np.ndarray:
    """The contraction state s(t) of ``frames`` frames, 0 at ED and 1 at ES, as the phantom moves:
    what :meth:`~gen3d_lessons.models.motion.MotionVAE3D.cycle` scales the velocity by."""
    cfg = HeartConfig(frames=frames, es_fraction=es_fraction)          # validates both
    return contraction_profile(cfg.frames, cfg.es_frame)
