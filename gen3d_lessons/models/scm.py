"""A small deep structural causal model (Deep SCM; Pawlowski, Castro & Glocker 2020) of brain ageing.

The causal graph, with the noise of each variable::

    ε_a        ε_v          ε_x = (z, ε)
     │          │            │
     a ───────► v ─────────► x          age -> ventricle volume -> image,
     └───────────────────────┘          and age -> image directly (cortical thinning)

Every variable is a function of its own noise and of its parents (its *mechanism*):

- ``a := ε_a``: age is a root; the cohort's ages are its samples.
- ``v := f_v(ε_v; a) = exp(mu(a) + sigma ε_v)``, ``ε_v ~ N(0, 1)``: a one-dimensional conditional
  affine flow on the log-volume, ``mu`` a quadratic in age (:class:`VolumeMechanism`). It is
  invertible in ``ε_v``, so the noise of an observed brain can be recovered exactly.
- ``x := f_x(ε_x; a, v) = D_theta(z; a, v) + ε``: the decoder of a conditional VAE (Eq. 8) maps a
  latent ``z ~ N(0, I)`` and the parents to the mean image, and ``ε`` is the voxel residual of a
  Gaussian observation model. The encoder ``q_phi(z | x; a, v)`` makes the inference of ``z``
  *amortised* (Pawlowski et al.'s "amortised explicit" mechanism).

A counterfactual ("this brain, had it been 20 years older") takes Pearl's three steps
(:meth:`DeepSCM.counterfactual`):

1. **abduction**: recover the noise of the observed brain: ``ε_v = (log v - mu(a)) / sigma``,
   ``z = mu_phi(x; a, v)`` (the posterior mean), ``ε = x - D_theta(z; a, v)``;
2. **action**: replace age's mechanism by a constant, ``do(a := a')``;
3. **prediction**: push the same noise through the changed model: ``v' = f_v(ε_v; a')``,
   ``x' = D_theta(z; a', v') + ε``.

Keeping ``ε`` is what keeps the subject's own detail, which the decoder's blurry mean cannot hold:
``x' = x + D_theta(z; a', v') - D_theta(z; a, v)``.

:class:`VoxelwiseAgeModel` is the classical baseline: one straight line of intensity against age
per voxel, fitted over the cohort, applied to a subject as ``x + slope (a' - a)``.

Shapes: ``x: (B, C, D, H, W)``, ``age, volume: (B,)``, ``z: (B, Z)``, condition ``c: (B, 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..blocks import check_volumes
from .vae import VAE3D


# 2. The mechanisms ------------------------------------------------------------------------------

def _vector(a: Any, name: str, n: int | None = None, positive: bool = False) -> torch.Tensor:
    """A finite float64 tensor (B,) from a number, list, array or tensor."""
    t = torch.as_tensor(a, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite numbers, got {a!r}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name}: expected {n} values (one per volume), got {t.numel()}")
    if positive and (t <= 0).any():
        raise ValueError(f"{name}: expected positive volumes, got {t.tolist()}")
    return t


def _ages(a: Any, name: str = "age", n: int | None = None) -> torch.Tensor:
    t = _vector(a, name, n)
    if ((t < 0) | (t > 130)).any():
        raise ValueError(f"{name}: expected ages in years within [0, 130], got {t.tolist()}")
    return t


@dataclass
class VolumeMechanism:
    """``v = f_v(ε_v; a) = exp(mu(a) + sigma ε_v)`` with ``mu(a) = c0 + c1 t + c2 t²``, ``t = (a - a0) / s``.

    Fitted by least squares on log-volumes (the maximum-likelihood fit of this Gaussian flow).
    """

    coef: tuple[float, float, float]     # c0, c1, c2
    sigma: float                         # std of the log-volume around mu(a)
    age_mean: float                      # a0
    age_std: float                       # s

    @classmethod
    def fit(cls, age: Any, volume: Any) -> "VolumeMechanism":
        a = _ages(age)
        v = _vector(volume, "volume", len(a), positive=True)
        if len(a) < 4:
            raise ValueError(f"age, volume: need at least 4 subjects to fit a quadratic with noise, got {len(a)}")
        a0, s = float(a.mean()), float(a.std().clamp_min(1e-6))
        t = (a - a0) / s
        design = torch.stack([torch.ones_like(t), t, t * t], dim=1)              # (N, 3)
        coef = torch.linalg.lstsq(design, v.log()[:, None]).solution[:, 0]     # (3,)
        residual = v.log() - design @ coef
        sigma = float(residual.pow(2).sum().div(len(a) - 3).sqrt().clamp_min(1e-6))
        return cls(tuple(float(c) for c in coef), sigma, a0, s)

    def mu(self, age: Any) -> torch.Tensor:
        """The mean log-volume at each age, (B,)."""
        t = (_ages(age) - self.age_mean) / self.age_std
        c0, c1, c2 = self.coef
        return c0 + c1 * t + c2 * t * t

    def abduct(self, age: Any, volume: Any) -> torch.Tensor:
        """ε_v = (log v - mu(a)) / sigma: the subject's own deviation from the typical volume at its age."""
        a = _ages(age)
        return (_vector(volume, "volume", len(a), positive=True).log() - self.mu(a)) / self.sigma

    def predict(self, age: Any, eps: Any) -> torch.Tensor:
        """v = exp(mu(a) + sigma ε_v), (B,)."""
        a = _ages(age)
        return (self.mu(a) + self.sigma * _vector(eps, "eps", len(a))).exp()


