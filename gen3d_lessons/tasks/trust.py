"""Chapter 16: can a 3D segmenter be trusted? Site shift, harmonisation, uncertainty, explanations.

1. **Site shift.** :func:`site_renders` makes new brains of a dataset's generator and renders each
   one at every acquisition site: the same anatomy, age and lesions, only the scanner's contrast,
   bias and noise differ, so a Dice gap between sites is the site's doing alone.
2. **Harmonisation.** :func:`intensity_augment` (a training transform: random gamma per contrast,
   a smooth bias field, noise) and :func:`match_histograms` (a test-time mapping of each contrast's
   intensities onto a reference's quantiles).
3. **Uncertainty.** :func:`mc_dropout_probabilities` (dropout left on at test time) and
   :func:`mean_probabilities` of a deep ensemble; :func:`calibration` (expected calibration error,
   reliability bins), :func:`fit_temperature`, and :func:`error_auroc` (does the entropy of the
   prediction find the voxels it gets wrong?).
4. **Explanations.** :func:`input_gradient` of a score with respect to the input, and
   :func:`enrichment`: how much more of the gradient falls on a region than its size would give.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.brain import BrainConfig, brain_config_of, make_brain_subject
from ..data.workers import in_workers

FIRST_RENDER = 3_000_000      # subject indices of the renders: far from the dataset's and the other cohorts'


# 1. The same brains at every site ----------------------------------------------------------------

def _render(job: tuple) -> tuple[torch.Tensor, np.ndarray, dict]:
    seed, cfg, site = job
    s = make_brain_subject(seed, cfg, site=site)
    return torch.from_numpy(np.ascontiguousarray(s["image"])).permute(3, 0, 1, 2), s["label"], s["attributes"]


def _dataset_seed(folder: Any) -> int:
    """The seed a dataset was generated with (its subjects are ``subject_seed(seed, i)``)."""
    return int(json.loads((Path(folder) / "dataset.json").read_text()).get("seed", 0))


def site_renders(folder: Any, n: int, *, first: int = FIRST_RENDER) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``n`` new brains of the dataset in ``folder``, each rendered at every site of its generator.

    Returns images (sites, n, 4, D, H, W) float32 (the dataset's channels), labels (n, 1, D, H, W)
    int64 (the same at every site: the site changes the image, not the anatomy) and the brains'
    attributes (age, lesions, ...; ``site`` is the drawn one, ignored here)."""
    from ..data import subject_seed

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of brains, got {n!r}")
    cfg: BrainConfig = brain_config_of(folder)
    seeds = [subject_seed(_dataset_seed(folder), first + i) for i in range(n)]
    jobs = [(seed, cfg, site) for site in range(len(cfg.sites)) for seed in seeds]
    made = list(in_workers(_render, jobs, work=(cfg.size / 64) ** 3, desc="brains at every site"))
    images = torch.stack([x for x, _, _ in made]).view(len(cfg.sites), n, *made[0][0].shape)
    labels = [lab for _, lab, _ in made]
    if any(not np.array_equal(labels[i], labels[i % n]) for i in range(len(labels))):
        raise RuntimeError("site_renders: a brain's labels changed with its site; the generator no longer keeps "
                           "anatomy and site apart")
    return images, torch.from_numpy(np.stack(labels[:n]))[:, None].long(), [a for _, _, a in made[:n]]


