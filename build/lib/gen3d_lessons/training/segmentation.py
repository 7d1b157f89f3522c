"""Training a segmentation network: volumes in memory, batches of random crops, one step function per model.

``fit`` (in :mod:`.fit`) knows no model; the chapter binds a step function to its networks with
``functools.partial`` and hands it over::

    images, labels = stack_cases(read_dataset(root).split("train"))       # (N, C, *S), (N, 1, *S)
    step = partial(seg_step, model=unet, optimizer=opt, scheduler=one_cycle(opt, 500),
                   loss_fn=DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    history = fit(step, CropBatches(images, labels, crop=16, batch_size=8), max_steps=500, budget_s=...)

Three step functions, one per model of the chapter:

* :func:`seg_step`: the U-Net with a segmentation loss (Dice + cross-entropy);
* :func:`vox2vox_step`: the U-Net as the generator of a conditional GAN, a 3D PatchGAN as its
  discriminator (the survey's Eq. 3, with the segmentation loss in the place of the L1 term);
* :func:`vaereg_step`: the U-Net plus a VAE decoder that reconstructs the input (Myronenko 2019).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


# 0. Volumes in memory ---------------------------------------------------------------------------

def stack_cases(records: Sequence[Any], channels: Sequence[int] | None = None, image_key: str = "image",
                label_key: str = "label") -> tuple[torch.Tensor, torch.Tensor]:
    """The images (N, C, X, Y, Z) float32 and labels (N, 1, X, Y, Z) int64 of some cases.

    ``records`` come from ``read_dataset(...).split(...)``; ``channels`` picks channels of 4D
    images (all if None); ``image_key`` picks another image of the case (e.g. ``"lowdose"``).
    Every file is read and checked by ``load_case``.
    """
    from ..data.datasets import load_case

    images, labels = [], []
    for record in records:
        case = load_case(record, [image_key, label_key])
        x = case[image_key].data
        x = x[..., None] if x.ndim == 3 else x                              # (X, Y, Z, C)
        x = x[..., list(channels)] if channels is not None else x
        images.append(torch.from_numpy(np.moveaxis(x, -1, 0).copy()))       # (C, X, Y, Z)
        labels.append(torch.from_numpy(case[label_key].data)[None])        # (1, X, Y, Z)
    if not images:
        raise ValueError("records: no cases to stack")
    return torch.stack(images), torch.stack(labels)


def stack_cine_phases(records: Sequence[Any], z: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """End-diastole and end-systole of cine cases: images (2N, 1, X, Y, Z'), labels (2N, 1, X, Y, Z').

    Each case gives its ED frame with ``label`` and its ES frame with ``es`` (frames from the
    ``ed_frame`` / ``es_frame`` attributes); ``z`` keeps a range of slices. Only the two frames
    are decompressed from the 4D file, not the whole cycle. Returns the phase of each item too.
    """
    import nibabel as nib

    from ..data.datasets import load_case
    from ..data.errors import DataError

    images, labels, phases = [], [], []
    for record in records:
        cine = nib.load(str(record.files["image"])).dataobj                # (X, Y, Z, T), read lazily
        if len(cine.shape) != 4:
            raise DataError(record.files["image"], f"expected a 4D cine (X, Y, Z, T), got shape {cine.shape}")
        case = load_case(record, ["label", "es"])
        for phase, key in (("ED", "label"), ("ES", "es")):
            t = int(record.attributes[f"{phase.lower()}_frame"])
            frame = np.asarray(cine[..., t], dtype=np.float32)
            if not np.isfinite(frame).all():
                raise DataError(record.files["image"], f"frame {t} ({phase}) contains NaN or infinite values")
            images.append(torch.from_numpy(frame[..., z].copy())[None])     # (1, X, Y, Z')
            labels.append(torch.from_numpy(case[key].data[..., z].copy())[None])
            phases.append(phase)
    if not images:
        raise ValueError("records: no cases to stack")
    return torch.stack(images), torch.stack(labels), phases


# 1. Batches ----------------------------------------------------------------------------------

class CropBatches:
    """An endless stream of random training crops: ``{"image": (B, C, *crop), "label": (B, 1, *crop)}``.

    ``images`` (N, C, D, H, W) and ``labels`` (N, 1, D, H, W) stay in memory. With probability
    ``foreground`` a crop is centred on a voxel of one labelled class, else anywhere. The class
    is drawn uniformly among the non-zero classes of the whole set, then a volume that holds it,
    then one of its voxels: a lesion in a few volumes is then seen as often as white matter in all
    of them (the "oversampling" that nnU-Net uses for small structures). ``transform(batch,
    generator)`` may change a batch afterwards (flips, domain randomisation ...). The stream is
    seeded: the same ``seed`` gives the same batches.
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
        draw = lambda n: int(torch.randint(n, (), generator=g))
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


