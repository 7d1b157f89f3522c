"""The step function of the diffusion family (chapter 5): one optimizer step on ``L_simple``.

Bind the network, its schedule and optimizer with :func:`functools.partial` and hand the result
to :func:`~gen3d_lessons.training.fit`; ``ema`` comes from :func:`~gen3d_lessons.training.ema.ema_of`::

    fit(partial(diffusion_step, model=net, schedule=schedule, optimizer=opt, ema=ema), loader, max_steps=...)

A batch is ``x_0`` itself — volumes ``(B, C, D, H, W)`` or latent vectors ``(B, Z)`` —, a one-element
list holding it (as a ``DataLoader`` over a ``TensorDataset`` yields), or a dict holding it under
``key`` (``"image"`` by default, as :class:`~gen3d_lessons.data.datasets.VolumeDataset` serves volumes).

Beside the step, what chapter 5 does with it, each a function so that the page shows what it
measures and not the bookkeeping:

- :func:`denoiser_cost`: what one training step and one network call of a denoiser cost on this
  machine, and so what 10⁵ steps and a 1000-step chain would;
- :func:`load_or_train_vae`: the first stage of latent diffusion, chapter 4's saved VAE or one
  trained here with chapter 4's recipe;
- :func:`latent_probe`, :func:`probed_diffusion_step`, :func:`fit_latent_diffusion` and
  :func:`probe_table`: training a latent denoiser while watching its samples (FD and memorisation
  in the latent space) and keeping the moving average of a chosen step;
- :func:`sampler_sweep`: one trained network, several samplers (DDIM step counts, ancestral
  sampling), the same starting noise: the cost and quality of each.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from ..metrics.generative import memorisation, memorisation_passed
from ..models.diffusion import NoiseSchedule
from ..models.vae import VAE3D, VAEConfig
from ..profiles import step_cap
from .ema import ema_of
from .fit import History, fit, load_model
from .generative import train_vae


# 1. The step --------------------------------------------------------------------------------

def _x0(batch: Any, key: str, device: torch.device) -> torch.Tensor:
    if isinstance(batch, (list, tuple)) and len(batch) == 1:       # a DataLoader over a TensorDataset
        batch = batch[0]
    x0 = batch[key] if isinstance(batch, Mapping) and key in batch else batch
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"batch: expected x_0 as a tensor (B, ...) or a dict with key {key!r}, "
                         f"got {type(batch).__name__}")
    return x0.to(device)


def diffusion_step(batch: Any, i: int, *, model: nn.Module, schedule: NoiseSchedule,
                   optimizer: torch.optim.Optimizer, ema: AveragedModel | None = None, key: str = "image",
                   clip_grad: float | None = 1.0) -> dict[str, float]:
    """One step on ``L_simple = || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||²``.

    Ho et al. (2020) Eq. 14: the variational bound of Eq. 10 with its per-step weights dropped,
    which trains better. ``ema`` (:func:`~gen3d_lessons.training.ema.ema_of` of ``model``) is
    updated after the step; sample with ``ema.module``: an exponential moving average of the
    weights gives smoother samples than the last, noisy iterate. ``clip_grad`` caps the gradient norm.
    """
    device = next(model.parameters()).device
    # 1. data x_0, a random step t ~ U{0..T-1} and noise eps ~ N(0, I) per sample
    x0 = _x0(batch, key, device)
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=device)
    eps = torch.randn_like(x0)
    # 2. forward process in one jump: x_t ~ q(x_t | x_0)
    x_t = schedule.q_sample(x0, t, eps)
    # 3. L_simple: how well the network recovers the noise
    model.train()
    loss = F.mse_loss(model(x_t, t), eps)
    # 4. update (and the moving average of the weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    if ema is not None:
        ema.update_parameters(model)
    return {"loss": loss.item()}


# 2. What a denoiser costs ------------------------------------------------------------------

@dataclass
class DenoiserCost:
    """Seconds of one training step (a batch of ``batch`` volumes) and of one network call (``n``
    volumes) of a denoiser, measured on this machine, and what they add up to."""

    step_s: float                      # one diffusion_step
    call_s: float                      # one forward pass eps_theta(x_t, t) on n volumes
    n: int
    batch: int

    def train_hours(self, steps: float) -> float:
        """Hours for ``steps`` training steps."""
        return steps * self.step_s / 3600

    def sample_minutes(self, calls: float) -> float:
        """Minutes to sample ``n`` volumes with ``calls`` network calls (``T`` for ancestral sampling)."""
        return calls * self.call_s / 60

    def table(self):
        """The costs as a pandas DataFrame (seconds and hours): a step, 10⁵ steps, a call, a 1000-step
        DDPM chain and 50 DDIM steps for ``n`` volumes."""
        import pandas as pd

        seconds = [self.step_s, 1e5 * self.step_s, self.call_s, 1000 * self.call_s, 50 * self.call_s]
        index = [f"1 training step (batch {self.batch})", "100k training steps", f"1 network call ({self.n} volumes)",
                 f"DDPM sampling, {self.n} volumes", f"DDIM-50 sampling, {self.n} volumes"]
        cost = pd.DataFrame({"seconds": seconds}, index=index)
        return cost.assign(hours=cost.seconds / 3600)


def denoiser_cost(model: nn.Module, schedule: NoiseSchedule, n: int, edge: int = 32, batch: int = 4,
                  channels: int = 1, lr: float = 2e-4) -> DenoiserCost:
    """Time ``model`` (a pixel-space denoiser, on its device) at ``edge``³: one :func:`diffusion_step`
    of ``batch`` noise volumes after a warm-up step, and one call on ``n`` volumes.

    Why: a DDPM trains for 10⁵–10⁶ steps and samples with ``T`` network calls; two measured
    seconds say what that means on the machine at hand. ``model`` is trained for two steps by
    Adam (``lr``): pass a fresh copy, not the model you keep. The noise volumes are drawn from
    torch's global generator.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"n, batch: expected positive integers, got {n!r}, {batch!r}")
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.randn(n, channels, edge, edge, edge, device=device)               # (n, C, e, e, e)
    step = partial(diffusion_step, model=model, schedule=schedule, optimizer=optimizer)
    step(x[:batch], 0)                                                           # warm-up
    t0 = time.perf_counter()
    step(x[:batch], 1)
    step_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        model.eval()(x, torch.zeros(n, dtype=torch.long, device=device)).cpu()
        call_s = time.perf_counter() - t0
    return DenoiserCost(step_s=step_s, call_s=call_s, n=n, batch=min(batch, n))


