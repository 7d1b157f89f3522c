"""The building blocks that the model files share: layers, checks and small helpers.

Every network of the book is made of a few recurring pieces. They live here once, so that a model
file reads as its architecture and nothing else:

- :func:`norm` — a normalisation layer by name (``"instance"``, ``"batch"``, ``"group"``,
  ``"pixel"``, ``"none"``), and :class:`PixelNorm`;
- :func:`conv_norm_act` — convolution → normalisation → activation, the unit of most 3D CNNs;
  :func:`down` / :func:`up` halve / double the edge with it (the VAE family's 4×4×4 stride-2
  layers); :class:`ConvBlock3d` is two of them, the U-Net's unit of work;
- :class:`PatchDiscriminator3D` — the 3D PatchGAN (Isola et al. 2017) of pix2pix, CycleGAN
  (chapter 3) and Vox2Vox (chapter 10);
- :func:`check_condition` and :func:`sample_from_prior` — what every conditional generator does
  with ``c`` and with fresh codes ``z ~ N(0, I)``;
- :func:`check_pyramid`, :func:`check_volumes` — input checks with one-line errors;
- :func:`one_hot` and :func:`count_parameters`.

Each block returns the same ``nn.Sequential`` layout wherever it is used, so the names of the
weights (``encoder.0.0.weight`` ...) and thus saved models do not depend on which file built them.

Shapes: volumes ``(B, C, D, H, W)``, label maps ``(B, 1, *S)``, codes ``z: (B, Z)``, ``c: (B, K)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["set_template", "norm", "PixelNorm", "conv_norm_act", "down", "up", "ConvBlock3d", "PatchDiscriminatorConfig",
           "PatchDiscriminator3D", "check_condition", "sample_from_prior", "check_pyramid", "check_volumes",
           "one_hot", "count_parameters"]

NORMS = ("instance", "batch", "group", "pixel", "none")


# 1. Normalisation -----------------------------------------------------------------------------

class PixelNorm(nn.Module):
    """Scale each voxel's feature vector to unit mean square over channels (Karras et al. 2018).

    Per sample and per voxel, so it acts the same in training and evaluation, unlike batch norm
    (whose running statistics an averaged generator would not share).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)           # (B, C, D, H, W)


def norm(kind: str, channels: int, groups: int | None = None) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps.

    - ``"instance"``: statistics per sample and channel, with a learnable scale and shift (as
      BatchNorm has); suits networks that see whole volumes in training and in use;
    - ``"batch"``: statistics over the batch, running averages at test time;
    - ``"group"``: statistics per sample over ``groups`` groups of channels (``groups`` required):
      the same in training and evaluation, and with batches of a few volumes;
    - ``"pixel"``: :class:`PixelNorm`; ``"none"``: ``nn.Identity``.
    """
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        if groups is None:
            raise ValueError("norm: kind='group' needs groups, e.g. norm('group', 32, groups=8)")
        return nn.GroupNorm(groups, channels)
    if kind == "pixel":
        return PixelNorm()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")


_norm = norm   # conv_norm_act's argument ``norm`` (the kind) hides the function inside it


# 2. Convolutions --------------------------------------------------------------------------------

def conv_norm_act(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1, *,
                  norm: str = "none", groups: int | None = None, act: nn.Module | None = None,
                  bias: bool = True, transposed: bool = False) -> nn.Sequential:
    """``nn.Sequential(convolution, normalisation, activation)``: indices 0, 1, 2.

    ``norm`` and ``groups`` as in :func:`norm` (``"none"`` keeps an ``nn.Identity`` at index 1, so
    the indices do not depend on the choice); ``act`` defaults to SiLU; ``transposed`` uses a
    transposed convolution (``stride`` then multiplies the edge). Pass ``bias=False`` before a
    normalisation that subtracts the mean anyway.
    """
    conv = (nn.ConvTranspose3d if transposed else nn.Conv3d)(c_in, c_out, kernel, stride=stride, padding=padding,
                                                             bias=bias)
    return nn.Sequential(conv, _norm(norm, c_out, groups), nn.SiLU() if act is None else act)


def down(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Halve the edge: a 4×4×4 convolution with stride 2, GroupNorm, SiLU.

    No convolution runs at full resolution: on a CPU a 16-channel 3×3×3 layer on 32³ voxels costs
    more than the rest of the network together. GroupNorm rather than BatchNorm: it behaves the
    same in training and evaluation and with batches of a few volumes.
    """
    return conv_norm_act(c_in, c_out, 4, stride=2, norm="group", groups=groups)


def up(c_in: int, c_out: int, groups: int | None) -> nn.Sequential:
    """Double the edge: a 4×4×4 transposed convolution with stride 2, GroupNorm, SiLU.

    ``groups=None`` gives the transposed convolution alone: the last layer of a decoder, whose
    output is an image, not features.
    """
    if groups is None:
        return nn.Sequential(nn.ConvTranspose3d(c_in, c_out, 4, stride=2, padding=1))
    return conv_norm_act(c_in, c_out, 4, stride=2, norm="group", groups=groups, transposed=True)


