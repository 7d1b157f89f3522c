"""What a network costs: parameters, memory and seconds per training step, in 2D or in 3D.

Chapter 1 uses it to measure "the challenges of 3D" rather than quote them; chapter 15 compares
efficient 3D architectures with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PlainNetConfig:
    dims: int = 3            # 2 for images, 3 for volumes
    in_channels: int = 1
    width: int = 16          # channels of the first level; doubled at each downsampling
    levels: int = 3          # number of resolution levels
    out_channels: int = 1


class PlainEncoderDecoder(nn.Module):
    """A small U-shaped conv net without skips, written once for 2D and 3D.

    The same code builds both, so the comparison isolates the one thing that changes: a k×k kernel
    becomes k×k×k, and a feature map of n² pixels becomes one of n³ voxels.
    """

    def __init__(self, cfg: PlainNetConfig):
        super().__init__()
        if cfg.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {cfg.dims}")
        conv = nn.Conv2d if cfg.dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if cfg.dims == 2 else nn.ConvTranspose3d
        norm = nn.InstanceNorm2d if cfg.dims == 2 else nn.InstanceNorm3d
        widths = [cfg.width * 2 ** i for i in range(cfg.levels)]
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for i, w in enumerate(widths):                      # encoder: conv, then halve the size
            layers += [conv(c_in, w, 3, padding=1), norm(w, affine=True), nn.LeakyReLU(0.2)]
            if i < len(widths) - 1:
                layers += [conv(w, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = w
        for w in reversed(widths[:-1]):                     # decoder: double the size, conv
            layers += [up(c_in, w, 2, stride=2), conv(w, w, 3, padding=1), norm(w, affine=True), nn.LeakyReLU(0.2)]
            c_in = w
        layers.append(conv(c_in, cfg.out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, C, H, W) or (B, C, D, H, W)
        return self.net(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every layer output in one forward pass: roughly what backprop has to keep."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


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
    seconds = []
    for i in range(steps + 1):                                # step 0 warms up and is not timed
        t0 = time.perf_counter()
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            seconds.append(time.perf_counter() - t0)
    return {"dims": cfg.dims, "size": size, "voxels": size ** cfg.dims, "params": params,
            "memory_MB": memory / 2 ** 20, "s_per_step": float(sorted(seconds)[len(seconds) // 2])}
