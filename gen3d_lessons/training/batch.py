"""What a step function reads from its batch: one named tensor, checked, on the network's device.

Every step function of :mod:`gen3d_lessons.training` takes a batch dict (``{"image": (B, C, D, H, W),
...}``); a batch without the tensor a step needs should fail with a message that names the key,
not with a ``KeyError`` deep inside a network.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["batch_tensor"]


def batch_tensor(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """``batch[key]``, a float tensor ``(B, ...)``, moved to ``device``."""
    if not isinstance(batch, Mapping) or key not in batch:
        raise ValueError(f"batch: expected a dict with a {key!r} tensor, got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    x = batch[key]
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 2:
        raise ValueError(f"batch[{key!r}]: expected a float tensor (B, ...), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x.to(device)
