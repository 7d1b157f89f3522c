"""Batches of tensors held in memory, and the random transforms applied to them.

The cohorts of this book are small enough to keep in memory, so a loader is a seeded iterator
over tensors, not a ``DataLoader`` with workers. Two kinds serve every chapter:

* :class:`Batches` — whole items (volumes, conditions, codes ...) of a dict of equally long
  tensors, in a fresh random order each pass (one pass = one epoch for
  :func:`~gen3d_lessons.training.fit`), optionally mirrored, shifted and scaled;
* :class:`CropBatches` — an endless stream of random crops of volumes and their label maps,
  with a ``transform(batch, generator)`` such as :func:`random_flip`.

Both draw every random number from their own ``generator`` (seeded by ``seed``): the same seed
gives the same batches, whatever else the chapter draws, and :func:`~gen3d_lessons.training.fit`
saves and restores that generator so that a resumed run sees the batches the uninterrupted one
would have seen::

    loader = Batches({"image": volumes, "condition": c}, batch_size=4, seed=0, augment=("image",))
    history = fit(lambda batch, i: vae_step(vae, opt, batch), loader, max_steps=500)
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch

__all__ = ["Batch", "Batches", "CropBatches", "random_flip"]

Batch = dict[str, torch.Tensor]


# 1. Whole items, shuffled each pass --------------------------------------------------------------

class Batches:
    """Batches ``{key: tensor[idx]}`` of a dict of equally long tensors, in a seeded random order.

    ``data`` maps names to tensors ``(N, ...)`` with the same first dimension (volumes
    ``(N, C, D, H, W)``, conditions ``(N, K)``, codes ``(N, d, h, w)``, ids ``(N,)`` ...). Each
    pass draws a new order (``randperm``) and yields ``N // batch_size`` batches; the last partial
    batch is dropped, so every batch has the same size. A ``batch_size`` larger than ``N`` is
    clamped to ``N`` (one batch a pass): a dry run's small cohort keeps working with the batch
    size chosen for the full one.

    Augmentations, for the volumes ``(N, C, D, H, W)`` named in ``augment`` (the same draw for
    every key of an item, so an image and its label map move together; the other tensors pass
    unchanged):

    1. mirror along spatial axis ``flip_axis`` (0 = D, left-right in the brain phantoms) with
       probability ``flip_p``: with a few dozen training volumes, mirror images are free data;
    2. if ``shift > 0``, a circular shift by up to ``shift`` voxels along each spatial axis
       (the phantoms have an empty border, so nothing of the anatomy wraps around);
    3. if ``gain > 0``, intensities times a factor drawn uniformly in ``1 ± gain`` (list only
       intensity volumes in ``augment`` then, not label maps).

    The random numbers of a batch are drawn in this order: the mirror coins ``rand(B)`` (drawn
    even when nothing is mirrored, so that adding or removing an augmented key does not change
    the batches after it), then the shifts ``randint(-shift, shift + 1, (B, 3))``, then the gains
    ``rand(B)``. ``generator`` is the ``torch.Generator`` that :func:`~gen3d_lessons.training.fit`
    saves and restores to resume a run mid-pass.
    """

    def __init__(self, data: Mapping[str, torch.Tensor], batch_size: int, seed: int = 0, *,
                 augment: Sequence[str] = (), flip_p: float = 0.5, flip_axis: int = 0,
                 shift: int = 0, gain: float = 0.0):
        # 1. the tensors: a non-empty dict, one length N > 0, finite values
        if not isinstance(data, Mapping) or not data:
            raise ValueError("data: expected a non-empty dict {name: tensor (N, ...)}")
        for key, value in data.items():
            if not isinstance(value, torch.Tensor) or value.ndim < 1:
                raise ValueError(f"data[{key!r}]: expected a tensor (N, ...), got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        lengths = {key: len(value) for key, value in data.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ValueError(f"data: every tensor needs the same, non-zero length N, got {lengths}")
        for key, value in data.items():
            if torch.is_floating_point(value) and not torch.isfinite(value).all():
                raise ValueError(f"data[{key!r}]: contains NaN or infinite values")
        # 2. the batch size and the augmentations
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        augment = (augment,) if isinstance(augment, str) else tuple(augment)
        unknown = [key for key in augment if key not in data]
        if unknown:
            raise ValueError(f"augment: {unknown} are not keys of data ({sorted(data)})")
        for key in augment:
            if data[key].ndim != 5:
                raise ValueError(f"data[{key!r}]: expected volumes (N, C, D, H, W) to augment, got shape "
                                 f"{tuple(data[key].shape)}")
            if gain and not torch.is_floating_point(data[key]):
                raise ValueError(f"data[{key!r}]: gain scales intensities, but this is a {data[key].dtype} tensor")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1], got {flip_p!r}")
        if flip_axis not in (0, 1, 2):
            raise ValueError(f"flip_axis: expected a spatial axis 0, 1 or 2, got {flip_axis!r}")
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"shift: expected a non-negative number of voxels, got {shift!r}")
        if not 0.0 <= gain < 1.0:
            raise ValueError(f"gain: expected a number in [0, 1), got {gain!r}")
        self.data, self.n = dict(data), next(iter(lengths.values()))
        self.batch_size = min(batch_size, self.n)
        self.augment, self.flip_p, self.flip_axis, self.shift, self.gain = augment, flip_p, flip_axis, shift, gain
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Batches per pass."""
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        g = self.generator
        order = torch.randperm(self.n, generator=g)
        for start in range(0, self.n - self.batch_size + 1, self.batch_size):     # drop the last partial batch
            idx = order[start:start + self.batch_size]
            b = len(idx)
            batch = {key: value[idx] for key, value in self.data.items()}
            # the random numbers of this batch, always in this order
            mirror = torch.rand(b, generator=g) < self.flip_p                                  # (B,)
            shifts = (torch.randint(-self.shift, self.shift + 1, (b, 3), generator=g).tolist()
                      if self.shift else None)                                                 # (B, 3)
            scale = (1 + self.gain * (2 * torch.rand(b, 1, 1, 1, 1, generator=g) - 1)
                     if self.gain else None)                                                   # (B, 1, 1, 1, 1)
            for key in self.augment:
                x = batch[key]                                                                 # (B, C, D, H, W)
                # 1. mirror
                x = torch.where(mirror.to(x.device)[:, None, None, None, None], x.flip(2 + self.flip_axis), x)
                # 2. circular shift of each item
                if shifts is not None:
                    x = torch.stack([torch.roll(x[k], tuple(shifts[k]), dims=(1, 2, 3)) for k in range(b)])
                # 3. gain
                if scale is not None:
                    x = x * scale.to(x.device)
                batch[key] = x
            yield batch


