"""Diffusion (chapter 5): the schedule, the forward process, DDPM and DDIM sampling, the denoisers,
the training step. Tiny sizes: latent vectors and 8³ volumes."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import pytest
import torch

from gen3d_lessons.models.diffusion import (LatentDenoiser, LatentDenoiserConfig, NoiseSchedule,
                                            PixelDenoiserConfig, ScheduleConfig, extract, make_betas,
                                            pixel_denoiser, timestep_embedding)
from gen3d_lessons.training import load_model, save_model
from gen3d_lessons.training.diffusion import diffusion_step
from gen3d_lessons.training.ema import ema_of


@pytest.fixture
def sched() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(timesteps=200, beta_start=1e-4, beta_end=0.1))


def oracle(sched: NoiseSchedule, x0: torch.Tensor):
    """A perfect noise predictor for a single known x0: the eps implied by x_t."""
    def eps(x_t, t):
        return (x_t - extract(sched.sqrt_alpha_bar, t, x_t.shape) * x0) / extract(sched.sqrt_one_minus_alpha_bar, t, x_t.shape)
    return eps


def gaussian_optimum(sched: NoiseSchedule, std: float):
    """The exact E[eps | x_t] when x0 ~ N(0, std² I): x_t ~ N(0, (ab std² + 1 - ab) I)."""
    def eps(x_t, t):
        ab = extract(sched.alpha_bar, t, x_t.shape)
        return (1 - ab).sqrt() * x_t / (ab * std ** 2 + 1 - ab)
    return eps


# 1. The schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_constants(kind):
    s = NoiseSchedule(ScheduleConfig(kind=kind))
    assert s.T == 1000 and s.alpha_bar.shape == (1000,)
    assert (s.alpha_bar.diff() < 0).all() and s.alpha_bar[0] > 0.99 and s.alpha_bar[-1] < 1e-3
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(s.alphas.double(), 0).float())
    assert (s.posterior_variance[1:] <= s.betas[1:]).all() and s.posterior_variance[0] == 0
    assert "alpha_bar" in s.state_dict() and not list(s.parameters())


def test_linear_betas_follow_ho_et_al():
    b = make_betas(ScheduleConfig())
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02) and b.dtype == torch.float64


@pytest.mark.parametrize("kw", [dict(timesteps=0), dict(timesteps=1.5), dict(kind="quadratic"),
                                dict(beta_start=0.1, beta_end=0.01), dict(beta_end=1.0)])
def test_bad_schedule_config(kw):
    with pytest.raises(ValueError):
        ScheduleConfig(**kw)


@pytest.mark.parametrize("shape", [(4, 3), (4, 1, 2, 2, 2)])
def test_extract_broadcasts_to_any_rank(shape):
    a = torch.arange(10.0)
    t = torch.tensor([0, 3, 9, 1])
    out = extract(a, t, shape)
    assert out.shape == (4,) + (1,) * (len(shape) - 1)
    assert out.flatten().tolist() == [0.0, 3.0, 9.0, 1.0]


# 2. The forward process -----------------------------------------------------------------------

def test_q_sample_formula_and_limits():
    s = NoiseSchedule()
    x0 = torch.randn(3, 1, 8, 8, 8)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = s.q_sample(x0, t, eps)
    for i in range(3):
        ab = s.alpha_bar[t[i]]
        torch.testing.assert_close(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i])
    assert (x_t[0] - x0[0]).abs().max() < 0.05                  # t = 0: almost clean
    big = s.q_sample(torch.full((2000, 4), 3.0), 999)            # t = T-1: almost N(0, I) whatever x0
    assert big.mean().abs() < 0.1 and (big.std() - 1).abs() < 0.05


@pytest.mark.parametrize("bad, match", [
    (dict(x0=torch.full((2, 3), float("nan"))), "NaN"),
    (dict(x0=torch.ones(2, 3, dtype=torch.long)), "floating"),
    (dict(x0=torch.ones(3)), "at least 2"),
    (dict(t=torch.tensor([0, 200])), "0 .. 199"),
    (dict(t=torch.tensor([-1, 0])), "0 .. 199"),
    (dict(t=torch.tensor([0, 1, 2])), r"shape \(2,\)"),
    (dict(t=torch.tensor([0.5, 1.0])), "integer"),
    (dict(eps=torch.ones(2, 4)), "eps"),
])
def test_q_sample_rejects_bad_input(sched, bad, match):
    args = dict(x0=torch.ones(2, 3), t=torch.tensor([0, 1]), eps=None) | bad
    with pytest.raises(ValueError, match=match):
        sched.q_sample(**args)


# 3. Sampling ----------------------------------------------------------------------------------

def test_perfect_noise_predictor_reconstructs_x0(sched):
    x0 = torch.randn(2, 1, 8, 8, 8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sched.ddim_sample(oracle(sched, x0), x0.shape, steps=10, generator=g), x0)
    torch.testing.assert_close(sched.sample(oracle(sched, x0), x0.shape, generator=g), x0)
    eta1 = sched.ddim_sample(oracle(sched, x0), x0.shape, steps=20, eta=1.0, generator=g)
    torch.testing.assert_close(eta1, x0)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_optimal_denoiser_samples_the_data_distribution(method):
    """With the exact E[eps | x_t] for Gaussian data, both samplers (every step) return the data's std."""
    sched, std = NoiseSchedule(ScheduleConfig(timesteps=300, beta_end=0.06)), 0.3
    g = torch.Generator().manual_seed(0)
    model = gaussian_optimum(sched, std)
    x = (sched.sample(model, (4000, 4), generator=g) if method == "ddpm"
         else sched.ddim_sample(model, (4000, 4), steps=sched.T, generator=g))
    assert x.mean().abs() < 0.02 and x.std().item() == pytest.approx(std, rel=0.05)


