"""Denoising diffusion (DDPM, Ho et al. 2020; survey §2.4.6 and §4.4): the process, then the networks.

The *process* lives in :class:`NoiseSchedule` and knows no network; the *networks* (the noise
predictors ``eps_theta``) know no schedule. A network is anything called as
``model(x_t, t) -> eps_hat`` with ``eps_hat`` shaped like ``x_t``.

Forward process (fixed, no parameters). With ``beta_1 .. beta_T`` small and increasing,
``alpha_t = 1 - beta_t`` and ``alpha_bar_t = prod_{s <= t} alpha_s``::

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)            (Ho et al. Eq. 4)

so ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` is one line, for any ``t``
(:meth:`NoiseSchedule.q_sample`), and ``x_T`` is almost pure noise.

Reverse process (learned). ``p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t² I)`` with the
mean written through the predicted noise (Ho et al. Eq. 11)::

    mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta(x_t, t)) / sqrt(alpha_t)

and ``sigma_t² = beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``, the variance of
the true posterior ``q(x_{t-1} | x_t, x_0)`` (Eq. 7). :meth:`NoiseSchedule.p_sample` takes one
such step and :meth:`NoiseSchedule.sample` takes all ``T`` of them from ``x_T ~ N(0, I)``.

DDIM (Song et al. 2021) keeps the trained network and the marginals ``q(x_t | x_0)`` but walks a
*subsequence* of steps ``tau_S > ... > tau_1``: from ``x_t`` it estimates
``x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)`` and jumps to

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma²) eps_hat + sigma z,
    sigma = eta * sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)),

deterministic for ``eta = 0`` (:meth:`NoiseSchedule.ddim_sample`): 50 network calls instead of 1000.

Training minimises ``L_simple = E_{x_0, eps, t} || eps - eps_theta(x_t, t) ||²`` (Ho et al.
Eq. 14; :func:`gen3d_lessons.training.diffusion.diffusion_step`).

Steps are indexed ``t = 0 .. T-1`` in code (``t = 1 .. T`` in the paper): code step ``t`` is the
paper's ``t + 1``.

Shapes: everything in :class:`NoiseSchedule` works for any ``(B, ...)``: volumes
``x: (B, C, D, H, W)`` for pixel-space diffusion, latent vectors ``z: (B, Z)`` for latent diffusion;
``t: (B,)`` integer steps. Schedule constants are ``(T,)`` buffers broadcast by :func:`extract`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..profiles import step_cap

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # eps_theta(x_t, t) -> eps_hat


# 1. The schedule ------------------------------------------------------------------------------

@dataclass
class ScheduleConfig:
    """The noise schedule ``beta_1 .. beta_T``.

    ``"linear"``: ``beta`` from ``beta_start`` to ``beta_end`` (Ho et al.: 1e-4 to 0.02, T = 1000).
    ``"cosine"``: ``alpha_bar_t = cos²((t/T + s) / (1 + s) · π/2)`` (Nichol & Dhariwal 2021), which
    destroys information more evenly over the steps; ``beta_start``/``beta_end`` are then unused.
    """

    timesteps: int = 1000              # T
    beta_start: float = 1e-4           # beta_1
    beta_end: float = 0.02             # beta_T
    kind: str = "linear"               # "linear" | "cosine"

    def __post_init__(self):
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise ValueError(f"ScheduleConfig.timesteps: expected a positive integer, got {self.timesteps!r}")
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"ScheduleConfig.kind: expected 'linear' or 'cosine', got {self.kind!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"ScheduleConfig: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}")


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """``beta_t`` for t = 1..T as a (T,) float64 tensor."""
    T = cfg.timesteps
    if cfg.kind == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    s = 0.008                                                          # Nichol & Dhariwal's offset
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2            # alpha_bar(t), (T + 1,)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)                       # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` shaped ``(B, 1, ..., 1)`` to broadcast against ``x`` of shape ``x_shape`` (any rank).

    ``a: (T,)`` a schedule constant, ``t: (B,)`` integer steps.
    """
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


# 2. The process -------------------------------------------------------------------------------

