"""GANs in 3D: shapes, gradients, the losses on known cases, the StyleGAN2 and CycleGAN pieces, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from gen3d_lessons.data.batches import Batches
from gen3d_lessons.blocks import PatchDiscriminatorConfig, count_parameters
from gen3d_lessons.models.gan import (Discriminator3D, DiscriminatorConfig, Generator3D, GeneratorConfig,
                                      PatchCritic3D)
from gen3d_lessons.models.stylegan import ModulatedConv3d, NoiseInjection, StyleGANConfig, StyleGenerator3D
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.training import load_model, save_model
from gen3d_lessons.losses import (bce_discriminator_loss, bce_generator_loss, cycle_consistency_loss,
                                  discriminator_loss, generator_loss, l1_loss)
from gen3d_lessons.training.ema import ema_of, ema_update
from gen3d_lessons.training.gan import cyclegan_step, gan_step, pix2pix_step, train_gan
from gen3d_lessons import spatial

S = 16  # edge of the test volumes


def small_g(**kw):
    return Generator3D(GeneratorConfig(z_dim=8, size=S, channels=(16, 8, 4), **kw))


def small_d(**kw):
    return Discriminator3D(DiscriminatorConfig(size=S, channels=(4, 8), **kw))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Networks: shapes, conditions, bad input ---------------------------------------------------------

@pytest.mark.parametrize("norm, channels", [("pixel", (16, 8, 4)), ("batch", (16, 8, 4)), ("none", (16, 8))])
def test_generator_shapes_and_range(norm, channels):
    g = Generator3D(GeneratorConfig(z_dim=8, size=S, channels=channels, norm=norm))   # (16, 8): 8³ -> 16³ in to_image
    x = g(torch.randn(3, 8))
    assert x.shape == (3, 1, S, S, S) and 0 <= x.min() and x.max() <= 1
    assert g.sample(2).shape == (2, 1, S, S, S) and g.training          # sample() restores the mode
    same = [g.sample(2, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*same)


@pytest.mark.parametrize("mode", ["projection", "concat"])
def test_conditional_networks_use_the_condition(mode):
    g, d = small_g(cond_dim=2), small_d(cond_dim=2, cond_mode=mode)
    z, x = torch.randn(2, 8), torch.rand(2, 1, S, S, S)
    c0, c1 = torch.zeros(2, 2), torch.ones(2, 2)
    assert not torch.allclose(g(z, c0), g(z, c1))
    assert d(x, c0).shape == (2,) and not torch.allclose(d(x, c0), d(x, c1))
    with pytest.raises(ValueError, match=r"c: this generator needs a condition of shape \(2, 2\)"):
        g(z)
    with pytest.raises(ValueError, match="NaN"):
        d(x, torch.full((2, 2), float("nan")))


def test_networks_refuse_bad_input():
    g, d = small_g(), small_d()
    with pytest.raises(ValueError, match=r"z: expected shape \(B, 8\)"):
        g(torch.randn(2, 7))
    with pytest.raises(ValueError, match="takes no condition"):
        g(torch.randn(2, 8), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 16, 16, 16\)"):
        d(torch.rand(2, 1, S, S))                                        # 2D, not 3D
    with pytest.raises(ValueError, match="or twice it"):
        GeneratorConfig(size=64, channels=(8, 4))
    with pytest.raises(ValueError, match="norm"):
        GeneratorConfig(norm="layer")
    with pytest.raises(ValueError, match="n: expected a positive"):
        g.sample(0)


def test_template_starts_the_generator_at_the_mean_volume():
    mean = torch.rand(1, S, S, S) * 0.8 + 0.1
    g = small_g(template=True)
    g.set_template(mean)
    torch.nn.init.zeros_(g.to_image[-1].weight), torch.nn.init.zeros_(g.to_image[-1].bias)
    assert torch.allclose(g.sample(2), mean.expand(2, 1, S, S, S), atol=1e-5)      # zero convolution: the mean
    with pytest.raises(ValueError, match="template=False"):
        small_g().set_template(mean)
    with pytest.raises(ValueError, match="NaN"):
        g.set_template(mean * float("nan"))


def test_spectral_norm_bounds_the_weights():
    d = small_d(spectral_norm=True)
    d(torch.rand(2, 1, S, S, S))                                         # one power iteration
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(d.psi.weight, ord=2).item()
    assert sigma == pytest.approx(1.0, rel=0.05)


def test_generator_save_load_round_trip(tmp_path):
    g = small_g(cond_dim=1)
    path = save_model(tmp_path / "g.pt", g, g.cfg)
    again = load_model(path, lambda c: Generator3D(GeneratorConfig(**c)))
    z, c = torch.randn(2, 8), torch.ones(2, 1)
    g.eval()
    assert torch.allclose(g(z, c), again(z, c))


# Losses on known cases ---------------------------------------------------------------------------

def test_adversarial_losses_known_values():
    zero = torch.zeros(4)
    # D(x) = D(G(z)) = 0 (σ = 1/2): both terms are log 2
    assert discriminator_loss(zero, zero, "ns").item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero, "ns").item() == pytest.approx(math.log(2))
    # a confident, right discriminator: loss near 0; the non-saturating G loss is large, not flat
    assert discriminator_loss(zero + 20, zero - 20, "ns").item() < 1e-6
    assert generator_loss(zero - 20, "ns").item() == pytest.approx(20, rel=1e-3)
    # the Wasserstein critic: E[D(fake)] − E[D(real)]
    assert discriminator_loss(zero + 3, zero + 1, "wgan-gp").item() == pytest.approx(-2)
    assert generator_loss(zero + 1, "wgan-gp").item() == pytest.approx(-1)
    with pytest.raises(ValueError, match="kind"):
        generator_loss(zero, "hinge")


def test_bce_losses_are_the_non_saturating_ones_with_d_halved():
    real, fake = torch.randn(3, 1, 2, 2, 2), torch.randn(3, 1, 2, 2, 2)
    assert bce_discriminator_loss(real, fake).item() == pytest.approx(0.5 * discriminator_loss(real, fake, "ns").item())
    assert bce_generator_loss(fake).item() == pytest.approx(generator_loss(fake, "ns").item())
    assert l1_loss(real, real + 0.5).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="does not match"):
        l1_loss(real, fake[:, :, :1])


def test_nonsaturating_generator_gradient_is_strong_where_the_minimax_one_vanishes():
    s = torch.tensor([-10.0], requires_grad=True)           # D rejects the sample confidently
    (g_ns,) = torch.autograd.grad(generator_loss(s, "ns"), s)
    (g_mm,) = torch.autograd.grad(-torch.nn.functional.softplus(s).sum(), s)   # log(1 − σ(s))
    assert abs(g_ns.item()) > 0.99 and abs(g_mm.item()) < 1e-4


def test_cycle_loss_is_zero_for_inverse_maps_and_positive_otherwise():
    x = torch.rand(2, 1, S, S, S)
    G, F_ = (lambda v: 2 * v + 1), (lambda v: (v - 1) / 2)  # F = G⁻¹
    assert cycle_consistency_loss(x, F_(G(x))).item() == pytest.approx(0.0, abs=1e-7)
    assert cycle_consistency_loss(x, G(G(x))).item() > 0.5
    with pytest.raises(ValueError, match="does not match"):
        cycle_consistency_loss(x, x[:, :, :8])


# Step functions: gradients reach both networks ---------------------------------------------------

def _changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
def test_gan_step_updates_both_networks_and_the_ema(loss):
    g, d = small_g(cond_dim=1), small_d(cond_dim=1)
    ema = copy.deepcopy(g)
    og, od = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    g0, d0, e0 = [[p.clone() for p in m.parameters()] for m in (g, d, ema)]
    batch = {"image": torch.rand(4, 1, S, S, S), "condition": torch.rand(4, 1)}
    nets = dict(generator=g, discriminator=d, opt_g=og, opt_d=od)
    out = gan_step(batch, 0, **nets, loss=loss, ema=ema, ema_decay=0.5)
    assert _changed(g0, g) and _changed(d0, d) and _changed(e0, ema)
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(out) and (("gp" in out) == (loss == "wgan-gp"))
    # with n_critic = 2 the generator waits for the second step
    g1 = [p.clone() for p in g.parameters()]
    out = gan_step(batch, 0, **nets, loss=loss, n_critic=2)
    assert "g_loss" not in out and not _changed(g1, g)
    with pytest.raises(ValueError, match="loss"):
        gan_step(batch, 0, **nets, loss="lsgan")
    with pytest.raises(ValueError, match="'image'"):
        gan_step({"x": batch["image"]}, 0, **nets)


def test_ema_update_averages_parameters():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.25 * pa + 0.75 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, decay=0.25)
    assert all(torch.allclose(p, e) for p, e in zip(a.parameters(), expected))


def test_ema_of_copies_first_then_averages():
    model = torch.nn.Linear(2, 2)
    ema = ema_of(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)                                   # the first update copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)                                   # then 0.5 · 1 + 0.5 · 3
    assert torch.allclose(ema.module.weight, torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="decay"):
        ema_of(model, decay=1.0)


def test_train_gan_runs_and_probes():
    g, d = small_g(), small_d()
    batches = Batches({"image": torch.rand(6, 1, S, S, S)}, batch_size=3, augment=("image",))
    final, history = train_gan(g, d, batches, loss="wgan-gp", max_steps=4, probe=lambda m: {"probe": 1.0},
                               probe_every=2)
    assert history.steps == 4 and history.values["probe"][1] == 1.0 and math.isnan(history.values["probe"][0])
    assert final is not g and not final.training
    # keep_best: the generator of the probe with the lowest value comes back
    values, states = iter([3.0, 1.0, 2.0]), []

    def probe(m):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"fd": next(values)}

    final, history = train_gan(small_g(), small_d(), batches, loss="ns", max_steps=6, probe=probe, probe_every=2,
                               keep_best="fd")
    assert all(torch.equal(v, states[1][k]) for k, v in final.state_dict().items())
    assert not all(torch.equal(v, states[2][k]) for k, v in final.state_dict().items())
    with pytest.raises(ValueError, match="keep_best"):
        train_gan(small_g(), small_d(), batches, loss="ns", max_steps=2, keep_best="fd")


def test_pix2pix_pieces_shapes_and_step():
    g = UNet3D(UNetConfig(in_channels=1, out_channels=1, features=(4, 8)))
    d = PatchCritic3D(PatchDiscriminatorConfig(in_channels=2, features=(4, 8)))
    x, y = torch.rand(2, 1, S, S, S), torch.rand(2, 1, S, S, S)
    assert g(x).shape == y.shape and d(x, y).shape == (2, 1, S // 4, S // 4, S // 4)
    g0, d0 = [p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()]
    og, od = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    out = pix2pix_step({"x": x, "y": y}, 0, generator=g, discriminator=d, opt_g=og, opt_d=od, l1_weight=100.0)
    assert _changed(g0, g) and _changed(d0, d) and {"d_loss", "g_adv", "l1"} <= set(out)
    with pytest.raises(ValueError, match="3 channels in all"):
        d(x, y, y)


def test_cyclegan_step_trains_two_generators_and_two_discriminators():
    nets = [UNet3D(UNetConfig(in_channels=1, out_channels=1, features=(4, 8))) for _ in range(2)]
    critics = [PatchCritic3D(PatchDiscriminatorConfig(in_channels=1, features=(4, 8))) for _ in range(2)]
    og = torch.optim.Adam(itertools.chain(*(n.parameters() for n in nets)), 1e-3)
    od = torch.optim.Adam(itertools.chain(*(c.parameters() for c in critics)), 1e-3)
    before = [[p.clone() for p in m.parameters()] for m in nets + critics]
    out = cyclegan_step({"x": torch.rand(2, 1, S, S, S), "y": torch.rand(2, 1, S, S, S)}, 0,
                        generator_xy=nets[0], generator_yx=nets[1], discriminator_x=critics[0],
                        discriminator_y=critics[1], opt_g=og, opt_d=od)
    assert all(_changed(b, m) for b, m in zip(before, nets + critics))
    assert out["cycle"] > 0 and {"d_loss", "g_adv"} <= set(out) and "identity" not in out


def test_cyclegan_identity_loss_is_zero_for_identity_generators():
    class Same(torch.nn.Module):                     # a generator that returns its input (plus a trainable zero)
        def __init__(self):
            super().__init__()
            self.zero = torch.nn.Parameter(torch.zeros(()))

        def forward(self, v):
            return v + self.zero

    nets, critics = [Same(), Same()], [PatchCritic3D(PatchDiscriminatorConfig(in_channels=1, features=(4, 8))) for _ in range(2)]
    og = torch.optim.Adam(itertools.chain(*(n.parameters() for n in nets)), 1e-3)
    od = torch.optim.Adam(itertools.chain(*(c.parameters() for c in critics)), 1e-3)
    out = cyclegan_step({"x": torch.rand(2, 1, S, S, S), "y": torch.rand(2, 1, S, S, S)}, 0,
                        generator_xy=nets[0], generator_yx=nets[1], discriminator_x=critics[0],
                        discriminator_y=critics[1], opt_g=og, opt_d=od, identity_weight=5.0)
    assert out["identity"] == pytest.approx(0.0, abs=1e-7) and out["cycle"] == pytest.approx(0.0, abs=1e-7)


# StyleGAN2 pieces -------------------------------------------------------------------------------

def test_demodulation_keeps_unit_variance_whatever_the_style():
    conv = ModulatedConv3d(16, 8, 3, w_dim=4)
    x = torch.randn(3, 16, 20, 20, 20)                                   # unit-variance input
    w = torch.randn(3, 4) * torch.tensor([[0.1], [1.0], [10.0]])         # styles of very different size
    y = conv(x, w)[:, :, 1:-1, 1:-1, 1:-1]                               # away from the zero padding
    var = y.var(dim=(1, 2, 3, 4))
    assert torch.allclose(var, torch.ones(3), atol=0.08), var
    # without demodulation the output variance follows the style
    raw = ModulatedConv3d(16, 8, 3, w_dim=4, demodulate=False)
    raw.load_state_dict(conv.state_dict())
    v_raw = raw(x, w).var(dim=(1, 2, 3, 4))
    assert v_raw.max() / v_raw.min() > 3


def test_modulated_conv_equals_a_plain_conv_with_the_per_sample_kernel():
    conv = ModulatedConv3d(3, 2, 3, w_dim=5, upsample=True)
    x, w = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 5)
    y = conv(x, w)
    assert y.shape == (2, 2, 8, 8, 8)
    kernels = conv.modulated_weight(w)
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
    for b in range(2):
        assert torch.allclose(y[b:b + 1], torch.nn.functional.conv3d(up[b:b + 1], kernels[b], padding=1), atol=1e-5)


def test_noise_injection_starts_off_and_stylegan_generates():
    n = NoiseInjection()
    x = torch.randn(2, 4, 4, 4, 4)
    assert torch.equal(n(x), x)
    g = StyleGenerator3D(StyleGANConfig(z_dim=8, w_dim=8, mapping_layers=2, size=S, channels=(16, 8, 4), cond_dim=1))
    z, c = torch.randn(2, 8), torch.zeros(2, 1)
    x = g(z, c)
    assert x.shape == (2, 1, S, S, S) and 0 <= x.min() and x.max() <= 1
    x.mean().backward()
    assert g.mapping.net[0].weight.grad.abs().sum() > 0 and g.constant.grad.abs().sum() > 0
    # the noise inputs change the output once their strength is non-zero
    for block in g.blocks:
        block.noise.strength.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.allclose(g(z, c), g(z, c))
    assert count_parameters(g) > 0 and g.sample(1, torch.zeros(1, 1)).shape == (1, 1, S, S, S)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 16"):
        g.blocks[0].conv(torch.randn(1, 3, 4, 4, 4), torch.randn(1, 8))


# Chapter 3's recipe: batches, Adam settings, the probe read back, pix2pix and CycleGAN runs ---------

from gen3d_lessons.training.fit import History                                      # noqa: E402
from gen3d_lessons.training.gan import (ADAM, LOSSES, gan_batches, probe_summary, train_cyclegan,  # noqa: E402
                                        train_pix2pix)


def test_set_template_returns_the_generator():
    g = small_g(template=True)
    assert g.set_template(torch.full((1, S, S, S), 0.5)) is g
    assert torch.allclose(g.template, torch.zeros_like(g.template), atol=1e-6)       # logit(0.5) = 0


def test_adam_settings_and_gan_batches():
    assert set(ADAM) == set(LOSSES) and ADAM["ns"]["lr_d"] < ADAM["ns"]["lr_g"]       # the slower discriminator
    images, c = torch.rand(6, 1, S, S, S), torch.randn(6, 4)
    got = next(iter(gan_batches(images, 3, seed=5, condition=c)))
    want = next(iter(Batches({"image": images, "condition": c}, 3, seed=5, augment=("image",))))
    assert set(got) == {"image", "condition"} and all(torch.equal(got[k], want[k]) for k in want)
    assert set(next(iter(gan_batches(images, 3, seed=5, device="cpu")))) == {"image"}
    with pytest.raises(ValueError, match="one row per image"):
        gan_batches(images, 3, seed=0, condition=c[:5])


def test_probe_summary_reads_first_lowest_and_last():
    h = History()
    for v in (None, 3.0, None, 1.0, None, 2.0):
        h.record({"d_loss": 0.0} if v is None else {"d_loss": 0.0, "fd": v})
    assert probe_summary(h) == dict(first=3.0, first_step=2, best=1.0, best_step=4, last=2.0, last_step=6)
    with pytest.raises(ValueError, match="never recorded"):
        probe_summary(h, "kid")
    empty = History()
    empty.record({"fd": math.nan})
    with pytest.raises(ValueError, match="never ran"):
        probe_summary(empty)


def _pix2pix_nets():
    torch.manual_seed(3)
    return (UNet3D(UNetConfig(in_channels=1, out_channels=1, features=(4, 8))),
            PatchCritic3D(PatchDiscriminatorConfig(in_channels=2, features=(4, 8))))


def test_train_pix2pix_equals_its_steps_by_hand():
    x, y = torch.rand(2, 1, S, S, S), torch.rand(2, 1, S, S, S)
    g, d = _pix2pix_nets()
    history = train_pix2pix(g, d, [{"x": x, "y": y}], max_steps=2)
    g2, d2 = _pix2pix_nets()
    og, od = (torch.optim.Adam(m.parameters(), 2e-3, betas=(0.5, 0.999)) for m in (g2, d2))
    by_hand = [pix2pix_step({"x": x, "y": y}, i, generator=g2, discriminator=d2, opt_g=og, opt_d=od)["l1"] for i in range(2)]
    assert history.values["l1"] == by_hand and history.steps == 2


def test_train_cyclegan_equals_its_step_by_hand():
    batch = {"x": torch.rand(2, 1, S, S, S), "y": torch.rand(2, 1, S, S, S)}

    def nets():
        torch.manual_seed(4)
        return ([UNet3D(UNetConfig(in_channels=1, out_channels=1, features=(4, 8))) for _ in range(2)]
                + [PatchCritic3D(PatchDiscriminatorConfig(in_channels=1, features=(4, 8))) for _ in range(2)])

    history = train_cyclegan(*nets(), [batch], max_steps=1)
    g_xy, g_yx, d_x, d_y = nets()
    og = torch.optim.Adam(itertools.chain(g_xy.parameters(), g_yx.parameters()), 2e-4)
    od = torch.optim.Adam(itertools.chain(d_x.parameters(), d_y.parameters()), 2e-4)
    out = cyclegan_step(batch, 0, generator_xy=g_xy, generator_yx=g_yx, discriminator_x=d_x, discriminator_y=d_y,
                        opt_g=og, opt_d=od)
    assert {k: v[0] for k, v in history.values.items()} == out


# The yardstick's reading of a table (tasks/yardstick.py) ------------------------------------------

from gen3d_lessons.tasks import yardstick as Y                                      # noqa: E402


def _row(fd, one_nn=0.7, ms_ssim=0.3, mem_ratio=1.0, mem_frac=0.0):
    return dict(fd=fd, kid=fd / 10, mmd=fd / 20, ms_ssim=ms_ssim, one_nn=one_nn, mem_ratio=mem_ratio, mem_frac=mem_frac)


ROWS = {"held-out real": _row(1.0, 0.5), "mean + noise": _row(4.0, 1.0), "PCA Gaussian samples": _row(2.0),
        "vanilla GAN": _row(3.0, mem_ratio=0.5, mem_frac=0.5), "WGAN-GP": _row(1.5, 0.6)}


def test_ratio_table_row_summary_and_metrics():
    t = Y.ratio_table(ROWS)
    assert list(t.index) == list(ROWS) and t.loc["WGAN-GP", "FD / baseline"] == 1.5 / 4.0
    assert list(t["memorisation check"]) == ["pass", "pass", "pass", "fail", "pass"]
    assert Y.row_summary(ROWS, "WGAN-GP") == {"ratio": 1.5 / 4.0, "one_nn": 0.6, "ms_ssim": 0.3, "mem_ratio": 1.0}
    m = Y.table_metrics(ROWS, ["vanilla GAN", "WGAN-GP"])
    assert m["FD PCA Gaussian samples"] == 2.0 and m["FD ratio vanilla GAN"] == 3.0 / 4.0
    assert m["1-NN held-out real"] == 0.5 and set(k for k in m if k.startswith("mem_ratio")) == {
        "mem_ratio vanilla GAN", "mem_ratio WGAN-GP", "mem_ratio PCA Gaussian samples"}
    with pytest.raises(ValueError, match="baseline"):
        Y.ratio_table({"a": _row(1.0)})
    with pytest.raises(ValueError, match="rows"):
        Y.table_metrics(ROWS, ["no such model"])


def test_best_model_makes_the_comparisons_of_the_text():
    best = Y.best_model(ROWS, ["vanilla GAN", "WGAN-GP"])
    assert best == {"name": "WGAN-GP", "ratio": 1.5 / 4.0, "below_rival": True, "all_beat_baseline": True,
                    "memorisation": True}
    worse = Y.best_model({**ROWS, "WGAN-GP": _row(5.0)}, ["vanilla GAN", "WGAN-GP"])
    assert worse["name"] == "vanilla GAN" and not worse["below_rival"] and not worse["all_beat_baseline"]
    assert not worse["memorisation"]                                      # mem_frac 0.5 > 0.2
    with pytest.raises(ValueError, match="rows"):
        Y.best_model(ROWS, ["vanilla GAN"], rival="no such row")


class _Judge:
    """A stand-in for the yardstick encoder: features are voxel means; the heads read voxel (0, 0, 0)
    as the site and voxel (0, 0, 1) as the age."""

    def __init__(self):
        self.heldout = {"n_test": 10, "age_mae": 5.0, "age_mae_baseline": 9.0, "age_r2": 0.4, "site_acc": 0.9,
                        "site_acc_baseline": 0.4, "lesion_acc": 0.7, "lesion_acc_baseline": 0.5,
                        "lesion_auc": 0.8, "volumes_r2": 0.6}
        self.check = {}

    def features(self, x):
        x = torch.as_tensor(x).flatten(1)
        return torch.stack([x.mean(1), x.std(1), x[:, :5].mean(1)], 1).double().numpy()

    def predict(self, x):
        x = torch.as_tensor(x)
        return {"site": x[:, 0, 0, 0, 0].round().long().numpy(), "age": x[:, 0, 0, 0, 1].double().numpy()}


class _Obedient(torch.nn.Module):
    """A conditional "generator" that writes its condition (site, age) into its volumes."""

    def sample(self, n, c, generator=None):
        x = torch.rand(n, 1, 4, 4, 4, generator=generator)
        x[:, 0, 0, 0, 0], x[:, 0, 0, 0, 1] = c[:, 1], c[:, 0]
        return x


def test_heads_table_fd_to_and_condition_readback():
    judge = _Judge()
    t = Y.heads_table(judge)
    assert list(t.columns) == ["test split (n=10)", "trivial guess"]
    assert t.loc["site accuracy", "test split (n=10)"] == 0.9 and t.loc["site accuracy", "trivial guess"] == 0.4
    assert math.isnan(t.loc["lesion AUC", "trivial guess"])
    a, b = torch.rand(20, 1, 4, 4, 4), torch.rand(20, 1, 4, 4, 4) + 1
    fd = Y.fd_to(judge, a, {"same": a, "brighter": b})
    assert fd["same"] == pytest.approx(0.0, abs=1e-6) and fd["brighter"] > 0.5
    condition = lambda age, site: torch.tensor([[float(g), float(s)] for g, s in zip(age, site)])   # noqa: E731
    rb = Y.condition_readback(_Obedient(), judge, condition, 3, sites=(0, 1, 2), ages=(25, 85))
    assert rb == {"site_acc": {0: 1.0, 1: 1.0, 2: 1.0}, "site_mean": 1.0, "age_pred": {25: 25.0, 85: 85.0}}
    with pytest.raises(ValueError, match="n:"):
        Y.condition_readback(_Obedient(), judge, condition, 0)


def test_load_splits_divides_the_training_split(tmp_path):
    from test_yardstick import _tiny_brains           # 6 training and 2 test brains of 16³

    folder = _tiny_brains(tmp_path / "tiny")
    train, val, heldout, train_attrs, val_attrs = Y.load_splits(folder, size=S, seed=0)
    all_train = Y.load_volumes(folder, "train", size=S)
    assert len(val) == len(heldout) == 2 and len(train) == 4 and len(train_attrs) == 4 and len(val_attrs) == 2
    assert sorted(train_attrs.age.tolist() + val_attrs.age.tolist()) == sorted(range(20, 61, 8))
    for volumes, attrs in ((train, train_attrs), (val, val_attrs)):         # volumes and attributes stay aligned
        k = [(int(a) - 20) // 8 for a in attrs.age]
        assert torch.equal(volumes, all_train[k])
    assert Y.load_splits(folder, size=S, seed=0, n_val=1).val.shape == (1, 1, S, S, S)
    with pytest.raises(ValueError, match="n_val"):
        Y.load_splits(folder, size=S, n_val=6)


# The chapter's figures (viz.py) ---------------------------------------------------------------------

from gen3d_lessons.viz import plot_gan_training, sample_rows                          # noqa: E402


def test_sample_rows_and_plot_gan_training():
    fig = sample_rows({"real": torch.rand(5, 1, 8, 8, 8), "GAN": torch.rand(4, 8, 8, 8)}, n=3)
    titles = [a.get_title() for a in fig.axes]
    assert len(fig.axes) == 6 and titles[:3] == ["real 1", "real 2", "real 3"] and titles[3] == "GAN 1"
    with pytest.raises(ValueError, match="at least 3"):
        sample_rows({"real": torch.rand(2, 1, 8, 8, 8)}, n=3)
    with pytest.raises(ValueError, match="shape"):
        sample_rows({"a": torch.rand(3, 1, 8, 8, 8), "b": torch.rand(3, 1, 4, 4, 4)}, n=2)
    nan = math.nan
    h = {"d_loss": [1.0, 0.9, 0.8, 0.7], "g_loss": [0.5, 0.6, 0.7, 0.8], "fd": [nan, 2.0, nan, 1.0]}
    fig = plot_gan_training({"a": h, "b": h}, {"held-out real": 0.5}, titles=("A", "B"))
    assert [a.get_title() for a in fig.axes][:2] == ["A", "B"] and len(fig.axes) == 3
    assert len(fig.axes[2].lines) == 2 * 2 + 1                                     # a curve and a star per run, one line
    with pytest.raises(ValueError, match="no \\['fd'\\]"):
        plot_gan_training({"a": {"d_loss": [1.0], "g_loss": [1.0]}})
    with pytest.raises(ValueError, match="titles"):
        plot_gan_training({"a": h}, titles=("A", "B"))


# 3D-α-WGAN-GP (chapter 7) ----------------------------------------------------------------------

from gen3d_lessons.models.alphagan import CodeCritic, VolumeEncoder, VolumeEncoderConfig   # noqa: E402
from gen3d_lessons.training.gan import alpha_gan_step, train_alpha_gan                     # noqa: E402


def alpha_parts():
    torch.manual_seed(0)
    g = small_g()
    e = VolumeEncoder(VolumeEncoderConfig(size=S, channels=(4, 8), z_dim=g.cfg.z_dim))
    return g, e, small_d(), CodeCritic(g.cfg.z_dim, width=16)


def test_alpha_gan_pieces_shapes_and_bad_input():
    g, e, d, c = alpha_parts()
    x = torch.rand(3, 1, S, S, S)
    z = e(x)
    assert z.shape == (3, g.cfg.z_dim) and c(z).shape == (3,) and g(z).shape == x.shape
    with pytest.raises(ValueError, match="x: expected"):
        e(torch.rand(3, 1, S, S, S + 1))
    with pytest.raises(ValueError, match="z: expected"):
        c(torch.rand(3, g.cfg.z_dim + 1))
    with pytest.raises(ValueError, match="size"):
        VolumeEncoderConfig(size=10, channels=(4, 8))
    with pytest.raises(ValueError, match="positive"):
        CodeCritic(0)


def test_alpha_gan_step_trains_all_four_networks_and_the_ema():
    g, e, d, c = alpha_parts()
    ema = copy.deepcopy(g)
    before = [copy.deepcopy(net.state_dict()) for net in (g, e, d, c, ema)]
    opts = {k: torch.optim.Adam(net.parameters(), 1e-3) for k, net in (("opt_g", g), ("opt_e", e), ("opt_d", d), ("opt_c", c))}
    out = alpha_gan_step({"image": torch.rand(3, 1, S, S, S)}, 0, generator=g, encoder=e, critic=d, code_critic=c,
                         ema=ema, **opts)
    assert {"d_loss", "c_loss", "rec", "g_adv", "e_adv"} <= set(out) and all(math.isfinite(v) for v in out.values())
    for net, old in zip((g, e, d, c, ema), before):
        assert any(not torch.equal(v, old[k]) for k, v in net.state_dict().items()), type(net).__name__


def test_alpha_gan_learns_to_reconstruct():
    g, e, d, c = alpha_parts()
    x = torch.rand(4, 1, S, S, S) * 0.2 + 0.4
    batches = Batches({"image": x}, batch_size=4, augment=())
    final, history = train_alpha_gan(g, e, d, c, batches, max_steps=30, lr=2e-3, probe=lambda m: {"fd": 1.0},
                                     probe_every=10)
    assert history.steps == 30 and history.mean_last("rec", 5) < history.values["rec"][0]
    assert final is not g and not final.training and history.values["fd"][9] == 1.0


def test_stylegan_template_starts_at_the_mean_volume():
    mean = torch.rand(1, S, S, S) * 0.5 + 0.25
    g = StyleGenerator3D(StyleGANConfig(size=S, channels=(8, 4, 4), template=True)).set_template(mean)
    with torch.no_grad():
        for p in g.to_image.parameters():
            p.zero_()                                  # the image layers silent: only the template speaks
        x = g(torch.randn(2, g.cfg.z_dim))
    torch.testing.assert_close(x[0], mean, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="template=False"):
        StyleGenerator3D(StyleGANConfig(size=S, channels=(8, 4, 4))).set_template(mean)


def test_mapping_network_keeps_the_spread_of_the_codes():
    from gen3d_lessons.models.stylegan import MappingNetwork
    w = MappingNetwork(32, 32, layers=4)(torch.randn(512, 32))
    assert w.std(0).mean() > 0.3                       # different codes, different styles
    g = StyleGenerator3D(StyleGANConfig(size=S, channels=(8, 4, 4)))
    with torch.no_grad():
        x = g(torch.randn(4, g.cfg.z_dim))
    assert (x - x.mean(0)).abs().mean() > 1e-3         # and different volumes


# Shape + Texture (chapter 7) -------------------------------------------------------------------

from gen3d_lessons.models.shapetexture import ShapeTextureConfig, ShapeTextureGenerator3D   # noqa: E402


def test_shape_texture_starts_as_the_warped_template_and_is_diffeomorphic():
    mean = torch.rand(1, S, S, S) * 0.5 + 0.25
    g = ShapeTextureGenerator3D(ShapeTextureConfig(size=S, flow_grid=8, z_shape=4, z_texture=4)).set_template(mean)
    z = torch.randn(3, g.cfg.z_dim)
    with torch.no_grad():
        x, u = g(z), g.deformation(z)
        warped = torch.sigmoid(spatial.warp(g.template.expand(3, 1, S, S, S), u, padding_mode="border"))
    assert x.shape == (3, 1, S, S, S) and u.shape == (3, 3, S, S, S)
    assert u.abs().max() <= g.cfg.max_velocity * 2 and (spatial.jacobian_determinant(u) > 0).all()
    torch.testing.assert_close(x, warped, atol=1e-5, rtol=0)             # the texture starts silent
    torch.testing.assert_close(g.template.sigmoid()[0], mean, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="z: expected"):
        g(torch.randn(3, 5))
    with pytest.raises(ValueError, match="flow_grid"):
        ShapeTextureConfig(size=16, flow_grid=6)
    with pytest.raises(ValueError, match="init_velocity"):
        ShapeTextureConfig(init_velocity=5.0)
    big = ShapeTextureGenerator3D(ShapeTextureConfig(size=S, flow_grid=8, init_velocity=2.0, max_velocity=8.0))
    small = ShapeTextureGenerator3D(ShapeTextureConfig(size=S, flow_grid=8, init_velocity=0.5))
    z = torch.randn(8, big.cfg.z_dim)
    with torch.no_grad():                                    # a new generator already deforms, by about init_velocity
        assert big.deformation(z).norm(dim=1).median() > 2 * small.deformation(z).norm(dim=1).median() > 0.2


def test_shape_texture_trains_with_the_gan_step():
    g = ShapeTextureGenerator3D(ShapeTextureConfig(size=S, flow_grid=8, z_shape=4, z_texture=4)).set_template(
        torch.rand(1, S, S, S) * 0.5 + 0.25)          # not constant: moving a constant template changes nothing
    d = small_d()
    before = copy.deepcopy(g.state_dict())
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    out = gan_step({"image": torch.rand(2, 1, S, S, S)}, 0, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d,
                   loss="wgan-gp")
    assert math.isfinite(out["g_loss"])
    changed = {k for k, v in g.state_dict().items() if not torch.equal(v, before[k])}
    assert {"template", "texture_out.weight", "flow.4.weight"} <= changed


def test_deformation_summary_of_known_fields():
    shift = torch.zeros(2, 3, 8, 8, 8)
    shift[:, 0] = 2.0                                       # a rigid shift of 2 voxels
    d = spatial.deformation_summary(shift, spacing_mm=1.5)
    assert d["median_mm"] == pytest.approx(3.0) and d["log_jac_std"] == pytest.approx(0.0, abs=1e-6) and d["folding"] == 0
    grow = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij"))[None] * 0.1   # x -> 1.1 x
    assert spatial.deformation_summary(grow, 1.0)["log_jac_std"] == pytest.approx(0.0, abs=1e-5)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:6, 2:6, 2:6] = True
    assert spatial.deformation_summary(grow, 1.0, mask)["median_mm"] < spatial.deformation_summary(grow, 1.0)["median_mm"]
    with pytest.raises(ValueError, match="mask"):
        spatial.deformation_summary(shift, 1.0, mask[:4])
    with pytest.raises(ValueError, match="spacing_mm"):
        spatial.deformation_summary(shift, 0.0)

