"""Super-resolution of thick slices (chapter 9): the acquisition, the interpolations, the network
applied to a new volume, and the scores.

- :func:`thick_slabs`: what a scanner with ``factor`` times thicker slices records: the mean of
  each run of ``factor`` consecutive slices along ``axis`` (a box slice profile);
- :func:`interpolate_slabs`: back onto the fine grid by a spline along the slice axis (order 1:
  linear; order 3: cubic B-spline), slab ``k`` centred on fine slice ``k · factor + (factor − 1) / 2``;
- :func:`super_resolve`: a trained :class:`~gen3d_lessons.models.superres.SRNet3D` on a thick
  volume of any orientation, with one-line errors for what it cannot use;
- :func:`slab_batches`: random training patches of aligned thick and fine volumes;
- :func:`sr_table`: PSNR and SSIM inside the brain, and how sharp the result is, in the slice
  direction and in all directions.

Volumes are 3D arrays ``(D, H, W)`` with intensities in [0, 1]; ``axis`` is the slice axis.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from ..metrics.checks import as_volume
from ..metrics.image import detail_scores, scores
from ..models.apply import checked_volume
from ..models.superres import SRNet3D

__all__ = ["thick_slabs", "interpolate_slabs", "super_resolve", "slab_batches", "sr_table"]


def _check_geometry(factor: Any, axis: Any) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
        raise ValueError(f"factor: expected an integer slice-thickness ratio of at least 2, got {factor!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis: expected the slice axis 0, 1 or 2, got {axis!r}")


def thick_slabs(volume: Any, factor: int = 3, axis: int = 2) -> np.ndarray:
    """The mean of every ``factor`` consecutive slices along ``axis``: a ``factor`` times thicker
    slice with a box profile. Slices past the last whole slab are dropped. Returns float32."""
    _check_geometry(factor, axis)
    x = as_volume(volume, "volume")
    n = x.shape[axis] // factor
    if n < 2:
        raise ValueError(f"volume: {x.shape[axis]} slices along axis {axis} make fewer than 2 slabs of {factor}")
    x = np.moveaxis(x, axis, 0)[: n * factor]
    slabs = x.reshape(n, factor, *x.shape[1:]).mean(1)
    return np.moveaxis(slabs, 0, axis).astype(np.float32)


def interpolate_slabs(thick: Any, factor: int = 3, axis: int = 2, order: int = 3, size: int | None = None) -> np.ndarray:
    """Thick slabs back on the fine grid: ``size`` slices along ``axis`` (default ``factor`` per
    slab), by a spline of ``order`` along that axis only (1 linear, 3 cubic B-spline); values
    beyond the first and last slab centres repeat the edge. Returns float32."""
    _check_geometry(factor, axis)
    if order not in (0, 1, 3):
        raise ValueError(f"order: expected 0 (nearest), 1 (linear) or 3 (cubic B-spline), got {order!r}")
    t = as_volume(thick, "thick")
    size = t.shape[axis] * factor if size is None else int(size)
    scale, offset = np.ones(3), np.zeros(3)
    scale[axis], offset[axis] = 1.0 / factor, -(factor - 1) / (2.0 * factor)      # fine j -> slab (j − (f−1)/2) / f
    shape = list(t.shape)
    shape[axis] = size
    out = ndimage.affine_transform(t, scale, offset=offset, output_shape=tuple(shape), order=order, mode="nearest")
    return out.astype(np.float32)


@torch.no_grad()
def super_resolve(model: torch.nn.Module, thick: Any, axis: int = 2, device: Any = None) -> np.ndarray:
    """A fine volume from thick slices with a trained :class:`~gen3d_lessons.models.superres.SRNet3D`.

    ``thick`` is a 3D volume of intensities in [0, 1] whose ``axis`` runs across the thick
    slices; the result has ``model.cfg.factor`` times as many slices along it (float32). Raises a
    one-line ``ValueError`` for another model, a 2D image or a batch, an integer volume, NaN
    voxels, intensities not scaled to [0, 1], or an axis that is not 0, 1 or 2.
    """
    if not isinstance(model, SRNet3D):
        raise ValueError(f"model: expected an SRNet3D super-resolver, got {type(model).__name__}")
    _check_geometry(model.cfg.factor, axis)
    x = checked_volume(thick, 1, who="super-resolver", name="thick")                    # (1, d0, d1, d2)
    x = x.movedim(1 + axis, 3)[None]                                                     # slices last
    device = next(model.parameters()).device if device is None else device
    was_training = model.training
    model.eval()
    try:
        y = model(x.to(device))[0, 0].cpu()
    finally:
        model.train(was_training)
    y = y.movedim(2, axis).numpy().astype(np.float32)
    if not np.isfinite(y).all():
        raise ValueError("super_resolve: the network's output is not finite (a corrupt or diverged model?)")
    return y


class slab_batches:  # noqa: N801 - used like a function that returns an iterable
    """An endless, seeded stream of training patches ``{"thick": (B, 1, p, p, q), "image": (B, 1,
    p, p, q · factor)}`` cut at one place from thick volumes (N, 1, D, H, d) and their fine
    originals (N, 1, D, H, d · factor), slices along the last axis; the patch's centre lies in the
    brain (``masks``, the fine grid's (N, 1, D, H, d · factor)) nine times out of ten; each pair is
    mirrored left-right at random. ``generator`` is what :func:`~gen3d_lessons.training.fit` saves
    to resume mid-run."""

    def __init__(self, thick: torch.Tensor, fine: torch.Tensor, masks: torch.Tensor, patch: tuple[int, int, int],
                 batch_size: int, seed: int = 0, foreground: float = 0.9):
        if thick.ndim != 5 or fine.ndim != 5 or thick.shape[:4] != fine.shape[:4] or fine.shape[4] % thick.shape[4]:
            raise ValueError(f"thick {tuple(thick.shape)}, fine {tuple(fine.shape)}: expected (N, 1, D, H, d) and "
                             "(N, 1, D, H, d · factor)")
        if masks.shape != fine.shape:
            raise ValueError(f"masks: shape {tuple(masks.shape)} does not match the fine volumes' {tuple(fine.shape)}")
        self.factor = fine.shape[4] // thick.shape[4]
        self.patch = tuple(int(p) for p in patch)
        if len(self.patch) != 3 or any(p < 1 or p > s for p, s in zip(self.patch, thick.shape[2:])):
            raise ValueError(f"patch: expected 3 edges within the thick volumes' {tuple(thick.shape[2:])}, got {patch}")
        self.thick, self.fine, self.batch_size, self.foreground = thick, fine, batch_size, foreground
        self.inside = [torch.nonzero(m[0]) for m in masks.bool()]                          # brain voxels, fine grid
        self.generator = torch.Generator().manual_seed(seed)

    def _corner(self) -> tuple[int, list[int]]:
        g, shape = self.generator, self.thick.shape[2:]
        n = int(torch.randint(len(self.thick), (), generator=g))
        if len(self.inside[n]) and torch.rand((), generator=g) < self.foreground:
            v = self.inside[n][int(torch.randint(len(self.inside[n]), (), generator=g))].tolist()
            centre = [v[0], v[1], v[2] // self.factor]
        else:
            centre = [int(torch.randint(s, (), generator=g)) for s in shape]
        return n, [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, self.patch, shape)]

    def __iter__(self):
        f, (p0, p1, p2) = self.factor, self.patch
        while True:
            thick, fine = [], []
            for _ in range(self.batch_size):
                n, (a, b, c) = self._corner()
                t = self.thick[n, :, a:a + p0, b:b + p1, c:c + p2]
                y = self.fine[n, :, a:a + p0, b:b + p1, c * f:(c + p2) * f]
                if torch.rand((), generator=self.generator) < 0.5:                        # left-right mirror
                    t, y = t.flip(1), y.flip(1)
                thick.append(t)
                fine.append(y)
            yield {"thick": torch.stack(thick), "image": torch.stack(fine)}


def _slice_sharpness(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, axis: int) -> float:
    g = lambda v: float(np.abs(np.diff(v, axis=axis))[np.take(mask, range(mask.shape[axis] - 1), axis)].mean())  # noqa: E731
    return g(pred) / max(g(target), 1e-12)


def sr_table(outputs: Mapping[str, Sequence[Any]], targets: Sequence[Any], masks: Sequence[Any],
             axis: int = 2) -> pd.DataFrame:
    """One row per method: ``PSNR (dB)`` (and its spread over subjects, ``PSNR (std)``), ``SSIM`` inside the mask, ``sharpness`` (mean gradient
    magnitude over the target's, :func:`~gen3d_lessons.metrics.image.detail_scores`) and
    ``slice sharpness`` (the same for the differences between neighbouring slices along
    ``axis``, where thick slices lose detail); means over subjects."""
    rows = {}
    for name, volumes in outputs.items():
        if len(volumes) != len(targets):
            raise ValueError(f"outputs[{name!r}]: {len(volumes)} volumes for {len(targets)} targets")
        per = [scores(p, t, m) | {"sharpness": detail_scores(p, t, m)["sharpness"],
                                  "slice": _slice_sharpness(np.asarray(p), np.asarray(t), np.asarray(m, bool), axis)}
               for p, t, m in zip(volumes, targets, masks)]
        rows[name] = {"PSNR (dB)": np.mean([r["psnr"] for r in per]), "PSNR (std)": np.std([r["psnr"] for r in per]),
                      "SSIM": np.mean([r["ssim"] for r in per]),
                      "sharpness": np.mean([r["sharpness"] for r in per]),
                      "slice sharpness": np.mean([r["slice"] for r in per])}
    return pd.DataFrame.from_dict(rows, orient="index").astype(float)
