"""Classifying hearts from their shapes (chapter 8), after Biffi et al. (2018).

:class:`ShapeVAEClassifier` is a 3D VAE on a heart's segmentations at end-diastole and
end-systole with a small classifier on its latent mean, trained jointly: the code must describe
the shape well enough to rebuild both label maps *and* separate the pathologies. The input is
one-hot: ``frames × labels`` channels (2 × 4 for ED/ES and background, RV, MYO, LV); the decoder
returns logits of the same layout, and a reconstruction is their argmax per frame.

Because the classifier reads the code, its gradient says how to change a code to make a heart
more of one class; decoding the codes along that path shows the shape change the network learned
to look for (:func:`gen3d_lessons.tasks.classify.latent_path`).

:class:`ImageCNN3D` is the plain baseline: strided convolutions on the images themselves (ED and
ES as two channels), pooled, and a linear layer.

Shapes: label volumes ``(B, frames, D, H, W)`` int64 in ``0..labels-1``; images
``(B, frames, D, H, W)`` float; class logits ``(B, classes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import conv_norm_act
from .vae import VAE3D, VAEConfig

__all__ = ["one_hot_hearts", "ShapeVAEConfig", "ShapeVAEClassifier", "ImageCNNConfig", "ImageCNN3D"]


def one_hot_hearts(labels: torch.Tensor, n_labels: int = 4) -> torch.Tensor:
    """Label volumes (B, F, D, H, W) int -> one-hot (B, F * L, D, H, W) float, frame-major."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 5:
        raise ValueError(f"labels: expected label volumes (B, frames, D, H, W), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected integer labels, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels: expected values in 0..{n_labels - 1}, got {int(labels.min())}..{int(labels.max())}")
    x = F.one_hot(labels.long(), n_labels)                                  # (B, F, D, H, W, L)
    return x.permute(0, 1, 5, 2, 3, 4).flatten(1, 2).float()


@dataclass(frozen=True)
class ShapeVAEConfig:
    """Everything that builds a :class:`ShapeVAEClassifier` (saved with its weights)."""

    size: int = 32                              # edge of the cubic label volumes
    frames: int = 2                             # ED and ES
    labels: int = 4                             # background, RV, MYO, LV
    classes: int = 5                            # NOR, HCM, DCM, MINF, ARV
    channels: tuple[int, ...] = (16, 32, 64)    # the VAE's widths, one halving each
    latent_dim: int = 16                        # Z
    hidden: int = 32                            # the classifier's hidden layer

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if min(self.frames, self.latent_dim, self.hidden) < 1 or self.labels < 2 or self.classes < 2:
            raise ValueError(f"ShapeVAEConfig: frames, latent_dim and hidden must be >= 1, labels and classes >= 2, "
                             f"got {self}")

    @property
    def vae(self) -> VAEConfig:
        return VAEConfig(in_channels=self.frames * self.labels, size=self.size, channels=self.channels,
                         latent_dim=self.latent_dim)


class ShapeVAEClassifier(nn.Module):
    """``forward(labels) -> (logits (B, F, L, D, H, W), mu (B, Z), logvar (B, Z), class_logits (B, C))``."""

    def __init__(self, cfg: ShapeVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ShapeVAEConfig()
        self.vae = VAE3D(cfg.vae)
        self.head = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.classes))

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Label volumes (B, F, D, H, W) -> one-hot (B, F * L, D, H, W), frame-major."""
        c, n = self.cfg, self.cfg.size
        if not isinstance(labels, torch.Tensor) or labels.ndim != 5 or tuple(labels.shape[1:]) != (c.frames, n, n, n):
            raise ValueError(f"labels: expected label volumes (B, {c.frames}, {n}, {n}, {n}), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        return one_hot_hearts(labels, c.labels)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, Z) -> label logits (B, F, L, D, H, W)."""
        c, n = self.cfg, self.cfg.size
        return self.vae.decode(z).view(len(z), c.frames, c.labels, n, n, n)

    def decode_labels(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, Z) -> label volumes (B, F, D, H, W), the most likely label of every voxel."""
        return self.decode_logits(z).argmax(2)

    def forward(self, labels: torch.Tensor):
        x = self.one_hot(labels)
        mu, logvar = self.vae.encode(x)
        z = self.vae.reparameterize(mu, logvar) if self.training else mu
        return self.decode_logits(z), mu, logvar, self.head(mu)

    @torch.no_grad()
    def predict_proba(self, labels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (B, C) from the posterior means, in eval mode, in batches."""
        self.eval()
        device = next(self.parameters()).device
        out = [torch.softmax(self.head(self.vae.encode(self.one_hot(labels[i:i + batch_size].to(device)))[0]), 1).cpu()
               for i in range(0, len(labels), batch_size)]
        return torch.cat(out)


@dataclass(frozen=True)
class ImageCNNConfig:
    """Everything that builds an :class:`ImageCNN3D`."""

    in_channels: int = 2                        # ED and ES images
    classes: int = 5
    channels: tuple[int, ...] = (16, 32, 64)    # one stride-2 convolution each
    norm: str = "instance"                      # "instance" | "batch" | "none" (see ImageCNN3D)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.in_channels < 1 or self.classes < 2 or not self.channels or min(self.channels) < 1:
            raise ValueError(f"ImageCNNConfig: expected in_channels >= 1, classes >= 2 and positive channels, got {self}")
        if self.norm not in ("instance", "batch", "none"):
            raise ValueError(f"ImageCNNConfig.norm: expected 'instance', 'batch' or 'none', got {self.norm!r}")


class ImageCNN3D(nn.Module):
    """Images (B, C, D, H, W) -> class logits (B, classes): strided conv blocks, global mean, linear.

    Instance normalisation suits images whose brightness varies from scan to scan; on one-hot label
    maps it would remove what matters (how much of each structure there is: the mean of a normalised
    channel is zero), so a classifier of label maps takes ``norm="batch"``."""

    def __init__(self, cfg: ImageCNNConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ImageCNNConfig()
        widths = (cfg.in_channels, *cfg.channels)
        self.features = nn.Sequential(*[conv_norm_act(a, b, stride=2, norm=cfg.norm)
                                        for a, b in zip(widths[:-1], widths[1:])])
        self.head = nn.Linear(cfg.channels[-1], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected images (B, {self.cfg.in_channels}, D, H, W), got {tuple(x.shape)}")
        return self.head(self.features(x).mean(dim=(2, 3, 4)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (B, classes), in eval mode, in batches."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([torch.softmax(self(x[i:i + batch_size].to(device)), 1).cpu() for i in range(0, len(x), batch_size)])
