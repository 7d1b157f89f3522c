"""Unconditional synthesis (chapter 7): what the generators learned, against how the cohort was made.

The brain phantoms are the template of chapter 1 warped by a random diffeomorphism, then rendered.
A generator that also warps a template (:class:`~gen3d_lessons.models.shapetexture.ShapeTextureGenerator3D`)
can therefore be compared with the truth in a way no real dataset allows: its deformations
against the deformations that made the real brains. :func:`deformation_table` puts the two side
by side (:func:`gen3d_lessons.spatial.deformation_summary` of each set, in mm).

:func:`atlas_score` is an anatomy check that needs no encoder, the Realistic Atlas Score of
Volokitin et al. (2020): segment each volume into tissues, align it to the template by an affine
map, and measure how well its tissue map overlaps the template's. A generated brain with its
tissues in the wrong places scores low however sharp it looks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .. import spatial
from ..data.datasets import read_dataset

__all__ = ["true_deformations", "deformation_table", "cost_table", "moment_affine", "atlas_score"]


def true_deformations(folder: str | Path, n: int, split: str = "train") -> tuple[torch.Tensor, float, torch.Tensor]:
    """The displacement fields that made the first ``n`` brains of a split, regenerated from their seeds.

    Returns the fields (n, 3, S, S, S) in voxels of the dataset's grid, its voxel size in mm, and a
    brain mask (S, S, S): where the mean of the fields' brains is brain (label > 0 in half of them).
    """
    from ..data.brain import brain_config_of, make_brain_subject

    cfg = brain_config_of(folder)
    attrs = read_dataset(folder).attributes_table().query(f"split == {split!r}")
    if not 1 <= n <= len(attrs):
        raise ValueError(f"n: expected 1..{len(attrs)} subjects of the {split!r} split, got {n!r}")
    fields, brains = [], []
    for seed in attrs["seed"].iloc[:n]:
        s = make_brain_subject(int(seed), cfg)
        fields.append(torch.from_numpy(s["displacement"]))
        brains.append(torch.from_numpy(s["label"] > 0))
    spacing = float(np.abs(np.diag(s["affine"]))[0])
    return torch.stack(fields), spacing, torch.stack(brains).float().mean(0) >= 0.5


def deformation_table(generator: Any, n: int, folder: str | Path, mask: torch.Tensor, seed: int = 0):
    """The generator's deformations beside the phantom's, as a pandas DataFrame (rows: the two sets).

    ``generator.deformation(z)`` gives (n, 3, s, s, s) in voxels of its output grid (``s``³
    spanning the dataset's field of view); ``mask`` (s, s, s) is the brain on that grid (e.g. the
    mean training volume above a threshold). Codes ``z ~ N(0, I)`` from ``seed``.
    """
    import pandas as pd

    true, spacing, true_mask = true_deformations(folder, n)
    s = generator.cfg.size
    if tuple(mask.shape) != (s, s, s):
        raise ValueError(f"mask: expected shape ({s}, {s}, {s}), the generator's grid, got {tuple(mask.shape)}")
    z = torch.randn(n, generator.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        learned = generator.deformation(z.to(next(generator.parameters()).device)).cpu()
    out_spacing = spacing * (true.shape[-1] - 1) / (s - 1)             # the same field of view on s voxels
    return pd.DataFrame({"the phantom's deformations (training brains)": spatial.deformation_summary(true, spacing, true_mask),
                         "Shape + Texture samples": spatial.deformation_summary(learned, out_spacing, mask)}).T


def cost_table(models: Mapping[str, Any], histories: Mapping[str, Any]):
    """What each generator cost, as a pandas DataFrame (one row per model): its parameters (all of
    them, in millions: a frozen EMA copy counts too), the bytes of its layer outputs for one
    sample (MB; :func:`~gen3d_lessons.training.benchmark.activation_bytes`, roughly what
    backpropagation keeps per sample; operations outside layers, such as warping, are not
    counted), and the seconds per training step of the whole run (every network of the model, and
    the probes, included: ``history.seconds / history.steps``)."""
    import pandas as pd

    from ..training.benchmark import activation_bytes

    missing = [m for m in models if m not in histories]
    if missing:
        raise ValueError(f"histories: no history for {missing}")
    rows = {}
    for name, g in models.items():
        z = torch.randn(1, g.cfg.z_dim, generator=torch.Generator().manual_seed(0)).to(next(g.parameters()).device)
        h = histories[name]
        rows[name] = {"generator parameters (M)": sum(p.numel() for p in g.parameters()) / 1e6,
                      "activations per sample (MB)": activation_bytes(g, z) / 2**20,
                      "seconds per step": h.seconds / max(h.steps, 1)}
    return pd.DataFrame(rows).T



def moment_affine(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The axis-aligned affine (a scale per axis and a shift) that maps ``mask``'s centre of mass and
    spread onto ``target``'s, as a (4, 4) matrix from target voxels to mask voxels.

    Closed form, from the first and second moments of the two masks: enough to align brains that
    share an orientation (the generators draw them in the template's pose), and fast enough to run
    on every sample of every model.
    """
    stats = []
    for name, m in (("mask", mask), ("target", target)):
        pts = np.argwhere(np.asarray(m, dtype=bool)).astype(np.float64)
        if len(pts) < 10:
            raise ValueError(f"{name}: {len(pts)} voxels, too few to align (is the volume empty?)")
        stats.append((pts.mean(0), pts.std(0).clip(min=0.5)))
    (c_m, s_m), (c_t, s_t) = stats
    scale = s_m / s_t                                                        # target voxel -> mask voxel
    out = np.eye(4)
    out[:3, :3] = np.diag(scale)
    out[:3, 3] = c_m - scale * c_t
    return out


def atlas_score(volumes: Any, template_labels: Any, classes: tuple[int, ...] = (1, 2, 3), segment: Any = None,
                ) -> np.ndarray:
    """The Realistic Atlas Score of each volume: mean Dice over ``classes`` between its tissue map,
    aligned to the template, and the template's labels. Returns one score per volume.

    ``volumes`` (N, 1, *S) or (N, *S) T1 images; ``template_labels`` (*S) ints (0 background, then
    the tissues). ``segment(image) -> labels`` defaults to
    :func:`gen3d_lessons.baselines.segmentation.classical_tissue_classifier` inside the mask that
    :func:`~gen3d_lessons.baselines.segmentation.brain_mask_from_intensity` finds: a classical
    classifier that no generator was trained against. Each label map is aligned to the template
    by :func:`moment_affine` of the two brain masks (nearest neighbour), then scored.
    """
    from scipy import ndimage

    from ..baselines.segmentation import brain_mask_from_intensity, classical_tissue_classifier
    from ..metrics.segmentation import dice

    x = volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    x = x[:, 0] if x.ndim == 5 else x
    target = np.asarray(template_labels)
    if x.ndim != 4 or x.shape[1:] != target.shape:
        raise ValueError(f"volumes: expected (N, 1, *S) or (N, *S) with S = {target.shape}, got {np.shape(volumes)}")
    if segment is None:
        def segment(image):
            return classical_tissue_classifier(image, brain_mask_from_intensity(image))
    scores = []
    for image in x:
        labels = np.asarray(segment(image))
        m = moment_affine(labels > 0, target > 0)
        aligned = ndimage.affine_transform(labels, m[:3, :3], offset=m[:3, 3], output_shape=target.shape, order=0)
        scores.append(float(np.nanmean(list(dice(aligned, target, labels=list(classes)).values()))))
    return np.array(scores)
