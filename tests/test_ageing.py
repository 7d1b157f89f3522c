"""Counterfactual ageing (chapter 9): AgeingNet, its two training steps, the age reader, load_scm."""

from types import SimpleNamespace

import pytest
import torch

from gen3d_lessons.models.ageing import AgeingConfig, AgeingNet
from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig
from gen3d_lessons.models.gan import Discriminator3D, DiscriminatorConfig
from gen3d_lessons.tasks import counterfactual
from gen3d_lessons.training.ageing import ageing_batches, countersynth_step, longitudinal_step, train_longitudinal


def _brains(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, size, generator=g) * 0.5
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, :, 3:-3, 3:-3, 3:-3] = True
    return x * mask, mask


def _net(**kw):
    torch.manual_seed(0)
    net = AgeingNet(AgeingConfig(features=(4, 8), **kw))
    for p in net.unet.head.parameters():                       # a network that has learned something
        torch.nn.init.normal_(p, std=0.5)
    return net


def test_untrained_network_changes_nothing():
    x, mask = _brains()
    out = AgeingNet(AgeingConfig(features=(4, 8)))(x, [40.0, 50.0], [60.0, 90.0], mask)
    assert torch.allclose(out.image, x, atol=1e-6) and out.displacement.abs().max() == 0


def test_the_observed_age_returns_the_volume_and_the_change_grows_with_the_years():
    x, mask = _brains()
    net = _net()
    same = net(x, 50.0, 50.0, mask)
    assert torch.allclose(same.image, x, atol=1e-6) and same.displacement.abs().max() == 0
    small, large = net(x, 50.0, 55.0, mask), net(x, 50.0, 80.0, mask)
    assert 0 < small.displacement.abs().max() < large.displacement.abs().max()
    assert (small.image - x).abs().sum() < (large.image - x).abs().sum()
    # the intensity change is bounded by max_intensity per years_unit
    assert large.intensity.abs().max() <= net.cfg.max_intensity * 30 / 20 + 1e-6


def test_keep_outline_leaves_the_outside_of_the_brain_still():
    x, mask = _brains(size=24)
    out = _net()(x, 30.0, 80.0, mask)
    far = torch.ones(24, 24, 24, dtype=torch.bool)
    far[1:-1, 1:-1, 1:-1] = False                                 # the border, 2 voxels from the mask
    assert out.velocity[:, :, far].abs().max() < 1e-2 * out.velocity.abs().max()
    assert out.intensity.abs().max() > 0 and out.intensity[~mask].abs().max() == 0


def test_counterfactual_in_batches_equals_one_pass():
    x, mask = _brains(n=3)
    net = _net()
    whole = net.eval()(x, [30.0, 40.0, 50.0], 70.0, mask).image
    assert torch.allclose(net.counterfactual(x, [30.0, 40.0, 50.0], 70.0, mask, batch_size=2), whole, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda n, x, m: n(x[0], 50.0, 60.0, m), r"x: expected a float tensor \(B, 1, D, H, W\)"),
    (lambda n, x, m: n(x, [50.0, 60.0, 70.0], 60.0, m), r"age: expected 2 finite ages"),
    (lambda n, x, m: n(x, 50.0, float("nan"), m), r"target: expected 2 finite ages .* NaN"),
    (lambda n, x, m: n(x, 50.0, 60.0, None), r"mask: keep_outline needs the brain mask"),
    (lambda n, x, m: n(x, 50.0, 60.0, m[:, :, :8]), r"mask: keep_outline needs the brain mask"),
])
def test_bad_input_gets_one_clear_error(call, match):
    x, mask = _brains()
    with pytest.raises(ValueError, match=match):
        call(_net(), x, mask)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="years_unit and age_std must be positive"):
        AgeingConfig(age_std=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        AgeingConfig(max_intensity=-0.1)


class _SizeReader(torch.nn.Module):
    """A stand-in age regressor: older = darker (its gradient says where to darken)."""

    def forward(self, x):
        return 100.0 - 200.0 * x.mean(dim=(1, 2, 3, 4))


def test_countersynth_step_trains_the_generator_and_the_critic():
    x, mask = _brains(n=4)
    G = _net()
    D = Discriminator3D(DiscriminatorConfig(size=16, channels=(4, 8), cond_dim=1, spectral_norm=True))
    before_g, before_d = [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    batch = {"x": x, "age": torch.tensor([30.0, 40.0, 50.0, 60.0]), "mask": mask.float()}
    torch.manual_seed(1)
    out = countersynth_step(batch, 0, generator=G, critic=D, age_reader=_SizeReader(), opt_g=opt_g, opt_d=opt_d,
                            age_range=(20.0, 90.0))
    assert set(out) == {"d_loss", "age_shift", "g_adv", "smooth", "intensity"}
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_g, G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, D.parameters()))