def test_few_ddim_steps_shrink_samples_towards_the_mean():
    """Deterministic DDIM with coarse steps jumps through posterior means: the spread shrinks (1 step: the mean)."""
    sched, std = NoiseSchedule(ScheduleConfig(timesteps=300, beta_end=0.06)), 0.3
    model = gaussian_optimum(sched, std)
    x_T = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    spread = [sched.ddim_sample(model, x_T.shape, steps=k, x_T=x_T).std().item() for k in (1, 10, 50, 300)]
    assert spread[0] < 0.01 and spread == sorted(spread) and spread[-1] == pytest.approx(std, rel=0.05)


def test_sampling_is_repeatable_with_a_generator(sched):
    model = gaussian_optimum(sched, 0.5)
    a = sched.ddim_sample(model, (3, 5), steps=7, eta=0.5, generator=torch.Generator().manual_seed(1))
    b = sched.ddim_sample(model, (3, 5), steps=7, eta=0.5, generator=torch.Generator().manual_seed(1))
    c = sched.sample(model, (3, 5), generator=torch.Generator().manual_seed(2))
    d = sched.sample(model, (3, 5), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)


def test_ddim_with_fixed_x_T_is_deterministic(sched):
    model = gaussian_optimum(sched, 0.5)
    x_T = torch.randn(3, 5)
    a = sched.ddim_sample(model, x_T.shape, steps=10, x_T=x_T)
    b = sched.ddim_sample(model, x_T.shape, steps=10, x_T=x_T.clone())
    torch.testing.assert_close(a, b)
    c = sched.sample(model, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(0))
    d = sched.sample(model, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c, d)


def test_ddim_timesteps(sched):
    taus = sched.ddim_timesteps(5)
    assert taus[0] == sched.T - 1 and taus[-1] == 0 and taus == sorted(taus, reverse=True) and len(taus) == 5
    assert sched.ddim_timesteps(1) == [sched.T - 1]
    assert sched.ddim_timesteps(sched.T) == list(range(sched.T - 1, -1, -1))
    for bad in (0, sched.T + 1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            sched.ddim_timesteps(bad)


def test_sampling_rejects_bad_models_and_shapes(sched):
    with pytest.raises(ValueError, match="eps_hat shaped like"):
        sched.p_sample(lambda x, t: x[:, :1], torch.randn(2, 3), 5)
    with pytest.raises(ValueError, match="shape"):
        sched.sample(lambda x, t: x, (4,))
    with pytest.raises(ValueError, match="x_T"):
        sched.ddim_sample(lambda x, t: x, (2, 3), steps=5, x_T=torch.randn(2, 4))
    with pytest.raises(ValueError, match="t_prev"):
        sched.ddim_step(lambda x, t: x, torch.randn(2, 3), 5, 7)
    with pytest.raises(ValueError, match="eta"):
        sched.ddim_step(lambda x, t: x, torch.randn(2, 3), 5, 2, eta=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        sched.p_sample(lambda x, t: x, torch.full((2, 3), float("inf")), 5)


# 4. The networks ------------------------------------------------------------------------------

def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 10, 999]), 7)
    assert e.shape == (3, 7) and torch.isfinite(e).all()
    assert e[0, :3].tolist() == [1.0, 1.0, 1.0]                  # cos(0) = 1


