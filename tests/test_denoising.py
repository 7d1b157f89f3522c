"""Chapter 11's library code: the residual encoder–decoder, the WGAN critic, the step functions,
denoise() and its checks, the classical baselines and the scores."""

from functools import partial

import numpy as np
import pytest
import torch

from gen3d_lessons.baselines import denoising as bd
from gen3d_lessons.metrics import scores
from gen3d_lessons.models.denoising import Critic3D, CriticConfig, RED3D, REDConfig, denoise
from gen3d_lessons.training import fit, load_model, save_model
from gen3d_lessons.training.denoising import augment, mse_step, red_wgan_step

SMALL = REDConfig(channels=(4, 8))
S = 8                                                        # voxels per side in most tests


def phantom(size=16, noise=0.1, seed=0):
    """(clean, noisy, mask) float64 volumes: a bright ball in a dim box, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    r = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    clean = np.where(r < size / 4, 0.9, np.where(r < size / 2.2, 0.4, 0.0))
    return clean, clean + noise * rng.normal(size=clean.shape), r < size / 2.2


def trained_on_zero_head(net):
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
    return net


# models ----------------------------------------------------------------------------------------

def test_red_starts_as_identity_and_keeps_shapes():
    x = torch.rand(2, 1, S, S, S)
    net = RED3D(SMALL)
    assert torch.equal(net(x), x)                            # zero-initialised head: x + 0
    assert net.multiple == 2
    for cfg in (REDConfig(channels=(4, 8, 16), norm="none"), REDConfig(channels=(4, 8), unshuffle=2, norm="batch"),
                REDConfig(in_channels=2, out_channels=1, channels=(4, 8), norm="instance")):
        net = RED3D(cfg)
        x = torch.rand(2, cfg.in_channels, 16, 16, 8)
        assert net(x).shape == (2, cfg.n_out, 16, 16, 8)


def test_red_dae_variant_is_not_residual():
    net = RED3D(REDConfig(channels=(4, 8), shortcuts=False, residual=False))
    x = torch.rand(1, 1, S, S, S)
    assert torch.equal(net(x), torch.zeros_like(x))           # f(x) only, no x + ..., and f starts at 0


def test_red_errors():
    net = RED3D(REDConfig(channels=(4, 8, 16)))
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.rand(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        net(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="out_channels"):
        REDConfig(in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="norm"):
        REDConfig(norm="layer")
    with pytest.raises(ValueError, match="positive"):
        REDConfig(channels=(4, 0))


def test_gradients_reach_every_parameter():
    net = trained_on_zero_head(RED3D(SMALL))
    critic = Critic3D(CriticConfig(channels=(4, 8)))
    loss = ((net(torch.rand(2, 1, S, S, S)) - 0.5) ** 2).mean() + critic(torch.rand(2, 1, S, S, S)).sum()
    loss.backward()
    for name, p in [*net.named_parameters(), *critic.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert critic(torch.rand(3, 1, 16, 16, 16)).shape == (3,)


def test_save_load_round_trip(tmp_path):
    net = trained_on_zero_head(RED3D(SMALL)).eval()
    path = save_model(tmp_path / "red.pt", net, net.cfg)
    back = load_model(path, lambda c: RED3D(REDConfig(**c)))
    x = torch.rand(1, 1, S, S, S)
    assert back.cfg == net.cfg and torch.allclose(back(x), net(x))


# steps ----------------------------------------------------------------------------------------

def pairs(n=4, size=S):
    clean, _, mask = phantom(size)
    y = torch.as_tensor(clean, dtype=torch.float32)[None].expand(n, 1, size, size, size)
    x = y + 0.1 * torch.randn_like(y)
    return {"lowdose": x, "image": y.clone(), "label": torch.as_tensor(mask)[None].expand(n, 1, size, size, size).long()}


def test_mse_step_learns():
    torch.manual_seed(0)
    net = RED3D(SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    history = fit(partial(mse_step, model=net, optimizer=opt, scheduler=sched), [pairs()], max_steps=40)
    assert history.values["mse"][-1] < 0.5 * history.values["mse"][0]
    assert sched.last_epoch == 40


def test_red_wgan_step_warmup_and_updates():
    torch.manual_seed(0)
    g, c = RED3D(SMALL), Critic3D(CriticConfig(channels=(4, 8)))
    opt_g, opt_c = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(c.parameters(), 1e-3)
    step = partial(red_wgan_step, generator=g, discriminator=c, opt_g=opt_g, opt_d=opt_c, critic_warmup=2, n_critic=2)
    before = [p.clone() for p in g.parameters()]
    out0, out1 = step(pairs(), 0), step(pairs(), 1)
    assert "mse" not in out0 and "mse" not in out1 and "gp" in out0         # critic only
    assert all(torch.equal(a, b) for a, b in zip(before, g.parameters()))
    assert "mse" in step(pairs(), 2) and "mse" not in step(pairs(), 3)      # then every 2nd step
    assert not all(torch.equal(a, b) for a, b in zip(before, g.parameters()))
    assert all(p.requires_grad for p in c.parameters())


def test_augment_crops_and_flips_pairs_alike():
    torch.manual_seed(0)
    x = torch.arange(S ** 3, dtype=torch.float32).view(1, S, S, S)
    item = {"lowdose": x, "image": x + 1, "label": x.long(), "age": torch.tensor(50.0)}
    for _ in range(5):
        out = augment(item, patch=4)
        assert out["lowdose"].shape == (1, 4, 4, 4) and torch.equal(out["image"], out["lowdose"] + 1)
        assert torch.equal(out["label"], out["lowdose"].long()) and out["age"] == 50
    assert augment(item)["image"].shape == (1, S, S, S)
    with pytest.raises(ValueError, match="patch"):
        augment(item, patch=S + 1)


# denoise(): the public helper ------------------------------------------------------------------

def test_denoise_any_edge_and_flips():
    net = trained_on_zero_head(RED3D(REDConfig(channels=(4, 8, 16))))
    x = np.random.default_rng(0).random((9, 10, 7)).astype(np.float32)
    y = denoise(net, x)
    assert y.shape == x.shape and y.dtype == np.float32
    with torch.no_grad():
        direct = net(torch.as_tensor(np.pad(x, [(0, 3), (0, 2), (0, 1)], mode="edge"))[None, None])[0, 0, :9, :10, :7]
    assert np.allclose(y, direct.numpy(), atol=1e-5)
    assert denoise(net, torch.as_tensor(x, dtype=torch.float64), flips=True).shape == x.shape
    assert np.allclose(denoise(RED3D(SMALL), x, flips=True), x, atol=1e-6)   # identity stays identity
    two = RED3D(REDConfig(in_channels=2, out_channels=1, channels=(4, 8)))
    assert denoise(two, np.stack([x[:8, :8, :6]] * 2)).shape == (8, 8, 6)


@pytest.mark.parametrize("volume, match", [
    (np.zeros((8, 8), np.float32), "2D image"),
    (np.zeros((1, 1, 8, 8, 8), np.float32), "one volume at a time"),
    (np.zeros((2, 8, 8, 8), np.float32), r"\(D, H, W\)"),
    (np.zeros((8, 8, 1), np.float32), "at least 2 voxels"),
    (np.zeros((8, 8, 8), np.int16), "dtype int16"),
    (np.zeros((8, 8, 8), bool), "dtype bool"),
    (torch.zeros(8, 8, 8, dtype=torch.int64), "dtype torch.int64"),
    (np.zeros((8, 8, 8), np.complex64), "dtype complex64"),
    (np.full((8, 8, 8), 812.0, np.float32), "trained on \\[0, 1\\]"),
    ("brain.nii.gz", "dtype <U12"),
])
def test_denoise_bad_inputs(volume, match):
    with pytest.raises(ValueError, match=match):
        denoise(RED3D(SMALL), volume)


def test_denoise_nan_and_bad_model():
    x = np.zeros((8, 8, 8), np.float32)
    x[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or infinite values \(the first at index \(0, 1, 2, 3\)\)"):
        denoise(RED3D(SMALL), x)
    with pytest.raises(ValueError, match="RED3D"):
        denoise(torch.nn.Conv3d(1, 1, 3), np.zeros((8, 8, 8), np.float32))
    two = RED3D(REDConfig(in_channels=2, channels=(4, 8)))
    with pytest.raises(ValueError, match=r"\(2, D, H, W\)"):
        denoise(two, np.zeros((8, 8, 8), np.float32))


# baselines and scores --------------------------------------------------------------------------

def test_classical_denoisers_help_and_choice_uses_validation():
    clean, noisy, mask = phantom(noise=0.15)
    noisy_psnr = scores(noisy, clean, mask)["psnr"]
    assert scores(bd.gaussian_denoise(noisy, 0.8), clean, mask)["psnr"] > noisy_psnr + 1.5
    assert np.array_equal(bd.gaussian_denoise(noisy, 0), noisy)
    assert bd.estimate_noise_sigma(noisy) == pytest.approx(0.15, rel=0.25)
    assert scores(bd.nlm_denoise(noisy, 0.8, patch_distance=1), clean, mask)["psnr"] > noisy_psnr + 1.5
    best, table = bd.best_gaussian([noisy], [clean], [mask], sigmas=(0.0, 0.8, 3.0))
    assert best == {"sigma": 0.8} and list(table.columns) == ["sigma", "psnr", "ssim", "rmse"] and len(table) == 3
    best, table = bd.best_nlm([noisy], [clean], [mask], h_factors=(0.8, 1.0), patch_distances=(1,))
    assert set(best) == {"h_factor", "patch_distance"} and len(table) == 2
    with pytest.raises(ValueError, match="sigma"):
        bd.gaussian_denoise(noisy, -1)
    with pytest.raises(ValueError, match="h_factor"):
        bd.nlm_denoise(noisy, 0)
    with pytest.raises(ValueError, match="x: expected a 3D"):
        bd.gaussian_denoise(noisy[0], 1.0)


# the chapter's recipes (training/denoising.py) ------------------------------------------------------

def test_train_mse_and_red_wgan_recipes_train_in_place():
    from gen3d_lessons.training.denoising import tenths, train_mse, train_red_wgan
    torch.manual_seed(0)
    net = RED3D(SMALL)
    history = train_mse(net, [pairs()], lr=3e-3, max_steps=8)
    assert history.steps == 8 and history.values["mse"][-1] < history.values["mse"][0]
    before = [p.clone() for p in net.parameters()]
    critic = Critic3D(CriticConfig(channels=(4, 8)))
    h = train_red_wgan(net, critic, [pairs()], max_steps=4, critic_warmup=2)
    assert h.steps == 4 and np.isnan(h.values["mse"][:2]).all() and np.isfinite(h.values["mse"][2:]).all()
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    first, last = tenths(h, "w_dist")
    assert first == h.values["w_dist"][0] and last == h.values["w_dist"][-1]     # 4 steps: a tenth is one step
    assert np.isnan(tenths(h, "mse")[0]) and tenths(h, "mse")[1] == h.values["mse"][-1]
    assert all(np.isnan(tenths(h, "never")))
    with pytest.raises(ValueError, match="History"):
        tenths({"w_dist": [1.0]}, "w_dist")


def test_tenths_means_over_a_tenth_of_the_run():
    from gen3d_lessons.training import History
    from gen3d_lessons.training.denoising import tenths
    h = History()
    for v in range(20):
        h.record({"loss": float(v)})
    assert tenths(h, "loss") == (0.5, 18.5)                              # steps 0-1 and 18-19


# the task: data, methods, scores (tasks/denoise.py) --------------------------------------------------

def test_volume_arrays_and_data_facts():
    from gen3d_lessons.tasks.denoise import data_facts, volume_arrays
    item = {k: torch.as_tensor(v, dtype=torch.float32)[None] for k, v in zip(("lowdose", "image"), phantom()[1::-1])}
    item["label"] = torch.as_tensor(phantom()[2], dtype=torch.int64)[None]
    x, y, m = volume_arrays(iter([item, item]))                        # any iterable, read once
    assert len(x) == 2 and x[0].shape == (16, 16, 16) and m[0].dtype == bool and np.array_equal(y[0], item["image"][0])
    facts = data_facts(x, y, m)
    assert list(facts.columns) == ["noise σ, full dose", "noise σ, low dose", "PSNR low dose (dB)",
                                   "PSNR of the blur alone (dB)"] and len(facts) == 2
    assert facts["noise σ, low dose"][0] > facts["noise σ, full dose"][0]         # the noisy one is the low dose
    with pytest.raises(ValueError, match="keys"):
        volume_arrays([{"image": item["image"]}])
    with pytest.raises(ValueError, match="lengths"):
        data_facts(x, y[:1], m)


def test_denoisers_score_table_and_ahead_of():
    from gen3d_lessons.tasks.denoise import SCORE_COLUMNS, ahead_of, denoisers, score_table
    clean, noisy, mask = phantom(noise=0.15)
    noisy = np.clip(noisy, 0, 1).astype(np.float32)                     # intensities as the networks expect
    net = RED3D(SMALL)                                                  # untrained: the identity
    methods = denoisers({"net": net}, gaussian={"sigma": 0.8}, nlm={"h_factor": 0.8, "patch_distance": 1})
    assert list(methods) == ["low dose", "Gaussian", "non-local means", "net, one pass", "net"]
    outputs = {name: [f(noisy)] for name, f in methods.items()}
    assert np.allclose(outputs["net"][0], noisy, atol=1e-6) and outputs["low dose"][0] is noisy
    table = score_table(outputs, [clean], [mask])
    assert list(table.columns) == list(SCORE_COLUMNS) and list(table.index) == list(methods)
    assert table.loc["Gaussian", "PSNR (dB)"] == pytest.approx(scores(outputs["Gaussian"][0], clean, mask)["psnr"])
    ahead = ahead_of(table, ["Gaussian", "non-local means"], ["low dose"])
    assert set(ahead) == {"PSNR (dB)", "SSIM", "RMSE", "RMSE at edges", "RMSE on flat tissue"} and ahead["PSNR (dB)"]
    assert not any(ahead_of(table, ["low dose"], ["Gaussian"], columns=("PSNR (dB)", "RMSE")).values())
    with pytest.raises(ValueError, match="better direction"):
        ahead_of(table, ["Gaussian"], ["low dose"], columns=("sharpness",))
    with pytest.raises(ValueError, match="methods"):
        ahead_of(table, ["median"], ["low dose"])
    with pytest.raises(ValueError, match="nets"):
        denoisers({}, gaussian={}, nlm={})
    with pytest.raises(ValueError, match="outputs"):
        score_table({}, [clean], [mask])


def test_added_detail_table_and_steepest_edge():
    from gen3d_lessons.metrics import line_profile
    from gen3d_lessons.metrics.image import steepest_slope
    from gen3d_lessons.tasks.denoise import ADDED_COLUMNS, added_detail_table, steepest_edge
    clean, noisy, mask = phantom(size=24, noise=0.05)
    blurred = bd.gaussian_denoise(noisy, 1.5)
    table = added_detail_table([clean, clean], [blurred, blurred], [clean, clean], [mask, mask], name="sharp − blurred")
    assert list(table.columns) == list(ADDED_COLUMNS) and list(table.index) == ["sharp − blurred"]
    assert table.iloc[0, 1] == pytest.approx(1.0)                  # what it adds is exactly what was missing
    edge = steepest_edge(clean, mask, 12, reach=4)
    assert edge.box[2] == slice(None) and edge.center[2] == 12
    assert np.linalg.norm(edge.end - edge.start) == pytest.approx(8) and edge.start[2] == edge.end[2] == 12
    sharp, soft = (line_profile(v, edge.start, edge.end, n=33) for v in (clean, blurred))    # 4 samples per voxel
    assert steepest_slope(sharp, 4) > steepest_slope(soft, 4) > 0
    assert steepest_slope([0.0, 0.5, 0.6], samples_per_voxel=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eroded|erosions"):
        steepest_edge(clean, np.zeros_like(mask), 12)
    with pytest.raises(ValueError, match="index"):
        steepest_edge(clean, mask, 24)
    with pytest.raises(ValueError, match="lengths"):
        added_detail_table([clean], [], [clean], [mask])
    with pytest.raises(ValueError, match="profile"):
        steepest_slope([1.0])
