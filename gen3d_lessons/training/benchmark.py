"""What a network costs: parameters, memory and seconds per training step, in 2D or in 3D.

Chapter 1 uses it to measure "the challenges of 3D" rather than quote them, on the plain
encoder–decoder of :mod:`gen3d_lessons.models.plain`; chapter 15 compares the U-Net's cheaper
blocks with :func:`network_costs` (parameters, multiply-adds, the memory autograd keeps, seconds
per step).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..blocks import count_parameters
from ..models.plain import PlainEncoderDecoder, PlainNetConfig

__all__ = ["activation_bytes", "measure_training_step", "cost_ratios", "multiply_adds", "saved_bytes", "network_costs"]


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


def multiply_adds(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``x`` through ``model``'s convolutions and linear layers.

    A convolution costs ``(C_in / groups) · k³`` per output value; a transposed convolution
    ``(C_out / groups) · k³`` per input value; a linear layer ``in_features`` per output.
    Normalisations, activations and pooling are left out (a few per value, next to hundreds).
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kernel = int(torch.tensor(getattr(module, "kernel_size", (1,))).prod())
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            total += inputs[0].numel() * module.out_channels // module.groups * kernel
        elif isinstance(module, nn.modules.conv._ConvNd):
            total += output.numel() * module.in_channels // module.groups * kernel
        else:
            total += output.numel() * module.in_features

    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training-mode forward of
    ``x``, each storage counted once: what training holds in memory beyond the weights."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
    finally:
        model.train(was_training)
    return sum(seen.values())


def network_costs(model: nn.Module, size: int, *, in_channels: int, classes: int, batch: int = 2, steps: int = 3,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """What one network costs at crops of ``size``³ (batch ``batch``), measured, not estimated:

    ``params``; ``GMACs``, multiply-adds of one forward pass per crop (:func:`multiply_adds`);
    ``memory_MB``, what autograd keeps for one training step (:func:`saved_bytes`) plus weights,
    gradients and Adam's two moments (4 × parameters, float32); ``s_per_step``, the median seconds
    of ``steps`` Adam steps on a cross-entropy against random labels (after one warm-up step).
    The batch norm statistics this touches are put back, so a trained model may be measured.
    """
    model = model.to(device)
    x = torch.rand(batch, in_channels, size, size, size, device=device)
    y = torch.randint(classes, (batch, size, size, size), device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    params = count_parameters(model)

    def step(_i: int) -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    was_training = model.training
    try:
        macs = multiply_adds(model, x[:1])
        memory = saved_bytes(model, x) + 4 * 4 * params
        model.train()                                       # a training step, as training takes it
        seconds = median_step_seconds(step, steps)
    finally:
        model.load_state_dict(state)
        model.train(was_training)
    return {"size": size, "params": params, "GMACs": macs / 1e9, "memory_MB": memory / 2 ** 20, "s_per_step": seconds}