def test_latent_denoiser_shapes_gradients_and_errors():
    cfg = LatentDenoiserConfig(latent_dim=6, hidden=16, depth=2, time_dim=8)
    net = LatentDenoiser(cfg)
    z, t = torch.randn(5, 6, requires_grad=True), torch.randint(0, 1000, (5,))
    out = net(z, t)
    assert out.shape == (5, 6) and (out == 0).all()              # zero-initialised output layer
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match=r"z_t: expected shape \(B, 6\)"):
        net(torch.randn(5, 7), t)
    with pytest.raises(ValueError, match="t: expected shape"):
        net(torch.randn(5, 6), t[:3])
    with pytest.raises(ValueError):
        LatentDenoiserConfig(hidden=0)


def test_pixel_denoiser_on_a_tiny_volume():
    net = pixel_denoiser(PixelDenoiserConfig(channels=(8, 8), attention_levels=(False, False)))
    x = torch.randn(2, 1, 8, 8, 8)
    out = net(x, torch.tensor([3, 500]))
    assert out.shape == x.shape
    (out - torch.randn_like(out)).pow(2).mean().backward()     # MONAI zero-initialises the last conv
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="norm_num_groups"):
        PixelDenoiserConfig(channels=(12, 24), attention_levels=(False, False))
    with pytest.raises(ValueError, match="attention"):
        PixelDenoiserConfig(channels=(8, 16), attention_levels=(False,))


def test_save_and_load_latent_denoiser(tmp_path):
    cfg = LatentDenoiserConfig(latent_dim=4, hidden=8, depth=1, time_dim=4)
    net = LatentDenoiser(cfg)
    torch.nn.init.normal_(net.out[-1].weight)
    path = save_model(tmp_path / "ldm.pt", net, cfg)
    back = load_model(path, lambda c: LatentDenoiser(LatentDenoiserConfig(**c)))
    assert asdict(back.cfg) == asdict(cfg)
    z, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    torch.testing.assert_close(back(z, t), net.eval()(z, t))


# 5. The training step -------------------------------------------------------------------------

def test_diffusion_step_learns_a_gaussian(sched):
    torch.manual_seed(0)
    net = LatentDenoiser(LatentDenoiserConfig(latent_dim=4, hidden=32, depth=1, time_dim=16))
    ema = ema_of(net, 0.9)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    before = [p.clone() for p in ema.module.parameters()]
    step = partial(diffusion_step, model=net, schedule=sched, optimizer=opt, ema=ema)
    losses = [step({"image": 0.3 * torch.randn(128, 4)}, i)["loss"] for i in range(120)]
    assert losses[0] > 0.8 and sum(losses[-20:]) / 20 < 0.6   # eps_hat = 0 at first: E||eps||²/dim = 1
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    # clip_x0: x0_hat divides the noise estimate's error by sqrt(alpha_bar_t), huge at large t
    x = sched.sample(ema.module.eval(), (1000, 4), generator=torch.Generator().manual_seed(0), clip_x0=1.5)
    assert x.std().item() == pytest.approx(0.3, abs=0.1)


def test_diffusion_step_takes_a_tensor_or_a_dict_and_rejects_others(sched):
    net = LatentDenoiser(LatentDenoiserConfig(latent_dim=3, hidden=8, depth=1, time_dim=4))
    opt = torch.optim.SGD(net.parameters(), 0.01)
    step = partial(diffusion_step, model=net, schedule=sched, optimizer=opt)
    assert set(step(torch.randn(4, 3), 0)) == {"loss"}
    assert step({"z": torch.randn(4, 3)}, 1, key="z")["loss"] > 0
    assert step([torch.randn(4, 3)], 2)["loss"] > 0
    with pytest.raises(ValueError, match="batch"):
        step([1, 2, 3], 3)
    with pytest.raises(ValueError, match="NaN"):
        step(torch.full((4, 3), float("nan")), 4)
    with pytest.raises(ValueError, match="decay"):
        ema_of(net, 1.5)


# 6. What chapter 5 does with the step: cost, first stage, probes, samplers, FD over draws ------

from types import SimpleNamespace