# 3. Latent diffusion: the first stage, training with probes, samplers ------------------------

def load_or_train_vae(path: str | Path, cfg: VAEConfig, images: torch.Tensor, *, device: torch.device | str,
                      steps: int, batch: int, lr: float, budget_s: float | None = None,
                      desc: str = "VAE, chapter 4's recipe") -> tuple[VAE3D, bool]:
    """The autoencoder of latent diffusion: the VAE chapter 4 saved at ``path``, or one trained here.

    The file is used when it exists and holds a VAE of exactly ``cfg`` (a file of another profile
    does not count). Otherwise torch is seeded with 0, ``VAE3D(cfg)`` is built on ``device`` and
    trained on ``images`` (N, C, D, H, W) with chapter 4's recipe,
    :func:`~gen3d_lessons.training.generative.train_vae`. Returns the VAE, frozen and in eval
    mode, and whether it was loaded.
    """
    path = Path(path)
    vae = load_model(path, lambda c: VAE3D(VAEConfig(**c)), device) if path.is_file() else None
    loaded = vae is not None and vae.cfg == cfg
    if not loaded:                                     # missing, or saved by another profile
        torch.manual_seed(0)
        vae = VAE3D(cfg).to(device)
        train_vae(vae, images, steps=steps, batch=batch, lr=lr, budget_s=budget_s, desc=desc)
    return vae.eval().requires_grad_(False), loaded


PROBE_KEYS = ("FD", "latent_mem_ratio", "latent_mem_frac")


