"""A StyleGAN2-style generator in 3D (Karras et al. 2020; survey §2.3.6, 3D-StyleGAN by Hong et al. 2021).

Three ideas separate it from the plain :class:`~gen3d_lessons.models.gan.Generator3D`:

1. a **mapping network** turns ``z`` into an intermediate code ``w`` (an MLP); ``w``, not ``z``,
   steers every layer, through a per-layer *style* ``s = A(w)`` (one number per input channel);
2. **modulated, demodulated convolutions** apply the style to the *weights*, not to the features:
   ``w'_{oik} = s_i · w_{oik}``, then ``w''_{oik} = w'_{oik} / sqrt(Σ_{i,k} w'_{oik}² + ε)``. If the
   input features have unit variance, so do the outputs, whatever the style: this replaces
   StyleGAN's AdaIN, whose per-sample normalisation caused the "water droplet" artefacts;
3. **noise inputs**: after every convolution, a single-channel Gaussian noise volume, scaled by a
   learned strength, gives the network a source of fine, uncorrelated detail (in brains: the
   folding of the cortex, the texture of the noise floor) that ``w`` need not encode.

The synthesis network starts from a learned constant ``start³`` block and, like StyleGAN2's
"skip" generator, sums the image predicted at every resolution (``to_image`` layers) after
upsampling it. The discriminator can be any critic, e.g.
:class:`~gen3d_lessons.models.gan.Discriminator3D`.

Shapes: ``z: (B, Z)``, ``w: (B, W)``, ``c: (B, K)``, volumes ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import check_condition, sample_from_prior, set_template

__all__ = ["StyleGANConfig", "MappingNetwork", "ModulatedConv3d", "NoiseInjection", "StyleBlock3D",
           "StyleGenerator3D"]


@dataclass
class StyleGANConfig:
    """Hyperparameters of :class:`StyleGenerator3D`. ``channels[k]`` is the width at the k-th resolution."""

    z_dim: int = 64                              # Z
    w_dim: int = 64                              # W: the intermediate latent
    mapping_layers: int = 4                      # depth of the mapping MLP
    cond_dim: int = 0                            # K: c is concatenated to the normalised z before mapping
    out_channels: int = 1
    size: int = 32
    channels: tuple[int, ...] = (64, 32, 16, 8)  # 4³ -> 8³ -> 16³ -> 32³
    output: str = "sigmoid"                      # "sigmoid" | "none"
    template: bool = False                       # a learned per-voxel bias on the output (see set_template)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if min(self.z_dim, self.w_dim, self.mapping_layers, self.out_channels, self.size) < 1 or self.cond_dim < 0 \
                or not self.channels or min(self.channels) < 1:
            raise ValueError(f"StyleGANConfig: sizes must be positive and cond_dim >= 0, got {self}")
        if self.size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"StyleGANConfig: size {self.size} must be a multiple of 2**(len(channels) - 1) = "
                             f"{2 ** (len(self.channels) - 1)}")
        if self.output not in ("sigmoid", "none"):
            raise ValueError(f"StyleGANConfig.output: expected 'sigmoid' or 'none', got {self.output!r}")

    @property
    def start(self) -> int:
        return self.size // 2 ** (len(self.channels) - 1)


class MappingNetwork(nn.Module):
    """``z`` (B, Z) [and ``c`` (B, K)] -> ``w`` (B, W): normalise z to unit mean square, then an MLP."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, cond_dim: int = 0):
        super().__init__()
        dims = [z_dim + cond_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))])
        # He initialisation for LeakyReLU: w keeps about the variance of z through every layer. With
        # PyTorch's default (uniform, a third of the variance per layer) w shrinks towards a constant
        # after four layers, every style is about the same, and every sample the same volume.
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.2)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)          # "pixel norm" of the code
        return self.net(torch.cat([z, c.to(z.dtype)], 1) if c is not None else z)


