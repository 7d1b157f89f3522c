"""Classifying hearts (chapter 8): cohorts of label volumes, the cardiologist's measurements,
the scores, a latent path that explains a classifier, and :func:`classify` for a user's labels.

- :func:`heart_shapes`: a balanced cohort of the heart phantom's five classes (NOR, HCM, DCM,
  MINF, ARV), each heart's label maps and images at end-diastole (ED) and end-systole (ES);
- :func:`clinical_features`: what a cardiologist reads off the segmentations: LV and RV volumes
  at ED and ES, both ejection fractions, the myocardial mass and the largest wall thickness;
- :func:`class_scores`: balanced accuracy, per-class sensitivity and specificity, and the
  confusion matrix of one set of predictions; :func:`score_table` the same for several methods
  side by side, with the spread of the balanced accuracy over disjoint test folds;
- :func:`latent_path`: a heart's code moved step by step along the gradient of a
  :class:`~gen3d_lessons.models.shape_classifier.ShapeVAEClassifier`'s log-probability of a
  class, decoded; :func:`path_trend` says whether a measurement moves monotonically along it;
- :func:`classify`: one heart's ED and ES label maps -> its class and the probabilities, with a
  one-line error for whatever does not fit the model; :func:`load_classifier` reads back the
  model that chapter 8 saves;
- few labels (the section on them): :func:`labelled_subset` draws a few hearts per class,
  :func:`random_warps` is the classical augmentation, :func:`few_label_draw` trains a generator of
  new hearts on the few and the classifiers with and without its hearts; :func:`segment_hearts`
  turns images into the label maps a classifier reads (the whole pipeline).

Label maps follow ACDC (0 background, 1 RV, 2 MYO, 3 LV); volumes are ``(N, 2, D, H, W)``
(ED, ES) and ``spacing`` is the voxel size in mm (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.heart import HEART_CLASSES, HeartConfig, make_heart_subject
from ..progress import progress

__all__ = ["HeartShapes", "heart_shapes", "FEATURES", "clinical_features", "class_scores", "score_table", "latent_path",
           "path_trend", "classify", "load_classifier", "labelled_subset", "random_warps", "segment_hearts",
           "few_label_draw"]

FEATURES = ("LV EDV (ml)", "LV ESV (ml)", "RV EDV (ml)", "RV ESV (ml)", "LV EF (%)", "RV EF (%)",
            "myocardial mass (g)", "max wall thickness (mm)")
MYOCARDIUM_G_PER_ML = 1.05          # density of myocardium, the usual factor from volume to mass


@dataclass
class HeartShapes:
    """A cohort of hearts: labels (N, 2, D, H, W) int64 and images (N, 2, D, H, W) float32 at ED and ES,
    classes (N,) int64 (indices into ``HEART_CLASSES``), the voxel size and the phantom's attributes."""

    labels: torch.Tensor
    images: torch.Tensor
    classes: torch.Tensor
    spacing: tuple[float, float, float]
    attributes: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, idx: Any) -> "HeartShapes":
        """Some of the hearts: a slice, a (N,) bool mask or (B,) indices."""
        idx = torch.arange(len(self))[idx] if not isinstance(idx, torch.Tensor) else (
            idx.nonzero()[:, 0] if idx.dtype == torch.bool else idx)
        return HeartShapes(self.labels[idx], self.images[idx], self.classes[idx], self.spacing,
                           [self.attributes[i] for i in idx.tolist()])


def heart_shapes(n_per_class: int, seed: int, size: int = 32, fov_mm: float = 140.0, desc: str = "hearts") -> HeartShapes:
    """``n_per_class`` hearts of each class, subject seeds ``seed, seed + 1, ...`` (classes in turn), on a
    ``size``³ grid over ``fov_mm`` in-plane (slices twice as thick), ED and ES only (``frames=2``)."""
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class: expected a positive integer, got {n_per_class!r}")
    cfg = HeartConfig(size=size, frames=2, fov_mm=fov_mm)
    labels, images, classes, attributes = [], [], [], []
    for i in progress(range(n_per_class * len(HEART_CLASSES)), desc=desc):
        k = i % len(HEART_CLASSES)
        s = make_heart_subject(seed + i, cfg, pathology=HEART_CLASSES[k])
        labels.append(np.moveaxis(s["labels"], -1, 0))                    # (2, X, Y, Z)
        images.append(np.moveaxis(s["cine"], -1, 0))
        classes.append(k)
        attributes.append(s["attributes"])
    return HeartShapes(torch.from_numpy(np.stack(labels)).long(), torch.from_numpy(np.stack(images)),
                       torch.tensor(classes), tuple(float(v) for v in cfg.spacing), attributes)