class NoiseSchedule(nn.Module):
    """The diffusion process: forward noising (``q_sample``) and reverse sampling (``p_sample``,
    ``sample``, ``ddim_step``, ``ddim_sample``). No trainable parameters: every constant is a
    buffer, so ``.to(device)`` moves them and ``state_dict`` saves them.
    """

    def __init__(self, cfg: ScheduleConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ScheduleConfig()
        betas = make_betas(cfg)                                         # (T,) float64 while deriving
        alphas = 1.0 - betas                                            # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alphas, 0)                            # alpha_bar_t = prod_s alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        constants = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),                          # q(x_t | x_0), Eq. 4
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # the true posterior q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta_tilde_t), Eq. 6-7
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float())

    @property
    def T(self) -> int:
        """The number of diffusion steps."""
        return self.cfg.timesteps

    # ----- checks -------------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor (B, ...), got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{name}: expected a batch (B, ...) with at least 2 dimensions, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or infinite values")

    def _steps(self, t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        """``t`` as a (B,) int64 tensor on ``device``, checked to lie in 0 .. T-1."""
        if isinstance(t, bool):
            raise ValueError(f"t: expected integer steps, got {t!r}")
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t: expected an int or an integer tensor (B,), got {t!r}")
        if t.shape != (batch,):
            raise ValueError(f"t: expected shape ({batch},), one step per sample, got {tuple(t.shape)}")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"t: steps must lie in 0 .. {self.T - 1}, got {int(t.min())} .. {int(t.max())}")
        return t.to(device=device, dtype=torch.long)

    def _predict_eps(self, model: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(x_t, t)
        if not isinstance(eps, torch.Tensor) or eps.shape != x_t.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"model: must return eps_hat shaped like x_t {tuple(x_t.shape)}, got {got}")
        return eps

    # ----- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: ``sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Eq. 4).

        ``x0: (B, ...)``, ``t``: an int or (B,) steps in 0..T-1, ``eps``: the noise (drawn if None).
        """
        self._check_x(x0, "x0")
        t = self._steps(t, x0.shape[0], x0.device)
        if eps is None:
            eps = torch.randn_like(x0)
        elif eps.shape != x0.shape:
            raise ValueError(f"eps: expected the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
        return extract(self.sqrt_alpha_bar, t, x0.shape) * x0 + extract(self.sqrt_one_minus_alpha_bar, t, x0.shape) * eps

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4 with a noise estimate: ``x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``."""
        return (x_t - extract(self.sqrt_one_minus_alpha_bar, t, x_t.shape) * eps) / extract(self.sqrt_alpha_bar, t, x_t.shape)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (Eq. 6-7); the variance is (B, 1, ..., 1)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.shape)

    # ----- reverse process: ancestral DDPM sampling -------------------------------------------
    @torch.no_grad()
    def p_sample(self, model: Denoiser, x_t: torch.Tensor, t: int, generator: torch.Generator | None = None,
                 clip_x0: float | None = None) -> torch.Tensor:
        """One reverse step ``x_{t-1} ~ p_theta(x_{t-1} | x_t)`` at code step ``t`` (an int, 0..T-1).

        1. predict the noise; 2. estimate ``x_0`` (clipped to ``±clip_x0`` if given, which keeps
        early, very noisy estimates inside the data range); 3. the posterior mean given that
        estimate, which equals Eq. 11's ``mu_theta`` without clipping; 4. add ``sigma_t z``
        except at the last step.
        """
        self._check_x(x_t, "x_t")
        tt = self._steps(t, x_t.shape[0], x_t.device)
        # 1. noise estimate
        eps = self._predict_eps(model, x_t, tt)
        # 2. x_0 estimate
        x0 = self.predict_x0(x_t, tt, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # 3. mean of p_theta(x_{t-1} | x_t)
        mean, var = self.q_posterior(x0, x_t, tt)
        if t == 0:
            return mean
        # 4. sigma_t z with sigma_t² = beta_tilde_t
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        return mean + var.sqrt() * z

    def _start(self, shape: Sequence[int], generator: torch.Generator | None, device,
               x_T: torch.Tensor | None = None) -> torch.Tensor:
        """``x_T``: the given one (checked), else ``N(0, I)`` noise of ``shape`` from ``generator``."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape: expected a batch shape (B, ...) of positive sizes, got {shape}")
        if x_T is not None:
            self._check_x(x_T, "x_T")
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T: expected shape {shape}, got {tuple(x_T.shape)}")
            return x_T
        device = self.betas.device if device is None else torch.device(device)
        return torch.randn(shape, generator=generator).to(device)          # x_T ~ N(0, I)

    @torch.no_grad()
    def sample(self, model: Denoiser, shape: Sequence[int], generator: torch.Generator | None = None,
               device: torch.device | str | None = None, clip_x0: float | None = None,
               progress: bool | str = False, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral sampling: ``x_T ~ N(0, I)``, then ``p_sample`` for t = T-1 .. 0; returns ``x_0``.

        ``T`` network calls. ``generator`` (a CPU ``torch.Generator``) makes the samples repeatable;
        ``progress`` a bar description (or True) shows a progress bar; ``x_T`` may be given.
        """
        x = self._start(shape, generator, device, x_T)
        steps = range(self.T - 1, self.T - 1 - step_cap(self.T), -1)         # T-1 .. 0 (fewer in a dry run)
        for t in _maybe_progress(steps, progress, "DDPM sampling"):
            x = self.p_sample(model, x, t, generator, clip_x0)
        return x

    # ----- reverse process: DDIM ---------------------------------------------------------------
    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` code steps evenly spread over 0 .. T-1, from the noisiest down to 0."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise ValueError(f"steps: expected an integer in 1 .. {self.T}, got {steps!r}")
        taus = torch.linspace(self.T - 1, 0, steps).round().long()        # T-1, ..., 0 (just T-1 for one step)
        return torch.unique_consecutive(taus).tolist()

    @torch.no_grad()
    def ddim_step(self, model: Denoiser, x_t: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
                  generator: torch.Generator | None = None, clip_x0: float | None = None) -> torch.Tensor:
        """One DDIM jump from step ``t`` to an earlier step ``t_prev`` (``-1`` means "to x_0").

        Song et al. Eq. 12: 1. predict the noise; 2. estimate ``x_0``; 3. step to ``t_prev`` along
        the predicted noise direction, plus fresh noise of scale ``sigma`` (0 when ``eta = 0``).
        """
        self._check_x(x_t, "x_t")
        if not -1 <= t_prev < t:
            raise ValueError(f"t_prev: expected -1 <= t_prev < t = {t}, got {t_prev}")
        if eta < 0:
            raise ValueError(f"eta: expected eta >= 0, got {eta}")
        tt = self._steps(t, x_t.shape[0], x_t.device)
        # 1. noise estimate, 2. x_0 estimate
        eps = self._predict_eps(model, x_t, tt)
        x0 = self.predict_x0(x_t, tt, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - extract(self.sqrt_alpha_bar, tt, x_t.shape) * x0) / extract(self.sqrt_one_minus_alpha_bar, tt, x_t.shape)
        if t_prev < 0:
            return x0
        # 3. jump: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma²) eps + sigma z
        ab_t, ab_s = self.alpha_bar[t], self.alpha_bar[t_prev]
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        x_s = ab_s.sqrt() * x0 + (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_s = x_s + sigma * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        return x_s

    @torch.no_grad()
    def ddim_sample(self, model: Denoiser, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    clip_x0: float | None = None, progress: bool | str = False,
                    x_T: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling with ``steps`` network calls; ``eta = 0`` is deterministic given ``x_T``.

        ``x_T`` may be given (e.g. to decode the same noise with different step counts);
        otherwise it is drawn with ``generator``.
        """
        taus = self.ddim_timesteps(steps)
        x = self._start(shape, generator, device, x_T)
        jumps = list(zip(taus, taus[1:] + [-1]))[:step_cap(len(taus))]               # fewer in a dry run
        for t, t_prev in _maybe_progress(jumps, progress, "DDIM sampling"):
            x = self.ddim_step(model, x, t, t_prev, eta, generator, clip_x0)
        return x


def _maybe_progress(steps, progress: bool | str, default: str):
    if not progress:
        return steps
    from ..progress import progress as bar

    return bar(steps, desc=progress if isinstance(progress, str) else default, leave=False)


# 3. The networks: noise predictors eps_theta(x_t, t) -------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)                 # (B, 2 * (dim/2))
    return nn.functional.pad(emb, (0, dim - 2 * half))                   # (B, dim) for odd dim too


@dataclass
class LatentDenoiserConfig:
    """Hyperparameters of :class:`LatentDenoiser`, the noise predictor for vector latents."""

    latent_dim: int = 64               # Z
    hidden: int = 256                  # width of the residual MLP
    depth: int = 3                     # residual blocks
    time_dim: int = 64                 # sinusoidal embedding size
    dropout: float = 0.0

    def __post_init__(self):
        if min(self.latent_dim, self.hidden, self.depth, self.time_dim) < 1:
            raise ValueError(f"LatentDenoiserConfig: sizes must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LatentDenoiserConfig.dropout: expected a value in [0, 1), got {self.dropout}")


class _TimedBlock(nn.Module):
    """A pre-norm residual MLP block told the time step: ``h + W2 · SiLU(W1 · SiLU(LN(h)) + e(t))``.

    Adding the time embedding inside every block (not only at the input) lets each block act
    differently on nearly clean and on very noisy inputs.
    """

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.time = nn.Linear(hidden, hidden)
        self.fc2 = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.fc1(nn.functional.silu(self.norm(h))) + self.time(emb))   # (B, hidden)


class LatentDenoiser(nn.Module):
    """``eps_theta(z_t, t)`` for latent vectors ``z_t: (B, Z)``, ``t: (B,)`` -> ``(B, Z)``.

    The latent of a vector-latent autoencoder has no spatial axes, so the denoiser of latent
    diffusion is a plain residual MLP with a time embedding: cheap enough to train for thousands
    of steps on a CPU in a minute.
    """

    def __init__(self, cfg: LatentDenoiserConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LatentDenoiserConfig()
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))
        self.inp = nn.Linear(cfg.latent_dim, cfg.hidden)
        self.blocks = nn.ModuleList(_TimedBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.latent_dim))
        nn.init.zeros_(self.out[-1].weight)             # start by predicting eps_hat = 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        Z = self.cfg.latent_dim
        if z_t.ndim != 2 or z_t.shape[1] != Z:
            raise ValueError(f"z_t: expected shape (B, {Z}), got {tuple(z_t.shape)}")
        if t.shape != (z_t.shape[0],):
            raise ValueError(f"t: expected shape ({z_t.shape[0]},), got {tuple(t.shape)}")
        # 1. time: (B,) -> (B, hidden)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        # 2. latent in: (B, Z) -> (B, hidden)
        h = self.inp(z_t)
        # 3. residual blocks, each told the time
        for block in self.blocks:
            h = block(h, emb)
        # 4. noise estimate: (B, hidden) -> (B, Z)
        return self.out(h)


@dataclass
class PixelDenoiserConfig:
    """A small 3D U-Net noise predictor for volumes: MONAI's ``DiffusionModelUNet``.

    ``channels[k]`` is the width at the k-th resolution; the edge of the volume must be a
    multiple of ``2 ** (len(channels) - 1)``. MONAI's default of 32 GroupNorm groups does not
    divide small widths: ``norm_num_groups`` must divide every channel count.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 32)
    attention_levels: tuple[bool, ...] = (False, False, False)
    num_res_blocks: int = 1
    norm_num_groups: int = 8

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"PixelDenoiserConfig: one attention flag per level, got {self.attention_levels} "
                             f"for channels {self.channels}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"PixelDenoiserConfig: norm_num_groups={self.norm_num_groups} must divide every "
                             f"channel count {self.channels}")


def pixel_denoiser(cfg: PixelDenoiserConfig | None = None) -> nn.Module:
    """``eps_theta(x_t, t)`` for volumes ``(B, C, D, H, W)``: a MONAI ``DiffusionModelUNet`` (3D).

    A U-Net with residual blocks; the sinusoidal time embedding is added inside every block.
    Attention needs ``einops``.
    """
    from monai.networks.nets import DiffusionModelUNet

    cfg = cfg or PixelDenoiserConfig()
    return DiffusionModelUNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                              channels=cfg.channels, attention_levels=cfg.attention_levels,
                              num_res_blocks=cfg.num_res_blocks, norm_num_groups=cfg.norm_num_groups,
                              num_head_channels=cfg.channels[-1])


__all__ = ["ScheduleConfig", "make_betas", "extract", "NoiseSchedule", "timestep_embedding",
           "LatentDenoiserConfig", "LatentDenoiser", "PixelDenoiserConfig", "pixel_denoiser"]