from gen3d_lessons.models.vae import VAE3D, VAEConfig
from gen3d_lessons.tasks import yardstick
from gen3d_lessons.training.diffusion import (PROBE_KEYS, DenoiserCost, denoiser_cost, fit_latent_diffusion,
                                              latent_probe, load_or_train_vae, probe_table, probed_diffusion_step,
                                              sampler_sweep)
from gen3d_lessons.viz import quality_vs_cost


def tiny_latent_net(z=3, seed=0):
    torch.manual_seed(seed)
    return LatentDenoiser(LatentDenoiserConfig(latent_dim=z, hidden=8, depth=1, time_dim=4))


def test_denoiser_cost_times_a_step_and_a_call(sched):
    net = pixel_denoiser(PixelDenoiserConfig(channels=(8, 8), attention_levels=(False, False)))
    cost = denoiser_cost(net, sched, n=3, edge=8, batch=2)
    assert isinstance(cost, DenoiserCost) and cost.step_s > 0 and cost.call_s > 0 and (cost.n, cost.batch) == (3, 2)
    assert cost.train_hours(3600) == pytest.approx(cost.step_s) and cost.sample_minutes(60) == pytest.approx(cost.call_s)
    table = cost.table()
    assert list(table.columns) == ["seconds", "hours"] and len(table) == 5
    assert table.seconds.iloc[1] == pytest.approx(1e5 * cost.step_s) and table.hours.iloc[0] == pytest.approx(cost.step_s / 3600)
    with pytest.raises(ValueError, match="n, batch"):
        denoiser_cost(net, sched, n=0, edge=8)