def _label_volumes(labels: Any, name: str = "labels") -> np.ndarray:
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.ndim == 4:
        a = a[None]
    if a.ndim != 5 or a.shape[1] != 2:
        raise ValueError(f"{name}: expected ED and ES label maps, (N, 2, D, H, W) or (2, D, H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels (0 background, 1 RV, 2 MYO, 3 LV), got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 3):
        raise ValueError(f"{name}: expected labels 0..3 (background, RV, MYO, LV), got {a.min()}..{a.max()}")
    return a


def clinical_features(labels: Any, spacing: Sequence[float]):
    """The measurements of :data:`FEATURES` for every heart, a pandas DataFrame (N rows).

    Volumes count voxels; an EF is ``100 (EDV − ESV) / EDV`` (NaN for an empty cavity); the mass is
    the myocardial volume at ED times 1.05 g/ml; the largest wall thickness is twice the largest
    distance from a myocardial voxel to the nearest voxel outside the myocardium, at ED (in mm, the
    voxel size taken into account): the diameter of the largest ball that fits in the wall.
    """
    import pandas as pd
    from scipy import ndimage

    a = _label_volumes(labels)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing: expected three positive voxel sizes in mm, got {spacing!r}")
    ml = float(np.prod(sp)) / 1000.0
    rows = []
    for ed, es in a:
        lv, rv = [(ed == 3).sum() * ml, (es == 3).sum() * ml], [(ed == 1).sum() * ml, (es == 1).sum() * ml]
        myo = ed == 2
        thick = 2.0 * float(ndimage.distance_transform_edt(myo, sampling=sp).max()) if myo.any() else 0.0
        ef = lambda v: 100.0 * (v[0] - v[1]) / v[0] if v[0] > 0 else float("nan")     # noqa: E731
        rows.append([lv[0], lv[1], rv[0], rv[1], ef(lv), ef(rv), MYOCARDIUM_G_PER_ML * myo.sum() * ml, thick])
    return pd.DataFrame(rows, columns=list(FEATURES))


def class_scores(y_true: Any, y_pred: Any, classes: Sequence[str] = HEART_CLASSES) -> dict[str, Any]:
    """``{"balanced accuracy", "accuracy", "per class" (DataFrame: sensitivity, specificity), "confusion"
    (DataFrame: rows true, columns predicted)}`` for integer class predictions."""
    import pandas as pd

    t, p = np.asarray(y_true).astype(int).ravel(), np.asarray(y_pred).astype(int).ravel()
    if t.shape != p.shape or not len(t):
        raise ValueError(f"y_true, y_pred: expected two equally long, non-empty lists of classes, got {t.shape} and {p.shape}")
    k = len(classes)
    if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k:
        raise ValueError(f"y_true, y_pred: expected class indices 0..{k - 1} ({', '.join(classes)})")
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (t, p), 1)
    tp = np.diag(confusion).astype(float)
    positives, predicted = confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = tp / positives
        specificity = (len(t) - positives - predicted + tp) / (len(t) - positives)
    per_class = pd.DataFrame({"sensitivity": sensitivity, "specificity": specificity}, index=list(classes))
    return {"balanced accuracy": float(np.nanmean(sensitivity)), "accuracy": float(tp.sum() / len(t)),
            "per class": per_class,
            "confusion": pd.DataFrame(confusion, index=[f"true {c}" for c in classes], columns=list(classes))}


