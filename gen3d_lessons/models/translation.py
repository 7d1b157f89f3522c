"""Cross-modality synthesis (chapter 9): a U-Net that turns source contrasts into target contrasts.

:class:`Translator` is the generator of 3D pix2pix and Ea-GAN, and the same network trained with
L1 alone: a :class:`~gen3d_lessons.models.unet.UNet3D` from ``len(sources)`` input channels to
``len(targets)`` output channels, with instance normalisation (it sees whole volumes in training
and at test time). Its config names the contrasts, so that :func:`translate` can check that it
is given the ones the network was trained on, and name what it returns::

    G = Translator(TranslatorConfig(sources=("T1",), targets=("T2", "FLAIR")))
    ...                                                   # trained by train_l1 / train_pix2pix
    out = translate(G, {"T1": t1})                        # {"T2": (D, H, W), "FLAIR": (D, H, W)}

Volumes are intensities in [0, 1] (the book's scaling), any edge lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .apply import checked_volume, run_on_volume
from .unet import UNet3D, UNetConfig

__all__ = ["TranslatorConfig", "Translator", "translate"]


@dataclass(frozen=True)
class TranslatorConfig:
    """Everything that builds a :class:`Translator`: the contrasts in and out, and the U-Net."""

    sources: tuple[str, ...] = ("T1",)             # input contrasts, in channel order
    targets: tuple[str, ...] = ("T2",)             # output contrasts, in channel order
    features: tuple[int, ...] = (8, 16, 32, 64)    # the U-Net's channels per level

    def __post_init__(self):
        for field in ("sources", "targets"):
            names = getattr(self, field)
            names = (names,) if isinstance(names, str) else tuple(str(n) for n in names)
            if not names or len(set(names)) != len(names):
                raise ValueError(f"TranslatorConfig.{field}: expected distinct contrast names, got {names}")
            object.__setattr__(self, field, names)
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))

    @property
    def unet(self) -> UNetConfig:
        return UNetConfig(len(self.sources), len(self.targets), self.features, norm="instance")


class Translator(nn.Module):
    """``(B, len(sources), D, H, W) -> (B, len(targets), D, H, W)``: a U-Net with a linear output."""

    def __init__(self, cfg: TranslatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TranslatorConfig()
        self.unet = UNet3D(cfg.unet)

    @property
    def multiple(self) -> int:
        """Input edges must be multiples of this (:func:`translate` pads to it)."""
        return self.cfg.unet.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


def translate(model: nn.Module, volumes: Mapping[str, Any] | Any, device: Any = None) -> dict[str, np.ndarray]:
    """Translate one subject with a trained :class:`Translator`: ``{target contrast: (D, H, W)}``.

    ``volumes`` maps each of the model's source contrasts to a 3D volume of intensities in [0, 1],
    all on one grid; a single array is accepted when the model has one source. Raises a one-line
    ``ValueError`` for a model that is not a translator, a missing or unexpected contrast, volumes
    on different grids, a 2D slice or a batch, an integer volume, NaN voxels, or intensities that
    were not scaled to [0, 1].
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, TranslatorConfig):
        raise ValueError(f"model: expected a Translator, got {type(model).__name__}")
    if not isinstance(volumes, Mapping):
        if len(cfg.sources) != 1:
            raise ValueError(f"volumes: this translator reads {len(cfg.sources)} contrasts {cfg.sources}; "
                             "pass a dict {contrast: volume}")
        volumes = {cfg.sources[0]: volumes}
    missing, extra = [s for s in cfg.sources if s not in volumes], [s for s in volumes if s not in cfg.sources]
    if missing or extra:
        raise ValueError(f"volumes: this translator reads {list(cfg.sources)}, got {list(volumes)}"
                         + (f" (missing {missing})" if missing else "") + (f" (not read: {extra})" if extra else ""))
    channels = [checked_volume(volumes[s], 1, who="translator", name=f"volumes[{s!r}]") for s in cfg.sources]
    shapes = {s: tuple(c.shape[1:]) for s, c in zip(cfg.sources, channels)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"volumes: the contrasts are on different grids {shapes}; resample them onto one grid first")
    y = run_on_volume(model, torch.cat(channels), model.multiple, device, who="translate")   # (T, D, H, W)
    return {t: y[k] for k, t in enumerate(cfg.targets)}