def test_load_or_train_vae_trains_when_missing_and_loads_a_matching_file(tmp_path):
    cfg = VAEConfig(size=8, channels=(8,), latent_dim=2)
    x = torch.rand(4, 1, 8, 8, 8)
    kw = dict(device="cpu", steps=2, batch=2, lr=1e-3)
    vae, loaded = load_or_train_vae(tmp_path / "missing.pt", cfg, x, **kw)
    assert not loaded and not vae.training and not any(p.requires_grad for p in vae.parameters())
    torch.manual_seed(0)                                         # what it did: chapter 4's recipe from seed 0
    again = VAE3D(cfg)
    from gen3d_lessons.training.generative import train_vae
    train_vae(again, x, steps=2, batch=2, lr=1e-3)
    for p, q in zip(vae.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    path = save_model(tmp_path / "vae.pt", vae, cfg)
    back, loaded = load_or_train_vae(path, cfg, x, **kw)
    assert loaded and torch.equal(back.decode(torch.zeros(1, 2)), vae.decode(torch.zeros(1, 2)))
    other, loaded = load_or_train_vae(path, VAEConfig(size=8, channels=(8,), latent_dim=3), x, **kw)   # another profile's file
    assert not loaded and other.cfg.latent_dim == 3


def test_latent_probe_measures_fd_and_memorisation_of_fixed_draws(sched):
    train, heldout = torch.randn(20, 3), torch.randn(6, 3)
    probe = latent_probe(sched, 8, clip_x0=3.0, to_code=lambda z: z * 2, codes=(train, heldout), fd=lambda z: float(z.std()))
    a, b = probe(tiny_latent_net()), probe(tiny_latent_net())
    assert set(a) == set(PROBE_KEYS) and a == b                  # the same noise at every call
    copier = lambda z, t: (z - extract(sched.sqrt_alpha_bar, t, z.shape) * train[:len(z)] / 2) / extract(
        sched.sqrt_one_minus_alpha_bar, t, z.shape)              # a perfect predictor of the training codes
    assert probe(copier)["latent_mem_ratio"] < 0.05 < a["latent_mem_ratio"]
    with pytest.raises(ValueError, match="codes"):
        latent_probe(sched, 8, clip_x0=None, to_code=lambda z: z, codes=(train, heldout[:, :2]), fd=lambda z: 0.0)


def test_probed_step_probes_on_schedule_and_keeps_a_copy(sched):
    net = tiny_latent_net()
    ema, opt, kept, seen = ema_of(net, 0.9), torch.optim.SGD(net.parameters(), 0.01), {}, []
    probe = lambda m: seen.append(m) or {"FD": 1.0}
    step = partial(probed_diffusion_step, model=net, schedule=sched, optimizer=opt, ema=ema, probe=probe, every=3, at=(5,),
                   keep_at=4, kept=kept)
    outs = [step(torch.randn(4, 3), i) for i in range(6)]
    assert [("FD" in o) for o in outs] == [False, False, True, False, True, True]     # after steps 3, 5 and 6
    assert all(m is ema.module for m in seen) and kept["model"] is not ema.module and not kept["model"].training
    with pytest.raises(ValueError, match="kept"):
        probed_diffusion_step(torch.randn(4, 3), 0, model=net, schedule=sched, optimizer=opt, ema=ema, probe=probe, every=3,
                              keep_at=1)


def test_fit_latent_diffusion_keeps_the_chosen_step_and_tables_the_probes(sched):
    latents = torch.randn(16, 3)
    probe = lambda m: {"FD": float(sum(p.detach().abs().sum() for p in m.parameters())), "latent_mem_ratio": 1.0, "latent_mem_frac": 0.0}
    history, kept = fit_latent_diffusion(tiny_latent_net(), sched, latents, probe=probe, every=4, keep_at=3, max_steps=10, batch=8)
    assert history.steps == 10 and not kept.training
    table = probe_table(history, 3)
    assert list(table.index) == [3, 10] and table["latent check"].all()             # first probe = kept step; the last
    assert table.loc[3, "FD"] == pytest.approx(float(sum(p.detach().abs().sum() for p in kept.parameters())), rel=1e-5)
    again, _ = fit_latent_diffusion(tiny_latent_net(), sched, latents, probe=probe, every=4, keep_at=3, max_steps=10, batch=8)
    assert again.values["loss"] == history.values["loss"]                          # seeded batches
    with pytest.raises(ValueError, match="keep_at"):
        fit_latent_diffusion(tiny_latent_net(), sched, latents, probe=probe, every=4, keep_at=11, max_steps=10)
    with pytest.raises(ValueError, match="no probe"):
        probe_table(history, 5)


def test_sampler_sweep_scores_every_sampler_from_the_same_noise(sched):
    net = tiny_latent_net()
    samplers = {"DDIM-5": dict(steps=5), "DDIM-20": dict(steps=20), "ancestral": dict(steps=20, eta=1.0), "DDPM": None}
    table, z, scores = sampler_sweep(sched, net, (12, 3), samplers, score=lambda z: z.std(1).numpy())
    assert list(table.index) == list(samplers) and list(table.columns) == ["network calls", "seconds", "FD", "FD (std)"]
    assert table["network calls"].tolist() == [5, 20, 20, sched.T]
    assert z["DDIM-5"].shape == (12, 3) and scores["DDPM"].shape == (12,)
    assert table.loc["DDPM", "FD"] == pytest.approx(scores["DDPM"].mean())
    again, z2, _ = sampler_sweep(sched, net, (12, 3), samplers, score=lambda z: z.std(1).numpy())
    assert all(torch.equal(z[k], z2[k]) for k in samplers)                          # the same x_T and noise
    fig = quality_vs_cost(table, {"DDIM": ["DDIM-5", "DDIM-20"]}, {"baseline": 1.0})
    assert len(fig.axes[0].containers) == 3 and len(fig.axes[0].lines) >= 1      # one line, two markers, the baseline
    with pytest.raises(ValueError, match="connect"):
        quality_vs_cost(table, {"DDIM": ["DDIM-7"]})
    with pytest.raises(ValueError, match="missing"):
        quality_vs_cost({"a": {"FD": 1.0}})


def test_fd_of_draws_and_draws_table():
    enc = SimpleNamespace(config=SimpleNamespace(size=4), features=lambda x: x.flatten(1)[:, :3].double().numpy())
    torch.manual_seed(0)
    ref = enc.features(torch.rand(30, 1, 4, 4, 4))
    draws = [torch.rand(10, 1, 8, 8, 8), torch.rand(10, 1, 4, 4, 4) + 1]               # any size; the second far off
    fds = yardstick.fd_of_draws(draws, enc, ref)
    assert fds.shape == (2,) and fds[1] > fds[0] >= 0
    table = yardstick.draws_table({"mean + noise": fds, "model": fds / 2})
    assert list(table.columns) == ["FD", "FD (std)", "/ mean + noise"]
    assert table.loc["model", "/ mean + noise"] == pytest.approx(0.5) and table.loc["model", "FD"] == pytest.approx(fds.mean() / 2)
    with pytest.raises(ValueError, match="baseline"):
        yardstick.draws_table({"model": fds})
    with pytest.raises(ValueError, match="at least one"):
        yardstick.fd_of_draws([], enc, ref)