def random_flip(batch: Batch, generator: torch.Generator, axes: tuple[int, ...] = (0,)) -> Batch:
    """Mirror each sample along each spatial axis in ``axes`` with probability 1/2 (axis 0: left-right)."""
    image, label = batch["image"].clone(), batch["label"].clone()
    for b in range(image.shape[0]):
        for axis in axes:
            if torch.rand((), generator=generator) < 0.5:
                image[b] = image[b].flip(1 + axis)
                label[b] = label[b].flip(1 + axis)
    return {**batch, "image": image, "label": label}


def one_cycle(optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The "one cycle" learning rate (Smith & Topin 2019): up to the optimizer's lr in the first
    10 % of ``max_steps``, then down to almost zero. Step it once per update."""
    lr = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max_steps, pct_start=0.1)


def one_hot(label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, 1, *S) integer labels -> (B, n_classes, *S) float one-hot."""
    return F.one_hot(label[:, 0].long(), n_classes).movedim(-1, 1).float()


# 2. Step functions -----------------------------------------------------------------------------

def seg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loss_fn: Callable, scheduler: Any = None, device: Any = None) -> dict[str, float]:
    """One supervised step: ``L_seg(U-Net(x), y)``, e.g. Dice + cross-entropy.

    ``scheduler`` (optional) is stepped after every update, e.g. a one-cycle learning rate.
    """
    # 1. the batch
    x, y = batch["image"].to(device), batch["label"].to(device)      # (B, C, *S), (B, 1, *S)
    # 2. forward and loss
    loss = loss_fn(model(x), y)
    # 3. backward and update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item()}


def vox2vox_step(batch: Batch, i: int, *, generator: torch.nn.Module, discriminator: torch.nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss_fn: Callable,
                 adv_weight: float = 0.1, scheduler: Any = None, device: Any = None) -> dict[str, float]:
    """One Vox2Vox step: the discriminator, then the generator (the U-Net).

    ``min_G max_D  E[log D(x, y)] + E[log(1 - D(x, G(x)))] + λ L_seg(G(x), y)``: the survey's
    Eq. 3 with the segmentation loss in place of the L1 term; ``adv_weight`` = 1 / λ weighs the
    adversarial term against the segmentation loss instead, so ``adv_weight = 0`` is plain U-Net
    training. ``scheduler`` (optional) steps the generator's learning rate.
    """
    # 1. the batch: image, labels, and the labels one-hot, as the discriminator sees them
    x, y = batch["image"].to(device), batch["label"].to(device)
    logits = generator(x)                                             # (B, K, *S)
    y_real, y_fake = one_hot(y, logits.shape[1]), logits.softmax(1)   # (B, K, *S) each
    # 2. discriminator: expert pairs are real (1), U-Net pairs fake (0); no gradient into G here
    d_real, d_fake = discriminator(x, y_real), discriminator(x, y_fake.detach())
    loss_d = 0.5 * (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                    + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    # 3. generator: fool the (updated) discriminator and match the labels
    d_fake = discriminator(x, y_fake)
    adv = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))   # non-saturating form
    seg = loss_fn(logits, y)
    opt_g.zero_grad(set_to_none=True)
    (seg + adv_weight * adv).backward()
    opt_g.step()
    if scheduler is not None:
        scheduler.step()
    return {"seg": seg.item(), "adv": adv.item(), "loss_d": loss_d.item()}


def vaereg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable, recon_weight: float = 0.1, kl_weight: float = 0.1,
                scheduler: Any = None, device: Any = None) -> dict[str, float]:
    """One step of the VAE-regularised U-Net: ``L_seg + 0.1 L_L2 + 0.1 L_KL`` (Myronenko 2019).

    ``L_L2`` is the mean squared error of the reconstructed input; ``L_KL`` the KL divergence of
    ``N(mu, sigma²)`` from ``N(0, I)``, divided by the number of voxels as in the paper.
    """
    # 1. the batch
    x, y = batch["image"].to(device), batch["label"].to(device)
    # 2. one shared encoder, two decoders
    logits, recon, mu, logvar = model.forward_train(x)
    seg = loss_fn(logits, y)
    l2 = F.mse_loss(recon, x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean() / x[0, 0].numel()
    # 3. backward and update
    loss = seg + recon_weight * l2 + kl_weight * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"seg": seg.item(), "l2": l2.item(), "kl": kl.item()}
