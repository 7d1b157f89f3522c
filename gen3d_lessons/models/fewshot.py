"""Networks for segmentation with few labels (chapter 14, the survey's §4.1 and §4.2).

Two ways to let *unlabelled* volumes help a U-Net that has only a handful of labelled ones:

* **self-supervised pretraining**: the same :class:`~gen3d_lessons.models.unet.UNet3D` is first
  trained on a pretext task that needs no labels (here: restore a crop whose cubes were blanked
  out and whose voxels were noised), then :func:`transfer_weights` copies its encoder into the
  segmenter, which is fine-tuned on the labelled volumes;
* a **semi-supervised GAN** after Mondal et al. (2018): the U-Net has one more output class,
  "fake", and learns three things at once: the labelled voxels' classes, that voxels of unlabelled
  real crops are *not* fake, and that voxels of crops made by a generator *are*. The generator,
  :class:`CropGenerator3D`, turns a noise vector into an image crop with every channel of the
  scans. At test time the fake class is dropped and the network is a plain segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..blocks import conv_norm_act


@dataclass(frozen=True)
class CropGeneratorConfig:
    """A :class:`CropGenerator3D`: ``z_dim`` noise numbers to a ``(channels, crop, crop, crop)`` crop."""

    z_dim: int = 64
    channels: int = 4                       # image channels (T1, T2, FLAIR, PD)
    crop: int = 16                          # side of the crop; a power of two, at least 4
    features: tuple[int, ...] | None = None    # channels at 4³, 8³, ... crop³; None: 64, halved per doubling (at least 8)

    def __post_init__(self):
        doublings = self.crop.bit_length() - 3          # 4 -> crop
        features = [max(64 >> k, 8) for k in range(max(doublings, 0) + 1)] if self.features is None else self.features
        object.__setattr__(self, "features", tuple(int(f) for f in features))
        if self.crop < 4 or self.crop & (self.crop - 1) or len(self.features) != doublings + 1:
            raise ValueError(f"CropGeneratorConfig: crop must be a power of two >= 4 with one feature count per size "
                             f"from 4³ up ({doublings + 1} for crop {self.crop}), got crop={self.crop}, "
                             f"features={self.features}")
        if self.z_dim < 1 or self.channels < 1 or min(self.features) < 1:
            raise ValueError(f"CropGeneratorConfig: z_dim, channels and features must be positive, got {self}")


class CropGenerator3D(nn.Module):
    """Noise ``(B, z_dim)`` to image crops ``(B, channels, crop, crop, crop)``, non-negative like the scans.

    A dense layer makes a 4³ grid of ``features[0]`` channels; each stage doubles the grid
    (nearest-neighbour upsampling, then a convolution, batch normalisation and SiLU); a last
    convolution gives the channels and a softplus keeps intensities non-negative.
    """

    def __init__(self, cfg: CropGeneratorConfig = CropGeneratorConfig()):
        super().__init__()
        self.cfg = cfg
        f = cfg.features
        self.dense = nn.Linear(cfg.z_dim, f[0] * 4 ** 3)
        self.stages = nn.Sequential(*[nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                    conv_norm_act(f[k], f[k + 1], norm="batch"))
                                      for k in range(len(f) - 1)])
        self.out = nn.Conv3d(f[-1], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {self.cfg.z_dim}), got {tuple(z.shape)}")
        h = torch.relu(self.dense(z)).view(len(z), self.cfg.features[0], 4, 4, 4)
        return nn.functional.softplus(self.out(self.stages(h)))


def transfer_weights(source: nn.Module, target: nn.Module, only: tuple[str, ...] = ("down.",)) -> list[str]:
    """Copy into ``target`` every parameter and buffer of ``source`` whose name starts with one of
    ``only`` and that ``target`` has with the same shape; ``("down.",)`` is a
    :class:`~gen3d_lessons.models.unet.UNet3D`'s encoder, ``("",)`` everything that fits.

    Returns the names of ``target``'s entries left as they were (the decoder and the output layer,
    by default). Raises ``ValueError`` when nothing matches, since the two networks are then not the
    same architecture.
    """
    src, dst = source.state_dict(), target.state_dict()
    copied = {k: v for k, v in src.items() if k.startswith(tuple(only)) and k in dst and dst[k].shape == v.shape}
    if not copied:
        raise ValueError(f"transfer_weights: no entry of {type(source).__name__} matches one of "
                         f"{type(target).__name__} by name and shape")
    target.load_state_dict(dst | copied)
    return [k for k in dst if k not in copied]


class WithoutFake(nn.Module):
    """The semi-supervised GAN's segmenter at test time: its logits without the last ("fake")
    class, so that the most likely class is always a real one. ``cfg`` is the segmenter's, with
    one output fewer."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        if getattr(segmenter, "cfg", None) is None or segmenter.cfg.out_channels < 2:
            raise ValueError("WithoutFake: expected a segmenter with a cfg and at least two outputs (the classes and 'fake')")
        self.segmenter = segmenter
        self.cfg = replace(segmenter.cfg, out_channels=segmenter.cfg.out_channels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(x)[:, :-1]
