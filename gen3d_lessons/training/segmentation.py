"""Training a segmentation network: batches of random crops, and one step function per model.

``fit`` (in :mod:`.fit`) knows no model; the chapter binds a step function to its networks with
``functools.partial`` and hands it over::

    step = partial(seg_step, model=unet, optimizer=opt, loss_fn=DiceCELoss(to_onehot_y=True, softmax=True))
    history = fit(step, CropBatches(images, labels, crop=32, batch_size=4), max_steps=..., budget_s=...)

Three step functions, one per model of the chapter:

* :func:`seg_step`: the U-Net with a segmentation loss (Dice + cross-entropy);
* :func:`vox2vox_step`: the U-Net as the generator of a conditional GAN, a 3D PatchGAN as its
  discriminator (the survey's Eq. 3, with the segmentation loss in the place of the L1 term);
* :func:`vaereg_step`: the U-Net plus a VAE decoder that reconstructs the input (Myronenko 2019).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


# 1. Batches ----------------------------------------------------------------------------------

class CropBatches:
    """An endless stream of random training crops: ``{"image": (B, C, *crop), "label": (B, 1, *crop)}``.

    ``images`` (N, C, D, H, W) and ``labels`` (N, 1, D, H, W) stay in memory. Each crop is centred
    on a random foreground voxel with probability ``foreground`` (else anywhere), so that small
    structures are seen often, as nnU-Net does. ``transform(batch, generator)`` may change a
    batch afterwards (flips, domain randomisation ...). The stream is seeded: the same
    ``seed`` gives the same batches.
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
        if any(c > s for c, s in zip(self.crop, images.shape[2:])):
            raise ValueError(f"crop {self.crop} is larger than the volumes {tuple(images.shape[2:])}")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.foreground, self.transform = batch_size, foreground, transform
        self.generator = torch.Generator().manual_seed(seed)
        self._fg = [torch.nonzero(lab[0] > 0) for lab in self.labels]    # (K_i, 3) foreground voxels

    def _corner(self, i: int) -> list[int]:
        g, shape = self.generator, self.images.shape[2:]
        if len(self._fg[i]) and torch.rand((), generator=g) < self.foreground:
            centre = self._fg[i][torch.randint(len(self._fg[i]), (), generator=g)]
            return [int(min(max(int(c) - k // 2, 0), s - k)) for c, k, s in zip(centre, self.crop, shape)]
        return [int(torch.randint(s - k + 1, (), generator=g)) for k, s in zip(self.crop, shape)]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            idx = torch.randint(len(self.images), (self.batch_size,), generator=self.generator)
            xs, ys = [], []
            for i in idx.tolist():
                box = (slice(None),) + tuple(slice(c, c + k) for c, k in zip(self._corner(i), self.crop))
                xs.append(self.images[i][box])
                ys.append(self.labels[i][box])
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


def one_hot(label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, 1, *S) integer labels -> (B, n_classes, *S) float one-hot."""
    return F.one_hot(label[:, 0].long(), n_classes).movedim(-1, 1).float()


# 2. Step functions -----------------------------------------------------------------------------

def seg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loss_fn: Callable, device: Any = None) -> dict[str, float]:
    """One supervised step: ``L_seg(U-Net(x), y)``, e.g. Dice + cross-entropy."""
    # 1. the batch
    x, y = batch["image"].to(device), batch["label"].to(device)      # (B, C, *S), (B, 1, *S)
    # 2. forward and loss
    loss = loss_fn(model(x), y)
    # 3. backward and update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item()}


def vox2vox_step(batch: Batch, i: int, *, generator: torch.nn.Module, discriminator: torch.nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss_fn: Callable,
                 adv_weight: float = 0.1, device: Any = None) -> dict[str, float]:
    """One Vox2Vox step: the discriminator, then the generator (the U-Net).

    ``min_G max_D  E[log D(x, y)] + E[log(1 - D(x, G(x)))] + λ L_seg(G(x), y)``: the survey's
    Eq. 3 with the segmentation loss in place of the L1 term; ``adv_weight`` = 1 / λ weighs the
    adversarial term against the segmentation loss instead, so ``adv_weight = 0`` is plain U-Net
    training.
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
    return {"seg": seg.item(), "adv": adv.item(), "loss_d": loss_d.item()}


def vaereg_step(batch: Batch, i: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loss_fn: Callable, recon_weight: float = 0.1, kl_weight: float = 0.1,
                device: Any = None) -> dict[str, float]:
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
    return {"seg": seg.item(), "l2": l2.item(), "kl": kl.item()}