def latent_probe(schedule: NoiseSchedule, count: int, *, clip_x0: float | None, to_code: Callable[[torch.Tensor], torch.Tensor],
                 codes: tuple[torch.Tensor, torch.Tensor], fd: Callable[[torch.Tensor], float], steps: int = 50,
                 seed: int = 0) -> Callable[[nn.Module], dict[str, float]]:
    """A function ``probe(model) -> {"FD", "latent_mem_ratio", "latent_mem_frac"}`` that looks at a
    latent denoiser's samples during training.

    It draws ``count`` latents with DDIM (``steps``, from the same noise, ``seed``, at every call,
    so that a curve shows the model changing and not the draw) and returns ``fd(z)`` (e.g. FD of
    the decoded volumes) and :func:`~gen3d_lessons.metrics.generative.memorisation` *in the latent
    space*: the samples brought back to the autoencoder's code by ``to_code`` (undoing the
    standardisation), against ``codes = (train, heldout)``, the codes (N, Z) of the training and
    held-out volumes. With few training codes, a denoiser trained long enough returns them:
    ``mem_ratio`` falls from about 1 towards 0.
    """
    train, heldout = codes
    if train.ndim != 2 or heldout.ndim != 2 or train.shape[1] != heldout.shape[1]:
        raise ValueError(f"codes: expected (train, heldout) codes (N, Z) and (M, Z), got shapes "
                         f"{tuple(train.shape)}, {tuple(heldout.shape)}")
    shape = (int(count), train.shape[1])

    def probe(model: nn.Module) -> dict[str, float]:
        z = schedule.ddim_sample(model, shape, steps=steps, generator=torch.Generator().manual_seed(seed), clip_x0=clip_x0)
        mem = memorisation(to_code(z).cpu(), train.cpu(), heldout.cpu())
        return {"FD": fd(z), "latent_mem_ratio": mem["mem_ratio"], "latent_mem_frac": mem["mem_frac"]}

    return probe


def probed_diffusion_step(batch: Any, i: int, *, model: nn.Module, schedule: NoiseSchedule,
                          optimizer: torch.optim.Optimizer, ema: AveragedModel,
                          probe: Callable[[nn.Module], Mapping[str, float]], every: int, at: Sequence[int] = (),
                          keep_at: int | None = None, kept: dict | None = None) -> dict[str, float]:
    """:func:`diffusion_step`, and a look at the samples of the moving average.

    1. one step on ``L_simple`` (which updates ``ema``); 2. after every ``every``-th step and after
    the steps counted in ``at`` (1, 2, ...), ``probe(ema.module)`` joins the step's values;
    3. after step ``keep_at``, a copy of the moving average goes to ``kept["model"]``: the model a
    chapter keeps, chosen by its step count, while training goes on to show what more steps do.
    """
    if keep_at is not None and kept is None:
        raise ValueError("kept: give a dict to receive the model kept at step keep_at")
    # 1. the step
    out = diffusion_step(batch, i, model=model, schedule=schedule, optimizer=optimizer, ema=ema)
    # 2. the probe
    if (i + 1) % every == 0 or i + 1 in at:
        out |= probe(ema.module.eval())
    # 3. the model we keep
    if keep_at is not None and i + 1 == keep_at:
        kept["model"] = copy.deepcopy(ema.module).eval()
    return out