@dataclass
class Abduction:
    """The exogenous noise of observed brains: ε_v (B,), z (B, Z) and the voxel residual ε (B, C, D, H, W)."""

    eps_v: torch.Tensor
    z: torch.Tensor
    eps_x: torch.Tensor


class DeepSCM:
    """age -> ventricle volume -> image, with a :class:`VolumeMechanism` and a CVAE as mechanisms.

    ``image_model`` is a :class:`~gen3d_lessons.models.vae.VAE3D` with ``cond_dim=2``; it is trained
    like any CVAE with the condition :meth:`condition` ``(a, v)`` (e.g. with
    :func:`~gen3d_lessons.training.generative.vae_step`). Build it with :meth:`from_cohort`, which
    fits the volume mechanism and the scaling of the condition on the training subjects.
    """

    def __init__(self, volume: VolumeMechanism, image_model: VAE3D, log_volume_mean: float, log_volume_std: float):
        if not isinstance(image_model, VAE3D) or image_model.cfg.cond_dim != 2:
            raise ValueError("image_model: expected a VAE3D built with VAEConfig(cond_dim=2) for (age, volume)")
        self.volume, self.image_model = volume, image_model
        self.log_volume_mean, self.log_volume_std = float(log_volume_mean), float(log_volume_std)

    @classmethod
    def from_cohort(cls, age: Any, volume: Any, image_model: VAE3D) -> "DeepSCM":
        v = _vector(volume, "volume", len(_ages(age)), positive=True)
        return cls(VolumeMechanism.fit(age, v), image_model, float(v.log().mean()), float(v.log().std().clamp_min(1e-6)))

    def condition(self, age: Any, volume: Any) -> torch.Tensor:
        """The CVAE's condition c = (standardised age, standardised log-volume), (B, 2) float32."""
        a = _ages(age)
        v = _vector(volume, "volume", len(a), positive=True)
        c = torch.stack([(a - self.volume.age_mean) / self.volume.age_std,
                         (v.log() - self.log_volume_mean) / self.log_volume_std], dim=1)
        return c.float().to(next(self.image_model.parameters()).device)

    @torch.no_grad()
    def abduct(self, x: torch.Tensor, age: Any, volume: Any) -> Abduction:
        """Step 1: the noise that, pushed through the mechanisms, reproduces the observed (a, v, x)."""
        cfg = self.image_model.cfg
        check_volumes(x, cfg.in_channels, cfg.size)
        a = _ages(age, n=len(x))
        v = _vector(volume, "volume", len(x), positive=True)
        self.image_model.eval()
        c = self.condition(a, v)
        x = x.to(c.device)
        z, _ = self.image_model.encode(x, c)                                  # posterior mean (B, Z)
        eps_x = x - self.image_model.decode(z, c)                             # what the decoder cannot explain
        return Abduction(self.volume.abduct(a, v), z, eps_x)

    @torch.no_grad()
    def counterfactual(self, x: torch.Tensor, age: Any, volume: Any, new_age: Any,
                       keep_residual: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Abduction, action ``do(a := new_age)``, prediction: ``(x', v')``, (B, C, D, H, W) and (B,).

        ``keep_residual=False`` drops the abducted voxel noise ε and returns the decoder's mean only.
        """
        noise = self.abduct(x, age, volume)                                   # 1. abduction
        a_new = _ages(new_age, "new_age", n=len(x))                           # 2. action
        v_new = self.volume.predict(a_new, noise.eps_v)                       # 3. prediction, in causal order
        x_new = self.image_model.decode(noise.z, self.condition(a_new, v_new))
        return (x_new + noise.eps_x if keep_residual else x_new), v_new.float()

    @torch.no_grad()
    def decode_at_ages(self, z: torch.Tensor, ages: Any) -> torch.Tensor:
        """The same codes ``z`` (B, Z) decoded at each of ``ages`` (A,): (A, B, C, D, H, W).

        ``do(a := a_k)`` with the ventricles at their typical volume for that age (``ε_v = 0``)
        and the image noise ``z`` held fixed: only age, and what follows from it, changes between
        the rows. If the CVAE has learned what age looks like, so does each brain.
        """
        if z.ndim != 2 or z.shape[1] != self.image_model.cfg.latent_dim:
            raise ValueError(f"z: expected shape (B, {self.image_model.cfg.latent_dim}), got {tuple(z.shape)}")
        ages = torch.as_tensor(ages).reshape(-1)
        typical = self.volume.predict(ages, torch.zeros(len(ages)))                     # (A,) ml at ε_v = 0
        self.image_model.eval()
        n = len(z)
        return torch.stack([self.image_model.decode(z, self.condition(a.repeat(n), v.repeat(n)))
                            for a, v in zip(ages, typical)])                             # (A, B, C, D, H, W)

    @torch.no_grad()
    def sample(self, age: Any, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Brains of given ages, ``do(a := age)``: ε_v ~ N(0, 1), z ~ N(0, I); returns ``(x, v)``."""
        a = _ages(age)
        eps_v = torch.randn(len(a), generator=generator, dtype=torch.float64)
        v = self.volume.predict(a, eps_v)
        self.image_model.eval()
        return self.image_model.sample(len(a), self.condition(a, v), generator=generator), v.float()


# 3. The classical baseline ----------------------------------------------------------------------

class VoxelwiseAgeModel:
    """A straight line of intensity against age at every voxel, fitted by least squares over a cohort.

    ``x(a) = intercept + slope · a [+ covariates · gamma]`` per voxel: the general linear model of
    voxel-based morphometry. Optional ``covariates`` (N, K), e.g. the scanner site one-hot with one
    column dropped, take up variation that would otherwise leak into the age slope if age and
    site happened to be correlated in the cohort. The counterfactual of a subject is its own image
    moved along the age slope: ``x' = x + slope · (a' - a)``. It knows how the *average* brain
    changes with age at each voxel, not how this brain's anatomy would.
    """

    def __init__(self):
        self.slope: torch.Tensor | None = None         # (1, C, D, H, W), intensity per year

    def fit(self, x: torch.Tensor, age: Any, covariates: torch.Tensor | None = None) -> "VoxelwiseAgeModel":
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            raise ValueError(f"x: expected volumes (N, C, D, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_volumes(x, x.shape[1], x.shape[2])
        a = _ages(age, n=len(x))
        if len(a) < 2 or float(a.std()) == 0:
            raise ValueError("age: need at least two different ages to fit a slope")
        # 1. the design matrix: intercept, centred age, covariates            (N, P)
        columns = [torch.ones_like(a), a - a.mean()]
        if covariates is not None:
            cov = torch.as_tensor(covariates, dtype=torch.float64)
            if cov.ndim != 2 or len(cov) != len(x) or not torch.isfinite(cov).all():
                raise ValueError(f"covariates: expected a finite ({len(x)}, K) array, got shape {tuple(cov.shape)}")
            columns += list(cov.T)
        design = torch.stack(columns, dim=1)
        if len(x) <= design.shape[1]:
            raise ValueError(f"x: {len(x)} volumes cannot fit {design.shape[1]} coefficients per voxel")
        # 2. least squares for every voxel at once: (N, P) \ (N, V) -> (P, V)
        coef = torch.linalg.lstsq(design, x.double().flatten(1)).solution
        self.slope = coef[1].view(1, *x.shape[1:]).float()
        return self

    def counterfactual(self, x: torch.Tensor, age: Any, new_age: Any) -> torch.Tensor:
        """x' = x + slope · (a' - a), (B, C, D, H, W)."""
        if self.slope is None:
            raise ValueError("VoxelwiseAgeModel: call fit(volumes, ages) first")
        check_volumes(x, self.slope.shape[1], self.slope.shape[2])
        delta = (_ages(new_age, "new_age", n=len(x)) - _ages(age, n=len(x))).float()
        return x + self.slope.to(x.device) * delta.view(-1, 1, 1, 1, 1).to(x.device)


__all__ = ["VolumeMechanism", "Abduction", "DeepSCM", "VoxelwiseAgeModel"]