# 2. Random crops of volumes and label maps -----------------------------------------------------

class CropBatches:
    """An endless stream of random training crops: ``{"image": (B, C, *crop), "label": (B, 1, *crop)}``.

    ``images`` (N, C, D, H, W) and ``labels`` (N, 1, D, H, W) stay in memory. With probability
    ``foreground`` a crop is centred on a voxel of one labelled class, else anywhere. The class
    is drawn uniformly among the non-zero classes of the whole set, then a volume that holds it,
    then one of its voxels: a lesion in a few volumes is then seen as often as white matter in all
    of them (the "oversampling" that nnU-Net uses for small structures). ``transform(batch,
    generator)`` may change a batch afterwards (:func:`random_flip`, domain randomisation ...). The
    stream is seeded: the same ``seed`` gives the same batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop: int | tuple[int, int, int],
                 batch_size: int = 4, foreground: float = 0.9, seed: int = 0,
                 transform: Callable[[Batch, torch.Generator], Batch] | None = None):
        if images.ndim != 5 or labels.ndim != 5 or labels.shape[1] != 1:
            raise ValueError(f"expected images (N, C, D, H, W) and labels (N, 1, D, H, W), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[2:]:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.crop = (crop,) * 3 if isinstance(crop, int) else tuple(crop)
        if len(self.crop) != 3 or any(c > s for c, s in zip(self.crop, images.shape[2:])):
            raise ValueError(f"crop {self.crop} is larger than the volumes {tuple(images.shape[2:])}")
        if not 0.0 <= foreground <= 1.0:
            raise ValueError(f"foreground: expected a probability in [0, 1], got {foreground}")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.foreground, self.transform = batch_size, foreground, transform
        self.generator = torch.Generator().manual_seed(seed)
        # where each class is: {class: [(volume, flat voxel indices (K,) int32), ...]}
        self._where: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for n, lab in enumerate(self.labels):
            flat = lab.flatten()
            for k in flat.unique().tolist():
                if k > 0:
                    self._where.setdefault(k, []).append((n, torch.nonzero(flat == k)[:, 0].int()))

    def _pick(self) -> tuple[int, list[int]]:
        """A volume and the corner of a crop in it."""
        g, shape = self.generator, self.images.shape[2:]
        draw = lambda n: int(torch.randint(n, (), generator=g))  # noqa: E731
        if self._where and torch.rand((), generator=g) < self.foreground:
            classes = sorted(self._where)
            holders = self._where[classes[draw(len(classes))]]           # 1. a class, uniformly
            n, voxels = holders[draw(len(holders))]                       # 2. a volume that has it
            centre = torch.unravel_index(voxels[draw(len(voxels))].long(), tuple(shape))   # 3. a voxel
            return n, [min(max(int(c) - k // 2, 0), s - k) for c, k, s in zip(centre, self.crop, shape)]
        return draw(len(self.images)), [draw(s - k + 1) for k, s in zip(self.crop, shape)]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            xs, ys = [], []
            for _ in range(self.batch_size):
                n, corner = self._pick()
                box = (slice(None),) + tuple(slice(c, c + k) for c, k in zip(corner, self.crop))
                xs.append(self.images[n][box])
                ys.append(self.labels[n][box])
            batch = {"image": torch.stack(xs), "label": torch.stack(ys)}     # (B, C, *crop), (B, 1, *crop)
            yield self.transform(batch, self.generator) if self.transform is not None else batch


# 3. Transforms of a batch ----------------------------------------------------------------------

def random_flip(batch: Batch, generator: torch.Generator, axes: tuple[int, ...] = (0,)) -> Batch:
    """Mirror each sample's image and label along each spatial axis in ``axes`` with probability 1/2
    (axis 0: left-right). A :class:`CropBatches` transform."""
    image, label = batch["image"].clone(), batch["label"].clone()
    for b in range(image.shape[0]):
        for axis in axes:
            if torch.rand((), generator=generator) < 0.5:
                image[b] = image[b].flip(1 + axis)
                label[b] = label[b].flip(1 + axis)
    return {**batch, "image": image, "label": label}