def fit_latent_diffusion(model: nn.Module, schedule: NoiseSchedule, latents: torch.Tensor, *,
                         probe: Callable[[nn.Module], Mapping[str, float]], every: int, keep_at: int, max_steps: int,
                         budget_s: float | None = None, batch: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
                         ema_decay: float = 0.995, seed: int = 0, desc: str = "latent DDPM") -> tuple[History, nn.Module]:
    """Train a latent denoiser ``model`` on ``latents`` (N, Z) for ``max_steps`` steps; keep the
    moving average of its weights at step ``keep_at``.

    The recipe: AdamW (``lr``, ``weight_decay``), a moving average of the weights (``ema_decay``,
    :func:`~gen3d_lessons.training.ema.ema_of`), shuffled batches of ``min(batch, N)`` latents (a
    ``DataLoader`` seeded with ``seed``), and :func:`probed_diffusion_step`, which probes every
    ``every`` steps, at ``keep_at`` and at the last step. Both step counts are capped in a dry
    run. Returns the :class:`~gen3d_lessons.training.History` (``loss`` and the probe's keys)
    and the kept model, in eval mode.
    """
    if isinstance(keep_at, bool) or not isinstance(keep_at, int) or not 1 <= keep_at <= max_steps:
        raise ValueError(f"keep_at: expected a step in 1 .. max_steps = {max_steps}, got {keep_at!r}")
    if latents.ndim != 2:
        raise ValueError(f"latents: expected codes (N, Z), got shape {tuple(latents.shape)}")
    ema = ema_of(model, decay=ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(latents), batch_size=min(batch, len(latents)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    keep_at, last, kept = step_cap(keep_at), step_cap(max_steps), {}
    step = partial(probed_diffusion_step, model=model, schedule=schedule, optimizer=optimizer, ema=ema, probe=probe,
                   every=every, at=(keep_at, last), keep_at=keep_at, kept=kept)
    history = fit(step, loader, max_steps=max_steps, budget_s=budget_s, desc=desc)
    return history, kept["model"]


def probe_table(history: History, keep_at: int, keys: Sequence[str] = PROBE_KEYS):
    """The probes of :func:`fit_latent_diffusion` as a pandas DataFrame indexed by step: the first
    probed step, ``keep_at`` and the last step, with the memorisation check of each
    (``latent check``, :func:`~gen3d_lessons.metrics.generative.memorisation_passed`)."""
    import pandas as pd

    missing = [k for k in keys if k not in history.values]
    if missing:
        raise ValueError(f"history: no {missing}; recorded: {', '.join(history.values)}")
    probes = pd.DataFrame({k: history.values[k] for k in keys},
                          index=pd.RangeIndex(1, history.steps + 1, name="step")).dropna()
    if probes.empty or keep_at not in probes.index or history.steps not in probes.index:
        raise ValueError(f"history: no probe at step {keep_at} and at the last step {history.steps}")
    probes["latent check"] = [memorisation_passed(dict(mem_ratio=r, mem_frac=f))
                              for r, f in zip(probes["latent_mem_ratio"], probes["latent_mem_frac"])]
    return probes.loc[sorted({probes.index[0], keep_at, history.steps})]


def sampler_sweep(schedule: NoiseSchedule, model: nn.Module, shape: Sequence[int],
                  samplers: Mapping[str, Mapping[str, Any] | None], *, score: Callable[[torch.Tensor], Any],
                  clip_x0: float | None = None, noise_seed: int = 1, seed: int = 2):
    """One trained denoiser, several samplers, the same starting noise: what each costs and gives.

    ``samplers`` maps a name to the keyword arguments of :meth:`NoiseSchedule.ddim_sample`
    (``steps``, ``eta``), or to ``None`` for ancestral sampling on the whole chain
    (:meth:`NoiseSchedule.sample`, ``T`` network calls). Every sampler starts from one
    ``x_T ~ N(0, I)`` of ``shape`` (drawn with ``noise_seed``), with a fresh generator seeded with
    ``seed`` for the noise it adds on the way, so that the samplers differ and the draw does not.
    ``score(z)`` returns one number per draw (e.g. the FD of each set of ``n`` decoded samples).

    Returns the table (a pandas DataFrame, one row per sampler: ``network calls``, ``seconds``,
    ``FD`` and ``FD (std)``, the mean and spread of the scores), the samples ``{name: z}`` and the
    scores ``{name: array}``.
    """
    import pandas as pd

    if not isinstance(samplers, Mapping) or not samplers:
        raise ValueError("samplers: expected a non-empty dict {name: ddim_sample keywords or None}")
    device = next(model.parameters()).device
    x_T = torch.randn(tuple(int(s) for s in shape), generator=torch.Generator().manual_seed(noise_seed)).to(device)
    rows, samples, scores = {}, {}, {}
    for name, kw in samplers.items():
        g, t0 = torch.Generator().manual_seed(seed), time.perf_counter()
        z = (schedule.sample(model, x_T.shape, g, clip_x0=clip_x0, x_T=x_T) if kw is None else
             schedule.ddim_sample(model, x_T.shape, generator=g, clip_x0=clip_x0, x_T=x_T, **kw))
        sec, samples[name] = time.perf_counter() - t0, z
        scores[name] = fds = np.asarray(score(z))
        rows[name] = {"network calls": kw["steps"] if kw else schedule.T, "seconds": sec, "FD": fds.mean(), "FD (std)": fds.std()}
    return pd.DataFrame(rows).T, samples, scores


__all__ = ["diffusion_step", "DenoiserCost", "denoiser_cost", "load_or_train_vae", "PROBE_KEYS", "latent_probe",
           "probed_diffusion_step", "fit_latent_diffusion", "probe_table", "sampler_sweep"]
