"""What a network costs: parameters, memory and seconds per training step, in 2D or in 3D.

Chapter 1 uses it to measure "the challenges of 3D" rather than quote them, on the plain
encoder–decoder of :mod:`gen3d_lessons.models.plain`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..blocks import count_parameters
from ..models.plain import PlainEncoderDecoder, PlainNetConfig

__all__ = ["activation_bytes", "measure_training_step", "cost_ratios"]


def layer_output_bytes(nets: Sequence[nn.Module], forward: Callable[[], Any]) -> int:
    """Bytes of every leaf layer's output while ``forward()`` runs the networks ``nets`` (no
    gradients): roughly what backpropagation through that computation has to keep."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for net in nets for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return total


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every layer output in one forward pass: roughly what backprop has to keep."""
    return layer_output_bytes([model], lambda: model(x))


def median_step_seconds(step: Callable[[int], Any], steps: int) -> float:
    """Median wall time of ``steps`` calls ``step(i)``, after one untimed warm-up call ``step(0)``."""
    seconds = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step(i)
        if i:
            seconds.append(time.perf_counter() - t0)
    return float(sorted(seconds)[len(seconds) // 2])


def measure_training_step(cfg: PlainNetConfig, size: int, batch: int = 2, steps: int = 3,
                          device: str | torch.device = "cpu") -> dict[str, float]:
    """Parameters, memory estimate (MB) and median seconds per Adam step at an edge of ``size``.

    Memory = activations of one forward pass + weights, gradients and Adam's two moments
    (4 × parameters), in float32. It is computed from tensor sizes, so it does not depend on
    the allocator and is the same on any machine.
    """
    model = PlainEncoderDecoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, cfg.in_channels, *([size] * cfg.dims), device=device)  # (B, C, *spatial)
    params = count_parameters(model)
    memory = activation_bytes(model, x) + 4 * 4 * params

    def step(_i: int) -> None:
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"dims": cfg.dims, "size": size, "voxels": size ** cfg.dims, "params": params,
            "memory_MB": memory / 2 ** 20, "s_per_step": median_step_seconds(step, steps)}


def cost_ratios(rows: Sequence[Mapping[str, Any]], edge: int) -> dict[str, float]:
    """3D over 2D at one grid edge: seconds per step, memory and parameters.

    ``rows``: results of :func:`measure_training_step` (a list of dicts or a DataFrame's
    records) that include both ``dims=2`` and ``dims=3`` at ``size=edge``.
    """
    rows = list(rows.to_dict("records")) if hasattr(rows, "to_dict") else list(rows)
    at = {(int(r["dims"]), int(r["size"])): r for r in rows}
    missing = [d for d in (2, 3) if (d, edge) not in at]
    if missing:
        raise ValueError(f"rows: no measurement in {' and '.join(f'{d}D' for d in missing)} at edge {edge}; "
                         f"measured: {sorted(at)}")
    a, b = at[(2, edge)], at[(3, edge)]
    return {"slowdown": b["s_per_step"] / a["s_per_step"], "memory_ratio": b["memory_MB"] / a["memory_MB"],
            "param_ratio": b["params"] / a["params"]}
