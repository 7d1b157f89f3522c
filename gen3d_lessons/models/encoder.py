"""A small 3D encoder whose features serve as the book's yardstick for generated volumes.

Image generators are judged in the feature space of a network that knows what real images look
like: the Fréchet Inception distance uses an ImageNet classifier. There is no such network for
3D brain MRI that we could ship (and nothing may be downloaded), so the book trains its own:
a few strided convolutions, global average pooling, and a feature vector ``f(x)`` of
``feature_dim`` numbers. During training, small linear heads on ``f(x)`` predict what is known
about each phantom — age, scanner site, whether it has lesions, and its CSF / GM / WM volumes —
so that the features must encode anatomy, contrast and pathology. After training only
``features`` is used, frozen (see :mod:`gen3d_lessons.tasks.yardstick`).

Shapes: ``x: (B, C, D, H, W)``, ``features: (B, F)``; heads ``age: (B,)``, ``site: (B, S)``
logits, ``lesion: (B,)`` logit, ``volumes: (B, V)`` (standardised volumes: CSF, GM, WM, and what
else the trainer asks for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import conv_norm_act


@dataclass
class EncoderConfig:
    """Hyperparameters of :class:`Encoder3D`.

    ``channels[k]`` is the width after the k-th halving of the edge; a last stride-1 block
    widens to ``feature_dim`` before the global average pool (like Inception's ``pool3``).
    """

    in_channels: int = 1                         # C: image channels (T1 only by default)
    size: int = 32                               # edge of the cubic input it is trained on
    channels: tuple[int, ...] = (8, 16, 32)      # 32³ -> 16³ -> 8³ -> 4³
    feature_dim: int = 64                        # F
    n_sites: int = 3                             # S: classes of the site head
    n_volumes: int = 3                           # V: standardised volumes the volume head predicts
    pool: str = "mean"                           # "mean", or "mean+max": half the features each
    groups: int = 8                              # GroupNorm groups (must divide every width)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if min(self.in_channels, self.feature_dim, self.n_sites, self.n_volumes, self.size) < 1 or not self.channels:
            raise ValueError(f"EncoderConfig: in_channels, size, feature_dim, n_sites, n_volumes and channels must "
                             f"be positive, got {self}")
        if self.pool not in ("mean", "mean+max") or (self.pool == "mean+max" and self.feature_dim % 2):
            raise ValueError(f"EncoderConfig: pool must be 'mean' or 'mean+max' (with an even feature_dim), "
                             f"got {self.pool!r} with feature_dim={self.feature_dim}")
        if any(c % self.groups for c in (*self.channels, self.feature_dim)):
            raise ValueError(f"EncoderConfig: groups={self.groups} must divide every width "
                             f"{self.channels} and feature_dim={self.feature_dim}")
        if self.size < 2 ** len(self.channels):
            raise ValueError(f"EncoderConfig: size {self.size} is smaller than 2**len(channels) = "
                             f"{2 ** len(self.channels)}")


class Encoder3D(nn.Module):
    """Strided conv blocks -> global average pool -> features; linear heads for the training tasks.

    ``features(x) -> (B, F)`` is the yardstick; ``forward(x)`` returns the heads' predictions
    as a dict (``age``, ``site``, ``lesion``, ``volumes``) and is used only to train it.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        widths = (cfg.in_channels, *cfg.channels)
        # 3×3×3 convolution (stride 2 halves the edge) + GroupNorm + SiLU. GroupNorm, not BatchNorm:
        # the frozen encoder must give a volume the same features whatever else is in the batch
        # (BatchNorm in training mode would mix samples).
        self.down = nn.Sequential(*[conv_norm_act(a, b, stride=2, norm="group", groups=cfg.groups)
                                    for a, b in zip(widths[:-1], widths[1:])])
        # "mean+max": half the features are spatial means, half spatial maxima (a small lesion moves
        # a maximum far more than a mean)
        width = cfg.feature_dim // 2 if cfg.pool == "mean+max" else cfg.feature_dim
        self.widen = conv_norm_act(widths[-1], width, norm="group", groups=cfg.groups)
        # one linear head per task, all reading the same features
        self.age = nn.Linear(cfg.feature_dim, 1)
        self.site = nn.Linear(cfg.feature_dim, cfg.n_sites)
        self.lesion = nn.Linear(cfg.feature_dim, 1)
        self.volumes = nn.Linear(cfg.feature_dim, cfg.n_volumes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, F): the mean over space of the last feature map."""
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x: expected (B, {self.cfg.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        h = self.widen(self.down(x))               # (B, F or F/2, D/2^k, H/2^k, W/2^k)
        if self.cfg.pool == "mean":
            return h.mean(dim=(2, 3, 4))           # (B, F)
        return torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)   # (B, F)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)                       # (B, F)
        return {"age": self.age(f)[:, 0],          # (B,) standardised age
                "site": self.site(f),              # (B, S) logits
                "lesion": self.lesion(f)[:, 0],    # (B,) logit of has_lesion
                "volumes": self.volumes(f)}        # (B, V) standardised volumes (CSF, GM, WM, ...)
