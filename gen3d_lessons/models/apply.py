"""Running a trained image-to-image network on one volume a reader hands it.

The denoiser (chapter 11), the translator and the super-resolver (chapter 9) all take one volume
of intensities scaled to [0, 1] and return one, on the same grid. What they refuse, and how they
run, is the same, so it lives here:

- :func:`checked_volume`: the volume as a float32 tensor ``(C, D, H, W)``, or a ``ValueError`` of
  one line that says what is wrong (a 2D slice, a batch, the wrong channel count, an integer
  volume straight from the scanner, NaN voxels, intensities far outside [0, 1]);
- :func:`run_on_volume`: pad the volume by edge replication to a size the network accepts, run
  it (optionally as the mean over the 8 mirror images), crop back, check the output is finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["checked_volume", "run_on_volume"]


def checked_volume(volume: Any, n_channels: int, low: float = -0.25, high: float = 1.25, *,
                   who: str = "denoiser", name: str = "volume") -> torch.Tensor:
    """``volume`` as a float32 tensor (C, D, H, W) with ``C = n_channels`` (a 3D volume is taken
    as one channel), or a ValueError naming ``name`` that says what is wrong. ``who`` names the
    network in the messages; ``[low, high]`` is the intensity span accepted."""
    if isinstance(volume, torch.Tensor):
        x = volume.detach().cpu()
        if x.is_complex() or x.dtype == torch.bool or not x.is_floating_point():
            raise ValueError(f"{name}: expected floating-point intensities in [0, 1], got dtype {x.dtype}; "
                             "scale integer scanner values first, e.g. x.float() / x.max()")
        x = x.float()
    else:
        try:
            a = np.asarray(volume)
        except Exception as e:  # ragged lists and the like
            raise ValueError(f"{name}: expected a NumPy array or torch tensor, got {type(volume).__name__} ({e})") from e
        if a.dtype.kind != "f":
            raise ValueError(f"{name}: expected floating-point intensities in [0, 1], got dtype {a.dtype}; "
                             "scale integer scanner values first, e.g. x.astype(np.float32) / x.max()")
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    want = "(D, H, W)" if n_channels == 1 else f"({n_channels}, D, H, W)"
    if x.ndim == 2:
        raise ValueError(f"{name}: got a 2D image of shape {tuple(x.shape)}; the {who} is 3D and expects "
                         f"{want}. Stack neighbouring slices into a volume first")
    if x.ndim == 3 and n_channels == 1:
        x = x[None]                                                # (1, D, H, W)
    if x.ndim != 4 or x.shape[0] != n_channels:
        raise ValueError(f"{name}: expected shape {want} for a network with {n_channels} input channel(s), "
                         f"got {tuple(x.shape)}" + (" (pass one volume at a time, not a batch)" if x.ndim == 5 else ""))
    if min(x.shape[1:]) < 2:
        raise ValueError(f"{name}: every spatial edge must be at least 2 voxels, got {tuple(x.shape[1:])}")
    bad = ~torch.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: contains {int(bad.sum())} NaN or infinite values (the first at index {where}); "
                         f"fill or mask them before running the {who}")
    lo, hi = float(x.min()), float(x.max())
    if lo < low or hi > high:
        raise ValueError(f"{name}: intensities span [{lo:.3g}, {hi:.3g}], but the network was trained on [0, 1] "
                         "images; divide by a high percentile (e.g. the 99.5th inside the brain) first")
    return x


@torch.no_grad()
def run_on_volume(model: nn.Module, x: torch.Tensor, multiple: int, device: Any = None, flips: bool = False,
                  who: str = "denoiser") -> np.ndarray:
    """``model`` on one checked volume ``x`` (C, D, H, W); returns (C_out, D, H, W) float32.

    Every edge is padded by edge replication (no artificial dark border) up to a multiple of
    ``multiple`` and the output cropped back. With ``flips=True`` the result is the mean over the
    8 mirror images of the volume (each flipped, run, flipped back), at 8 times the cost. The
    model is run in eval mode and left in the mode it was in.
    """
    shape = x.shape[1:]
    pad = [(-n) % multiple for n in shape]
    x = F.pad(x[None], [p for n in reversed(pad) for p in (0, n)], mode="replicate")   # (1, C, D', H', W')
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = x.to(device)
    mirrors = [[a for a, bit in zip((2, 3, 4), (k & 1, k & 2, k & 4)) if bit] for k in range(8 if flips else 1)]
    try:
        y = model(torch.cat([x.flip(axes) for axes in mirrors]))             # (n mirrors, C_out, D', H', W')
    finally:
        model.train(was_training)
    y = torch.stack([y[n : n + 1].flip(axes) for n, axes in enumerate(mirrors)]).mean(0)   # back, averaged
    y = y.cpu()[0, :, : shape[0], : shape[1], : shape[2]].numpy().astype(np.float32)      # (C_out, D, H, W)
    if not np.isfinite(y).all():
        raise ValueError(f"{who}: the network's output is not finite (a corrupt or diverged model?)")
    return y