def test_longitudinal_training_learns_a_darkening():
    x, mask = _brains(n=4, seed=2)
    later = (x - 0.05 * mask.float()).clamp(0, 1)                    # 20 years on: 0.05 darker in the brain
    G = AgeingNet(AgeingConfig(features=(4, 8), max_intensity=0.1, keep_outline=True))
    age = torch.tensor([30.0, 40.0, 50.0, 60.0])
    batches = ageing_batches(x, age, mask, 4, seed=0, later=later, target=age + 20)
    first = float(((x - later) ** 2).mean())
    h = train_longitudinal(G, batches, max_steps=60, lr=1e-2, desc="test")
    assert h.values["mse"][-1] < 0.5 * first
    # and it is one step of longitudinal_step each time
    opt = torch.optim.SGD(G.parameters(), 0.0)
    assert set(longitudinal_step(next(iter(batches)), 0, model=G, optimizer=opt)) == {"mse"}


def test_ageing_batches_need_later_scans_and_their_ages_together():
    x, mask = _brains()
    with pytest.raises(ValueError, match="give both"):
        ageing_batches(x, torch.tensor([30.0, 40.0]), mask, 2, seed=0, later=x)
    with pytest.raises(ValueError, match="one later scan"):
        ageing_batches(x, torch.tensor([30.0, 40.0]), mask, 2, seed=0, later=x[:1], target=torch.tensor([50.0]))
    with pytest.raises(ValueError, match=r"batch\['age'\]: expected ages"):
        longitudinal_step({"x": x, "mask": mask.float(), "y": x, "target": torch.ones(2)}, 0, model=_net(),
                          optimizer=torch.optim.SGD(_net().parameters(), 0.0))


def test_age_reader_is_frozen_and_passes_gradients_to_the_volumes():
    enc = Encoder3D(EncoderConfig(size=16, channels=(8, 8)))
    fake = SimpleNamespace(model=enc, targets={"age_mean": 50.0, "age_std": 20.0}, config=enc.cfg)
    reader = counterfactual.age_reader(fake)
    x = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    age = reader(x)
    assert age.shape == (2,)
    assert torch.allclose(age, enc(x)["age"] * 20 + 50)
    age.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    small = torch.rand(2, 1, 8, 8, 8)                                  # resampled to the encoder's 16³
    assert torch.allclose(reader(small), enc(torch.nn.functional.interpolate(small, size=(16,) * 3, mode="trilinear"))["age"] * 20 + 50)
    with pytest.raises(ValueError, match=r"the age reader takes volumes \(B, 1, D, H, W\)"):
        reader(torch.rand(2, 2, 16, 16, 16))


def test_load_scm_names_the_page_that_makes_the_cvae(tmp_path):
    cohort = SimpleNamespace(age=torch.tensor([30.0, 60.0]), ventricles=torch.tensor([10.0, 20.0]))
    with pytest.raises(FileNotFoundError, match=r"ch04_cvae_smoke\.pt: not found; .*gen3d run ch04_autoencoders"):
        counterfactual.load_scm(tmp_path, cohort, suffix="_smoke")