def score_table(y_true: Any, predictions: Mapping[str, Any], folds: int = 5, classes: Sequence[str] = HEART_CLASSES):
    """One row per method of ``predictions`` ``{name: classes (N,)}``: the balanced accuracy on the whole
    test set, its mean and standard deviation over ``folds`` disjoint test folds, and each class's
    sensitivity. Fold ``k`` holds hearts ``i`` with ``(i // len(classes)) % folds == k``: with the
    classes in turn (as :func:`heart_shapes` makes them), every fold is balanced."""
    import pandas as pd

    t = np.asarray(y_true).astype(int).ravel()
    fold = (np.arange(len(t)) // len(classes)) % folds
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1 or np.bincount(fold, minlength=folds).min() == 0:
        raise ValueError(f"folds: expected a positive number of folds, each with at least one heart, got {folds!r} "
                         f"for {len(t)} hearts")
    rows = {}
    for name, pred in predictions.items():
        p = np.asarray(pred).astype(int).ravel()
        whole = class_scores(t, p, classes)
        per_fold = [class_scores(t[fold == k], p[fold == k], classes)["balanced accuracy"] for k in range(folds)]
        rows[name] = {"balanced accuracy": whole["balanced accuracy"], "mean over folds": float(np.mean(per_fold)),
                      "std over folds": float(np.std(per_fold)),
                      **{f"sensitivity {c}": v for c, v in whole["per class"]["sensitivity"].items()}}
    return pd.DataFrame(rows).T


def latent_path(model: torch.nn.Module, labels: torch.Tensor, target: int, steps: int = 8,
                step_size: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One heart's code moved towards class ``target``: ``z_{k+1} = z_k + step_size · g / |g|`` with ``g``
    the gradient of ``log p(target | z_k)`` (normalised steps: the path moves at one speed).

    ``labels``: one heart, (2, D, H, W) or (1, 2, D, H, W). Returns the codes (steps + 1, Z), the first
    the heart's posterior mean, and their decoded label maps (steps + 1, 2, D, H, W) on the CPU."""
    if not 0 <= int(target) < model.cfg.classes:
        raise ValueError(f"target: expected a class index 0..{model.cfg.classes - 1}, got {target!r}")
    model.eval()
    device = next(model.parameters()).device
    x = labels[None] if labels.ndim == 4 else labels
    with torch.no_grad():
        z = model.vae.encode(model.one_hot(x.to(device)))[0]                 # (1, Z)
    path = [z]
    for _ in range(steps):
        z = path[-1].detach().requires_grad_(True)
        log_p = torch.log_softmax(model.head(z), 1)[0, int(target)]
        (g,) = torch.autograd.grad(log_p, z)
        path.append((z + step_size * g / g.norm().clamp_min(1e-12)).detach())
    codes = torch.cat(path)
    with torch.no_grad():
        return codes.cpu(), model.decode_labels(codes).cpu()


def path_trend(values: Sequence[float]) -> float:
    """Spearman's rank correlation of a measurement with the step along a path: +1 (or −1) when it
    rises (or falls) at every step; NaN when it does not change at all."""
    from scipy.stats import spearmanr

    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) < 3:
        raise ValueError(f"values: expected one measurement per step of a path (at least 3), got shape {v.shape}")
    return float("nan") if np.ptp(v) == 0 else float(spearmanr(np.arange(len(v)), v)[0])


def classify(model: torch.nn.Module, ed: Any, es: Any, classes: Sequence[str] = HEART_CLASSES) -> dict[str, Any]:
    """One heart's class from its end-diastolic and end-systolic label maps (D, H, W) each (0 background,
    1 RV, 2 MYO, 3 LV, on the grid the model was trained on). Returns ``{"class": name,
    "probabilities": {name: p}}``; a missing frame, a wrong grid, fractional or out-of-range labels get
    a one-line ``ValueError``."""
    n = model.cfg.size
    frames = []
    for name, v in (("ed", ed), ("es", es)):
        if v is None:
            raise ValueError(f"{name}: missing; classify needs both the ED and the ES label maps")
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.shape != (n, n, n):
            raise ValueError(f"{name}: expected a label map of shape ({n}, {n}, {n}) (the model's grid), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            if not (np.isfinite(a).all() and (a == np.round(a)).all()):
                raise ValueError(f"{name}: expected integer labels 0..3, got fractional or non-finite values")
            a = a.astype(np.int64)
        frames.append(a)
    labels = torch.from_numpy(_label_volumes(np.stack(frames), "ed, es").astype(np.int64))
    if len(classes) != model.cfg.classes:
        raise ValueError(f"classes: expected {model.cfg.classes} names (the model's classes), got {len(classes)}")
    p = model.predict_proba(labels)[0]
    return {"class": classes[int(p.argmax())], "probabilities": {c: float(q) for c, q in zip(classes, p)}}


def load_classifier(path: Any, device: Any = None) -> torch.nn.Module:
    """The :class:`~gen3d_lessons.models.shape_classifier.ShapeVAEClassifier` saved at ``path`` (chapter 8
    saves ``data/models/ch08_shape_vae.pt``), in eval mode; a missing file names the page that makes it."""
    from pathlib import Path

    from ..models.shape_classifier import ShapeVAEClassifier, ShapeVAEConfig
    from ..training import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; chapter 8 saves its classifier: run it first (gen3d run ch08_classification)")
    return load_model(path, lambda c: ShapeVAEClassifier(ShapeVAEConfig(**c)), device)


# ----- few labels: subsets, new hearts, the pipeline from images ----------------------------------

def labelled_subset(shapes: HeartShapes, n_per_class: int, seed: int, classes: int = len(HEART_CLASSES)) -> HeartShapes:
    """``n_per_class`` hearts of every class, drawn at random (``seed``) from ``shapes``."""
    g = torch.Generator().manual_seed(int(seed))
    picks = []
    for k in range(classes):
        members = (shapes.classes == k).nonzero()[:, 0]
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or not 1 <= n_per_class <= len(members):
            raise ValueError(f"n_per_class: expected 1..{len(members)} (the hearts of class {HEART_CLASSES[k]}), "
                             f"got {n_per_class!r}")
        picks.append(members[torch.randperm(len(members), generator=g)[:n_per_class]])
    return shapes[torch.cat(picks)]


def random_warps(labels: torch.Tensor, amplitude: float, generator: torch.Generator | None = None,
                 flow_grid: int = 8, sigma: float = 1.5) -> torch.Tensor:
    """The classical augmentation: every frame of every heart (N, F, D, H, W) warped by its own smooth
    random deformation (a Gaussian-smoothed velocity field on a ``flow_grid``³ grid with standard
    deviation ``amplitude`` in voxels of that grid, integrated by scaling and squaring)."""
    from .. import spatial
    from ..models.shape_classifier import one_hot_hearts
    from ..models.shape_generator import most_likely_labels, warp_frames

    if not amplitude >= 0:
        raise ValueError(f"amplitude: expected a non-negative velocity in voxels, got {amplitude!r}")
    x = one_hot_hearts(labels)                                               # (N, F * 4, D, H, W)
    n, f = labels.shape[:2]
    v = spatial.smooth_random_field((n * f, 3, flow_grid, flow_grid, flow_grid), sigma, float(amplitude), generator)
    return most_likely_labels(warp_frames(x, v.reshape(n, f * 3, *v.shape[2:]), f), f)


@torch.no_grad()
def segment_hearts(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Label maps (N, F, D, H, W) int64 from a segmenter of single frames (1 channel in, 4 classes out),
    applied to every frame of ``images`` (N, F, D, H, W), ``batch_size`` frames at a time
    (:func:`~gen3d_lessons.tasks.segment.predict_labels`)."""
    from .segment import predict_labels

    if not isinstance(images, torch.Tensor) or images.ndim != 5 or not images.is_floating_point():
        raise ValueError(f"images: expected float images (N, frames, D, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    frames = images.flatten(0, 1)[:, None]                                   # (N * F, 1, D, H, W)
    return predict_labels(model, frames, next(model.parameters()).device, batch_size).view(images.shape)


def few_label_draw(train: HeartShapes, test: HeartShapes, n_per_class: int, draw: int, *, generator_cfg: Any,
                   generator_steps: int, cnn_channels: Sequence[int], cnn_steps: int, batch: int = 8,
                   n_synthetic: int = 40, shift: int = 2, lr: float = 2e-3, cnn_norm: str = "batch", device: Any = "cpu",
                   test_inputs: torch.Tensor | None = None, test_features: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """One draw of the few-label study: ``n_per_class`` labelled hearts of every class (drawn with seed
    ``1000 n_per_class + draw``), a :class:`~gen3d_lessons.models.shape_generator.DeformationCVAE` trained on them, and
    ``n_synthetic`` new hearts per class from it (and as many random warps of the same size, the
    classical augmentation); then the clinical-feature logistic regression and a 3D CNN on one-hot
    label maps (:class:`~gen3d_lessons.models.shape_classifier.ImageCNN3D`) trained with and without
    them (every CNN with the same seed and steps; ``shift`` for the arms named "shifted"). Returns
    ``{method: balanced accuracy on test}`` and ``{"real", "generated", "warped", "classes", "velocity
    std", "generator"}`` (the labelled hearts, the new ones and their classes, the trained generator)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ..models.shape_classifier import ImageCNN3D, ImageCNNConfig, one_hot_hearts
    from ..models.shape_generator import DeformationCVAE
    from ..training.classification import train_classifier, train_deformation_cvae

    sub = labelled_subset(train, n_per_class, seed=1000 * n_per_class + draw)
    g = torch.Generator().manual_seed(int(draw))
    torch.manual_seed(draw)
    generator = DeformationCVAE(generator_cfg).to(device)
    train_deformation_cvae(generator, sub.labels, sub.classes, steps=generator_steps, batch=batch, lr=lr, seed=draw,
                           desc=f"generator, {n_per_class} per class")
    ys = torch.arange(len(HEART_CLASSES)).repeat_interleave(n_synthetic)
    src = torch.cat([(sub.classes == k).nonzero()[:, 0][torch.randint(n_per_class, (n_synthetic,), generator=g)]
                     for k in range(len(HEART_CLASSES))])
    made, v = generator.sample(sub.labels[src], ys, generator=g)
    warped = random_warps(sub.labels[src], float(v.std()), generator=g, flow_grid=generator.cfg.flow_grid)
    sets = {"real": (sub.labels, sub.classes), "generated": (torch.cat([sub.labels, made]), torch.cat([sub.classes, ys])),
            "warped": (torch.cat([sub.labels, warped]), torch.cat([sub.classes, ys]))}
    test_features = clinical_features(test.labels, test.spacing) if test_features is None else test_features
    test_inputs = one_hot_hearts(test.labels) if test_inputs is None else test_inputs
    y_test, scores = test.classes.numpy(), {}
    for name, (labels, y) in sets.items():
        f = clinical_features(labels, train.spacing).values
        ok = np.isfinite(f).all(1)                                           # a warped cavity may vanish: no EF
        lr_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(f[ok], y.numpy()[ok])
        scores[f"clinical LR, {name}"] = class_scores(y_test, lr_model.predict(test_features.values))["balanced accuracy"]
    arms = {"real": ("real", 0), "real, shifted": ("real", shift), "warped": ("warped", 0),
            "generated": ("generated", 0), "generated, shifted": ("generated", shift)}
    inputs = {name: one_hot_hearts(labels) for name, (labels, _) in sets.items()}    # once per set, shifted or not
    for name, (which, s) in arms.items():
        torch.manual_seed(0)
        cnn = ImageCNN3D(ImageCNNConfig(in_channels=8, channels=tuple(cnn_channels), norm=cnn_norm)).to(device)
        train_classifier(cnn, inputs[which], sets[which][1], steps=cnn_steps, batch=batch, lr=lr, seed=0, shift=s,
                         desc=f"CNN, {name}")
        scores[f"CNN, {name}"] = class_scores(y_test, cnn.predict_proba(test_inputs).argmax(1).numpy())["balanced accuracy"]
    return scores, {"real": sub, "generated": made, "warped": warped, "classes": ys, "velocity std": float(v.std()),
                    "generator": generator}