class ConvBlock3d(nn.Sequential):
    """Two (3×3×3 convolution → normalisation → LeakyReLU) layers: the U-Net's unit of work.

    No bias in the convolutions unless ``norm="none"``: the normalisation that follows would
    subtract it again. ``dropout > 0`` appends a ``Dropout3d``.
    """

    def __init__(self, c_in: int, c_out: int, norm: str = "instance", dropout: float = 0.0):
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers += conv_norm_act(c, c_out, norm=norm, bias=norm == "none", act=nn.LeakyReLU(0.01, inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


# 3. The 3D PatchGAN discriminator --------------------------------------------------------------

@dataclass(frozen=True)
class PatchDiscriminatorConfig:
    """A 3D PatchGAN: strided 4×4×4 convolutions, one real/fake logit per patch."""

    in_channels: int = 5              # image channels + classes (the pair is concatenated)
    features: tuple[int, ...] = (16, 32, 64)   # each halves the grid

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if self.in_channels < 1 or len(self.features) < 1 or min(self.features) < 1:
            raise ValueError(f"PatchDiscriminatorConfig: expected positive in_channels and features, got {self}")


class PatchDiscriminator3D(nn.Module):
    """``(B, C_img + C_lab, D, H, W) -> (B, 1, D / 2^n, H / 2^n, W / 2^n)`` patch logits.

    With three stride-2 layers and a final 3×3×3 layer, each output logit sees a receptive field
    of 38 voxels: on a 32³ crop it judges overlapping regions, not the whole volume, which
    is what makes a PatchGAN a critic of *local* texture and shape (Isola et al. 2017).
    """

    def __init__(self, cfg: PatchDiscriminatorConfig = PatchDiscriminatorConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for k, f in enumerate(cfg.features):
            # no normalisation on the first layer, as in pix2pix
            layers += conv_norm_act(c, f, 4, stride=2, norm="instance" if k > 0 else "none",
                                    act=nn.LeakyReLU(0.2, inplace=True))
            c = f
        layers.append(nn.Conv3d(c, 1, 3, padding=1))       # one logit per patch
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, label_probs: torch.Tensor) -> torch.Tensor:
        """``image`` (B, C_img, *S) and a one-hot or softmax ``label_probs`` (B, C_lab, *S)."""
        return self.net(torch.cat([image, label_probs], dim=1))


# 4. Conditional generators: the condition and fresh codes --------------------------------------

def check_condition(c: torch.Tensor | None, batch: int, cond_dim: int, who: str) -> None:
    """Raise unless ``c`` is ``None`` for ``cond_dim = 0``, or a finite (batch, cond_dim) tensor."""
    if cond_dim == 0 and c is not None:
        raise ValueError(f"c: this {who} has cond_dim=0 and takes no condition; build it with cond_dim=K "
                         "to condition on a (B, K) vector")
    if cond_dim > 0:
        got = None if c is None else tuple(c.shape)
        if c is None or c.ndim != 2 or c.shape != (batch, cond_dim):
            raise ValueError(f"c: this {who} needs a condition of shape ({batch}, {cond_dim}), got {got}")
        if not torch.isfinite(c).all():
            raise ValueError("c: contains NaN or infinite values")


@torch.no_grad()
def sample_from_prior(model: nn.Module, n: int, z_dim: int, c: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``model(z, c)`` for ``n`` fresh codes ``z ~ N(0, I)`` (n, Z), in evaluation mode, without gradients.

    ``z`` is drawn on the CPU with ``generator``, so samples are reproducible on any device; the
    model's training mode is restored afterwards.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of samples, got {n!r}")
    device = next(model.parameters()).device
    z = torch.randn(n, z_dim, generator=generator).to(device)                          # (n, Z)
    was_training = model.training
    model.eval()
    try:
        return model(z, None if c is None else c.to(device))
    finally:
        model.train(was_training)


# 5. Input checks --------------------------------------------------------------------------------

@torch.no_grad()
def set_template(template: nn.Parameter | None, mean_volume: torch.Tensor, sigmoid: bool) -> None:
    """Start a generator's per-voxel output bias ``template`` (1, C, D, H, W) at the average
    training volume (its logit when the output goes through a sigmoid)."""
    if template is None:
        raise ValueError("set_template: this generator was built with template=False")
    m = mean_volume.reshape(template.shape).to(template)
    if not torch.isfinite(m).all():
        raise ValueError("mean_volume: contains NaN or infinite values")
    template.copy_(torch.logit(m.clamp(1e-3, 1 - 1e-3)) if sigmoid else m)


def check_pyramid(name: str, channels: tuple[int, ...], groups: int, size: int) -> None:
    """Raise unless GroupNorm's ``groups`` divide every width and ``size`` halves once per width."""
    if any(c % groups for c in channels):
        raise ValueError(f"{name}: groups={groups} must divide every channel count {channels}")
    if size % 2 ** len(channels) or size < 2 ** len(channels):
        raise ValueError(f"{name}: size {size} must be a multiple of 2**len(channels) = {2 ** len(channels)}")


def check_volumes(x: torch.Tensor, channels: int, size: int, name: str = "x") -> None:
    """Raise a ValueError unless ``x`` is a finite float tensor (B, channels, size, size, size)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (B, {channels}, {size}, {size}, {size}), "
                         f"got {type(x).__name__}")
    if x.ndim != 5 or x.shape[1] != channels or tuple(x.shape[2:]) != (size, size, size):
        raise ValueError(f"{name}: expected shape (B, {channels}, {size}, {size}, {size}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains {int((~torch.isfinite(x)).sum())} NaN or infinite values")


# 6. Small helpers -------------------------------------------------------------------------------

def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer labels (B, 1, *S) -> one-hot float (B, K, *S) with ``K = n_classes``.

    Label maps of a segmentation, or the intensity levels of a quantised volume.
    """
    return F.one_hot(labels[:, 0].long(), n_classes).movedim(-1, 1).float()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