def lesion_brain(folder: Any, site: int, *, index: int = FIRST_RENDER - 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A new brain of the dataset's generator made with lesions, at ``site``: image (1, 4, D, H, W)
    and labels (1, 1, D, H, W), lesions labelled 4 (for an explanation that must find them)."""
    from ..data import subject_seed

    cfg = brain_config_of(folder)
    seed = subject_seed(_dataset_seed(folder), index)
    s = make_brain_subject(seed, cfg, has_lesion=True, site=site)
    image = torch.from_numpy(np.ascontiguousarray(s["image"])).permute(3, 0, 1, 2)
    return image[None], torch.from_numpy(s["label"].astype(np.int64))[None, None]


# 2. Harmonisation --------------------------------------------------------------------------------

def intensity_augment(batch: dict, generator: torch.Generator, *, gamma: float = 0.25, bias: float = 0.15,
                      noise: float = 0.03) -> dict:
    """A :class:`~gen3d_lessons.data.batches.CropBatches` transform: flip left-right, then for each
    crop and contrast a random gamma ``x ** exp(gamma · N(0, 1))``, one linear log-bias field across
    the crop (slope ``bias · N(0, 1)`` per axis) and Gaussian noise of a random std up to ``noise``.
    The labels are unchanged: the network must read tissue through any such contrast."""
    from ..data.batches import random_flip

    batch = random_flip(batch, generator)
    x = batch["image"].clamp_min(0.0)
    b, c, *shape = x.shape
    g = torch.exp(gamma * torch.randn(b, c, 1, 1, 1, generator=generator))
    ramps = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    slopes = bias * torch.randn(b, 1, 3, generator=generator)
    field = sum(slopes[:, :, k, None, None, None] * ramps[k] for k in range(3))       # (B, 1, *S)
    sigma = noise * torch.rand(b, 1, 1, 1, 1, generator=generator)
    out = x ** g * field.exp() + sigma * torch.randn(x.shape, generator=generator)
    return {**batch, "image": out * (batch["image"] != 0)}                           # the background stays 0


def match_histograms(images: torch.Tensor, reference: torch.Tensor, *, quantiles: int = 101) -> torch.Tensor:
    """Each volume's intensities (N, C, *S), contrast by contrast inside its brain (non-zero voxels),
    mapped onto the pooled quantiles of the ``reference`` volumes (M, C, *S) of the same contrasts:
    a monotone remapping that makes every histogram look like the reference site's."""
    if images.ndim != 5 or reference.ndim != 5 or images.shape[1] != reference.shape[1]:
        raise ValueError(f"match_histograms: expected images (N, C, D, H, W) and reference (M, C, D, H, W) with "
                         f"the same contrasts, got {tuple(images.shape)} and {tuple(reference.shape)}")
    q = torch.linspace(0, 1, quantiles)
    out = images.clone()
    for c in range(images.shape[1]):
        ref = reference[:, c][reference[:, c] != 0]
        if ref.numel() == 0:
            raise ValueError(f"match_histograms: reference contrast {c} is empty (no non-zero voxel)")
        target = torch.quantile(ref[torch.linspace(0, ref.numel() - 1, min(ref.numel(), 2**20)).long()], q)
        for i in range(len(images)):
            inside = images[i, c] != 0
            v = images[i, c][inside]
            if v.numel():
                source = torch.quantile(v, q)
                out[i, c][inside] = torch.from_numpy(np.interp(v.numpy(), source.numpy(), target.numpy())).float()
    return out


# 3. Uncertainty ----------------------------------------------------------------------------------

@contextmanager
def dropout_on(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (batch norm uses its running statistics) but its dropout layers
    sampling, as Monte Carlo dropout needs; restores the modes after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not drops or all(m.p == 0 for m in drops):
        raise ValueError("dropout_on: the model has no dropout to sample (build it with dropout > 0)")
    for m in drops:
        m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


@torch.no_grad()
def _probabilities(model: nn.Module, images: torch.Tensor, device: Any, batch_size: int) -> torch.Tensor:
    """:func:`~gen3d_lessons.tasks.segment.predict_probabilities` in batches, the model's modes as they are."""
    from .segment import predict_probabilities

    return torch.cat([predict_probabilities(model, images[i:i + batch_size], device, set_eval=False)
                      for i in range(0, len(images), batch_size)])


def mean_probabilities(models: Sequence[nn.Module], images: torch.Tensor, *, device: Any = None,
                       batch_size: int = 4) -> torch.Tensor:
    """The mean softmax (N, K, *S) of ``models`` (a deep ensemble; one model: its own) in eval mode."""
    if not models:
        raise ValueError("mean_probabilities: expected at least one model")
    total = None
    for model in models:
        p = _probabilities(model.eval(), images, device, batch_size)
        total = p if total is None else total + p
    return total / len(models)


def mc_dropout_probabilities(model: nn.Module, images: torch.Tensor, passes: int, *, seed: int = 0,
                             device: Any = None, batch_size: int = 4) -> torch.Tensor:
    """The mean softmax (N, K, *S) over ``passes`` forward passes with dropout sampling (seeded)."""
    if passes < 1:
        raise ValueError(f"passes: expected at least 1, got {passes}")
    torch.manual_seed(seed)
    with dropout_on(model):
        return sum(_probabilities(model, images, device, batch_size) for _ in range(passes)) / passes


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """The entropy (N, *S) in nats of class probabilities (N, K, *S): 0 when sure, log K when not."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def _voxels(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if probs.ndim != 5 or labels.shape != (probs.shape[0], 1, *probs.shape[2:]) or mask.shape != labels.shape:
        raise ValueError(f"expected probabilities (N, K, *S), labels and mask (N, 1, *S); got {tuple(probs.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(mask.shape)}")
    inside = mask[:, 0].bool()
    return probs.movedim(1, -1)[inside], labels[:, 0][inside]                          # (V, K), (V,)


def calibration(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error of the top class inside ``mask``: voxels binned by confidence
    (the top probability) into ``bins`` equal bins; ECE = sum over bins of (share of voxels) x
    |accuracy - mean confidence|. Returns ``{"ece", "bins": [(confidence, accuracy, share), ...]}``."""
    p, y = _voxels(probs, labels, mask)
    confidence, guess = p.max(1)
    correct = (guess == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1])
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            share = float(sel.float().mean())
            conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
            rows.append((conf, acc, share))
            ece += share * abs(acc - conf)
    return {"ece": ece, "bins": rows, "accuracy": float(correct.mean())}


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature scaling on probabilities: ``softmax(log p / T)`` (T > 1 softens, T < 1 sharpens)."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    return (probs.clamp_min(1e-12).log() / temperature).softmax(1)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    grid: Sequence[float] = tuple(np.round(np.geomspace(0.25, 4.0, 41), 4))) -> float:
    """The temperature of ``grid`` with the lowest negative log-likelihood of ``labels`` inside
    ``mask`` (fit it on validation volumes, never on the test ones)."""
    p, y = _voxels(probs, labels, mask)
    log_p = p.clamp_min(1e-12).log()
    nll = [float(F.cross_entropy(log_p / t, y)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def error_auroc(probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, score: Callable = entropy) -> float:
    """The area under the ROC curve of ``score(probs)`` (entropy by default) for telling the voxels
    inside ``mask`` that the top class gets wrong from those it gets right (0.5: no better than
    chance). NaN when every voxel is right (or wrong)."""
    from sklearn.metrics import roc_auc_score

    _voxels(probs, labels, mask)
    inside = mask[:, 0].bool()
    wrong = (probs.argmax(1) != labels[:, 0])[inside].numpy()
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(roc_auc_score(wrong, score(probs)[inside].numpy()))


# 4. Explanations ---------------------------------------------------------------------------------

def input_gradient(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """|d score(x) / d x| summed over channels: (N, *S) for inputs (N, C, *S). ``score`` maps the
    input batch to one number (e.g. the logit of a class summed over a region)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(x), x)
    return grad.abs().sum(1)


def enrichment(saliency: torch.Tensor, region: torch.Tensor, within: torch.Tensor) -> float:
    """How much more of the saliency falls on ``region`` than its size gives: (saliency mass on
    region / mass within ``within``) / (region voxels / voxels of ``within``); 1 means no preference.
    All three (N, *S) or (*S); ``region`` is counted only inside ``within``."""
    if saliency.shape != region.shape or region.shape != within.shape:
        raise ValueError(f"enrichment: saliency, region and within must share a shape, got {tuple(saliency.shape)}, "
                         f"{tuple(region.shape)} and {tuple(within.shape)}")
    inside, reg = within.bool(), region.bool() & within.bool()
    if not reg.any() or not inside.any():
        raise ValueError("enrichment: the region (or within) holds no voxel")
    mass = saliency[reg].sum() / saliency[inside].sum().clamp_min(1e-20)
    return float(mass / (reg.sum() / inside.sum()))


# 5. The chapter's tables -------------------------------------------------------------------------

def _dice(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: Any) -> np.ndarray:
    """Mean tissue Dice (CSF, GM, WM; lesions as WM) per volume."""
    from .fewshot import tissue_dice
    from .segment import predict_labels

    return tissue_dice(predict_labels(model, images, device), labels[:, 0])


def site_table(arms: dict[str, tuple[nn.Module, Callable | None]], renders: torch.Tensor, labels: torch.Tensor,
               reference: int, *, device: Any = None):
    """Mean tissue Dice of each arm ``{name: (model, test-time mapping or None)}`` on the renders of
    every site (:func:`site_renders`), and each arm's gap: Dice at the ``reference`` site minus Dice
    at the site, the worst of them in ``"worst gap"``. Returns (table indexed by arm with one column
    per site and per gap, per-brain Dice {arm: (sites, n)})."""
    import pandas as pd

    rows, per_brain = {}, {}
    for name, (model, mapping) in arms.items():
        scores = np.stack([_dice(model, mapping(renders[s]) if mapping else renders[s], labels, device)
                           for s in range(len(renders))])                          # (sites, n)
        per_brain[name] = scores
        mean = np.nanmean(scores, axis=1)
        gaps = {f"gap, site {s}": mean[reference] - mean[s] for s in range(len(renders)) if s != reference}
        rows[name] = {**{f"Dice, site {s}": mean[s] for s in range(len(renders))}, **gaps, "worst gap": max(gaps.values())}
    return pd.DataFrame(rows).T, per_brain


def subgroup_table(per_brain: np.ndarray, attributes: Sequence[dict]):
    """Per-brain Dice (sites, n) averaged over sites, grouped: the older and younger half by age
    (split at the median), with and without lesions. Indexed by group: brains, mean Dice."""
    import pandas as pd

    dice = np.nanmean(per_brain, axis=0)
    age = np.array([a["age"] for a in attributes], dtype=float)
    lesion = np.array([bool(a["has_lesion"]) for a in attributes])
    groups = {"older half": age > np.median(age), "younger half": age <= np.median(age),
              "with lesions": lesion, "without lesions": ~lesion}
    return pd.DataFrame({g: {"brains": int(m.sum()), "mean age": float(age[m].mean()) if m.any() else float("nan"),
                             "Dice": float(dice[m].mean()) if m.any() else float("nan")} for g, m in groups.items()}).T


def uncertainty_table(test: dict[str, torch.Tensor], val: dict[str, torch.Tensor], test_labels: torch.Tensor,
                      val_labels: torch.Tensor, *, bins: int = 15):
    """For each way of predicting ``{name: probabilities}`` (on the test and on the validation
    volumes): tissue Dice, the ECE before and after temperature scaling (the temperature fitted on
    the validation volumes), and the AUROC of the entropy for the voxels it gets wrong, all inside
    the brain. Returns (table indexed by name, reliability bins after and before {name: (...)})."""
    import pandas as pd

    from .fewshot import tissue_dice

    mask_t, mask_v = test_labels > 0, val_labels > 0
    rows, reliability = {}, {}
    for name, probs in test.items():
        t = fit_temperature(val[name], val_labels, mask_v)
        before, after = calibration(probs, test_labels, mask_t, bins), calibration(tempered(probs, t), test_labels, mask_t, bins)
        rows[name] = {"Dice": float(np.nanmean(tissue_dice(probs.argmax(1), test_labels[:, 0]))),
                      "ECE": before["ece"], "temperature": t, "ECE, calibrated": after["ece"],
                      "error AUROC": error_auroc(probs, test_labels, mask_t), "voxel error": 1 - before["accuracy"]}
        reliability[name] = (before["bins"], after["bins"])
    return pd.DataFrame(rows).T, reliability


def lesion_saliency(model: nn.Module, image: torch.Tensor, label: torch.Tensor, lesion: int = 4) -> torch.Tensor:
    """The input gradient (1, *S) of the network's lesion logit summed over the true lesion, for one
    volume (1, C, *S) and its labels (1, 1, *S): which voxels move the lesion's score."""
    from ..models.unet import pad_to_multiple

    model.eval()
    region = (label[:, 0] == lesion)
    if not region.any():
        raise ValueError("lesion_saliency: this brain has no lesion voxel")
    padded, crop = pad_to_multiple(image, getattr(model.cfg, "divisor", 8))
    device = next(model.parameters()).device
    score = lambda x: model(x)[(slice(None), lesion, *crop)][region.to(x.device)].sum()   # noqa: E731
    return input_gradient(score, padded.to(device))[(slice(None), *crop)].cpu()


def class_saliency(classifier: nn.Module, labels: torch.Tensor, target: int) -> torch.Tensor:
    """The input gradient (B, *S) of chapter 8's shape classifier's log-probability of class
    ``target`` with respect to its one-hot input, summed over frames and labels, for hearts
    (B, frames, *S) of label maps."""
    classifier.eval()
    device = next(classifier.parameters()).device
    score = lambda x: classifier.head(classifier.vae.encode(x)[0]).log_softmax(1)[:, target].sum()   # noqa: E731
    return input_gradient(score, classifier.one_hot(labels.to(device)).float()).cpu()
