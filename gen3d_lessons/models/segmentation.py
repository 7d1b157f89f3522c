"""Two generative twists on the segmentation U-Net, after the survey's §3.4.

* **Vox2Vox** (Cirillo et al. 2021): the U-Net is the *generator* of a conditional GAN that turns
  an image into a label map, and a 3D **PatchGAN** discriminator (Isola et al. 2017;
  :class:`~gen3d_lessons.blocks.PatchDiscriminator3D`, shared with chapter 3's pix2pix) judges
  (image, label map) pairs patch by patch: real pairs carry the expert's labels, fake pairs the
  U-Net's softmax. It is the pix2pix objective (the survey's Eq. 3) with a segmentation loss in
  place of the L1 term.
* **VAE-regularised U-Net** (Myronenko 2019): a second decoder hangs on the U-Net's bottleneck and
  must *reconstruct the input image* from a small Gaussian latent code, as a VAE does
  (Kingma & Welling 2014). The extra task forces the shared encoder to keep what describes the
  whole image, a regulariser that Myronenko found to help when labelled volumes are few.

Both networks only change how the U-Net is *trained*: at test time each is a plain
``image -> logits`` map, so the chapter evaluates all three with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import ConvBlock3d
from .unet import UNet3D, UNetConfig


# ---------------------------------------------------------------------------------------------
# The VAE-regularised U-Net (Myronenko 2019)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAERegConfig:
    """A :class:`UNet3D` plus a VAE decoder from its bottleneck back to the input image."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    crop: tuple[int, int, int] = (32, 32, 32)   # training crop: fixes the size of the latent's dense layers
    latent_dim: int = 64                        # Z: the VAE's Gaussian code
    squeeze_channels: int = 8                   # bottleneck channels before the dense layer

    def __post_init__(self):
        if isinstance(self.unet, dict):         # rebuilt from a saved file
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        object.__setattr__(self, "crop", tuple(int(s) for s in self.crop))
        if len(self.crop) != 3 or any(s % self.unet.divisor for s in self.crop):
            raise ValueError(f"VAERegConfig.crop: expected three sides divisible by {self.unet.divisor}, got {self.crop}")
        if self.latent_dim < 1 or self.squeeze_channels < 1:
            raise ValueError("VAERegConfig: latent_dim and squeeze_channels must be >= 1")

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this (the U-Net's)."""
        return self.unet.divisor

    @property
    def bottleneck_shape(self) -> tuple[int, int, int]:
        return tuple(s // self.unet.divisor for s in self.crop)


class VAERegUNet(nn.Module):
    """Segmentation U-Net + VAE branch. ``forward(x)`` gives logits only, like :class:`UNet3D`.

    Training uses :meth:`forward_train`, which also returns the reconstruction and the latent's
    ``mu`` and ``logvar``. The VAE branch needs crops of ``cfg.crop`` (its dense layers have a fixed
    size); the segmentation path takes any divisible size.
    """

    def __init__(self, cfg: VAERegConfig = VAERegConfig()):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet3D(cfg.unet)
        f = cfg.unet.features
        s = cfg.squeeze_channels
        n_flat = s * int(torch.tensor(cfg.bottleneck_shape).prod())
        # encoder side of the VAE: squeeze the bottleneck, then one dense layer to (mu, logvar)
        self.squeeze = nn.Sequential(nn.Conv3d(f[-1], s, 1), nn.LeakyReLU(0.01, inplace=True))
        self.to_stats = nn.Linear(n_flat, 2 * cfg.latent_dim)
        # decoder side: dense layer back to the bottleneck grid, then up to the full size without skips
        self.from_z = nn.Sequential(nn.Linear(cfg.latent_dim, n_flat), nn.LeakyReLU(0.01, inplace=True))
        self.unsqueeze = nn.Conv3d(s, f[-1], 1)
        ups: list[nn.Module] = []
        for k in range(len(f) - 1, 0, -1):
            ups += [nn.ConvTranspose3d(f[k], f[k - 1], 2, stride=2), ConvBlock3d(f[k - 1], f[k - 1], cfg.unet.norm)]
        self.up = nn.Sequential(*ups)
        self.to_image = nn.Conv3d(f[0], cfg.unet.in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def encode_latent(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck features (B, f_last, *S_b) -> ``mu``, ``logvar``, each (B, Z)."""
        h = self.squeeze(bottleneck).flatten(1)                       # (B, s * |S_b|)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)                 # (B, Z), (B, Z)
        return mu, logvar.clamp(-10.0, 10.0)                          # keep exp(logvar) finite

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``z = mu + sigma * eps``, eps ~ N(0, I): a sample that gradients can flow through."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (B, Z) -> reconstructed image (B, C_in, *crop)."""
        h = self.from_z(z).view(z.shape[0], self.cfg.squeeze_channels, *self.cfg.bottleneck_shape)
        return self.to_image(self.up(self.unsqueeze(h)))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, reconstruction, mu, logvar)``: one shared encoder pass, two decoders."""
        if tuple(x.shape[2:]) != self.cfg.crop:
            raise ValueError(f"x: the VAE branch was built for crops of {self.cfg.crop}, got {tuple(x.shape[2:])}")
        # 1. shared encoder
        feats = self.unet.encode(x)
        # 2. segmentation decoder (with skips)
        logits = self.unet.decode(feats)
        # 3. VAE branch from the bottleneck only (no skips: everything must pass through z)
        mu, logvar = self.encode_latent(feats[-1])
        recon = self.decode_latent(self.reparameterize(mu, logvar))
        return logits, recon, mu, logvar