class ModulatedConv3d(nn.Module):
    """A 3D convolution whose weights are scaled per sample by a style, then (optionally) demodulated.

    ``forward(x (B, I, D, H, W), w (B, W)) -> (B, O, D', H', W')``, with ``D' = 2D`` if ``upsample``.
    The weights are stored with unit variance and scaled by ``1 / sqrt(I k³)`` at run time
    (StyleGAN's "equalised learning rate"), so every layer's output starts at unit variance.
    Each sample gets its own kernel, so the batch runs as one *grouped* convolution with B groups.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.c_in, self.c_out, self.kernel = c_in, c_out, kernel
        self.demodulate, self.upsample = demodulate, upsample
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel, kernel))   # (O, I, k, k, k)
        self.scale = 1.0 / math.sqrt(c_in * kernel ** 3)
        self.affine = nn.Linear(w_dim, c_in)                                            # A: w -> style s
        nn.init.ones_(self.affine.bias)                                                 # s starts near 1

    def modulated_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The per-sample kernels (B, O, I, k, k, k) for codes ``w`` (B, W)."""
        s = self.affine(w)                                                              # (B, I) style
        weight = self.scale * self.weight[None] * s[:, None, :, None, None, None]      # w' = s_i w_oik
        if self.demodulate:                                                             # w'' = w' / ||w'_o||
            d = torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4, 5), keepdim=True) + 1e-8)   # (B, O, 1, 1, 1, 1)
            weight = weight * d
        return weight

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.c_in:
            raise ValueError(f"x: expected shape (B, {self.c_in}, D, H, W), got {tuple(x.shape)}")
        b = x.shape[0]
        weight = self.modulated_weight(w)                                               # (B, O, I, k, k, k)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        # one group per sample: (1, B*I, D, H, W) convolved with (B*O, I, k, k, k)
        out = F.conv3d(x.reshape(1, b * self.c_in, *x.shape[2:]),
                       weight.reshape(b * self.c_out, self.c_in, *weight.shape[3:]),
                       padding=self.kernel // 2, groups=b)                              # (1, B*O, D, H, W)
        return out.view(b, self.c_out, *out.shape[2:])                                  # (B, O, D, H, W)


class NoiseInjection(nn.Module):
    """``x + strength · noise`` with one Gaussian noise volume (B, 1, D, H, W) shared by all channels.

    ``strength`` is learned and starts at 0: the generator decides how much randomness it wants.
    """

    def __init__(self):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return x + self.strength * noise


class StyleBlock3D(nn.Module):
    """Modulated convolution -> noise -> bias -> LeakyReLU (scaled by √2 to keep the variance)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv3d(c_in, c_out, 3, w_dim, demodulate=True, upsample=upsample)
        self.noise = NoiseInjection()
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return F.leaky_relu(self.noise(self.conv(x, w), noise) + self.bias, 0.2) * math.sqrt(2)


class StyleGenerator3D(nn.Module):
    """``z`` [and ``c``] -> ``w`` (mapping) -> volume (synthesis from a learned constant).

    1. mapping: ``w = f(z[, c])``;
    2. synthesis: at every resolution a :class:`StyleBlock3D` (the first without upsampling,
       starting from the learned constant), each steered by the same ``w``;
    3. skip outputs: each resolution predicts an image with a 1×1×1 modulated convolution
       (no demodulation), added to the upsampled image of the coarser ones.
    """

    def __init__(self, cfg: StyleGANConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or StyleGANConfig()
        ch, s = cfg.channels, cfg.start
        self.mapping = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.cond_dim)
        self.constant = nn.Parameter(torch.randn(1, ch[0], s, s, s))                   # (1, C0, s, s, s)
        self.blocks = nn.ModuleList([StyleBlock3D(ch[0], ch[0], cfg.w_dim)] +
                                    [StyleBlock3D(a, b, cfg.w_dim, upsample=True) for a, b in zip(ch, ch[1:])])
        self.to_image = nn.ModuleList(ModulatedConv3d(c, cfg.out_channels, 1, cfg.w_dim, demodulate=False)
                                      for c in ch)
        self.image_bias = nn.Parameter(torch.zeros(1, cfg.out_channels, 1, 1, 1))
        self.template = (nn.Parameter(torch.zeros(1, cfg.out_channels, cfg.size, cfg.size, cfg.size))
                         if cfg.template else None)

    @torch.no_grad()
    def set_template(self, mean_volume: torch.Tensor) -> "StyleGenerator3D":
        """Start the per-voxel output bias at the average training volume, as
        :meth:`~gen3d_lessons.models.gan.Generator3D.set_template` does; returns the generator."""
        set_template(self.template, mean_volume, self.cfg.output == "sigmoid")
        return self

    def synthesis(self, w: torch.Tensor, noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Volumes (B, C, size³) from intermediate codes ``w`` (B, W); ``noise``: one per block or None."""
        noise = noise if noise is not None else [None] * len(self.blocks)
        h = self.constant.expand(w.shape[0], -1, -1, -1, -1)                            # (B, C0, s, s, s)
        image = None
        for block, to_image, n in zip(self.blocks, self.to_image, noise):
            h = block(h, w, n)                                                          # (B, C_k, e, e, e)
            y = to_image(h, w)                                                          # (B, C, e, e, e)
            image = y if image is None else y + F.interpolate(image, scale_factor=2, mode="trilinear",
                                                              align_corners=False)
        image = image + self.image_bias
        if self.template is not None:
            image = image + self.template
        return torch.sigmoid(image) if self.cfg.output == "sigmoid" else image

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None,
                noise: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        cfg = self.cfg
        if z.ndim != 2 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"z: expected shape (B, {cfg.z_dim}), got {tuple(z.shape)}")
        check_condition(c, z.shape[0], cfg.cond_dim, "generator")
        return self.synthesis(self.mapping(z, c), noise)                                # (B, C, size³)

    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes from fresh codes, in evaluation mode and without gradients."""
        return sample_from_prior(self, n, self.cfg.z_dim, c, generator)
