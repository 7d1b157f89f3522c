"""HA-GAN: shapes, seamless slabs, the two critics, bad config and input, a seeded run, the cost table."""

from __future__ import annotations

import math

import pytest
import torch

from gen3d_lessons.data.batches import Batches
from gen3d_lessons.models.hagan import (HAGANConfig, HAGANGenerator3D, SlabCritic3D, SlabCriticConfig,
                                        hagan_critics)
from gen3d_lessons.training.hagan import hagan_step, step_cost, train_hagan

S = 16      # edge of the test volumes; F is 4³, slabs 1 position = 4 slices


def small(**kw) -> HAGANGenerator3D:
    return HAGANGenerator3D(HAGANConfig(**{"size": S, "z_dim": 8, "channels": (8, 8, 4), "low": 4, "slab": 1, **kw}))


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed torch, and run on one thread: volumes this small gain nothing from more, and on a busy
    machine two threads can make the first steps (oneDNN's set-up per shape) several times slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The generator ------------------------------------------------------------------------------------

def test_views_have_their_shapes_and_range():
    g = small()
    z = torch.randn(3, 8)
    f = g.features(z)
    assert f.shape == (3, 8, 4, 4, 4)
    assert g.low(f).shape == (3, 1, 4, 4, 4)
    assert g.slab(f, 2).shape == (3, 1, 4, S, S)
    x = g(z)
    assert x.shape == (3, 1, S, S, S) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[:, :, 8:12], g.slab(f, 2))                  # forward stacks the slabs


def test_slabs_with_a_halo_join_without_seams():
    """Slab by slab with a one-position halo is exactly the whole of F decoded at once; without it, not."""
    z = torch.randn(2, 8)
    whole = small(slab=4)                                            # one slab: all of F
    for halo, exact in ((1, True), (0, False)):
        g = small(halo=halo)
        g.load_state_dict(whole.state_dict())                        # the slab settings own no weights
        with torch.no_grad():
            assert torch.allclose(g(z), whole(z), atol=1e-6) == exact


def test_sample_and_template():
    g = small(template=True)
    mean = torch.full((1, S, S, S), 0.3)
    assert g.set_template(mean) is g
    x = g.sample(2, generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 1, S, S, S) and x.device.type == "cpu" and g.training
    assert torch.equal(x, g.sample(2, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(torch.logit(torch.tensor(0.3)), g.template_low.flatten()[0])
    with pytest.raises(ValueError, match="template=False"):
        small().set_template(mean)


@pytest.mark.parametrize("kw, match", [
    (dict(size=24), "size 24 must be the last feature map's edge"),
    (dict(low=6), "low 6 must be one of the feature edges"),
    (dict(low=16), "smaller than size"),
    (dict(low=8, slab=3), "slab 3 must divide low 8"),
    (dict(halo=-1), "halo >= 0"),
    (dict(channels=()), "must be positive"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        HAGANConfig(**{"size": S, "channels": (8, 8, 4), "low": 4, "slab": 1, **kw})


def test_bad_input():
    g = small()
    with pytest.raises(ValueError, match=r"z: expected shape \(B, 8\)"):
        g(torch.randn(2, 7))
    f = g.features(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"start: expected an integer position of F in 0..3"):
        g.slab(f, 4)
    with pytest.raises(ValueError, match=r"features: expected shape \(B, 8, 4, 4, 4\)"):
        g.low(f[:, :4])
    with pytest.raises(ValueError, match="takes no condition"):
        g(torch.randn(2, 8), torch.zeros(2, 1))


# The critics --------------------------------------------------------------------------------------

def test_critics_judge_their_views_and_the_position():
    g = small()
    d_low, d_high = hagan_critics(g.cfg, channels=(4, 8))
    f = g.features(torch.randn(2, 8))
    s = g.slab(f, 1)                                                 # (2, 1, 4, 16, 16)
    assert d_low(g.low(f)).shape == (2,) and d_high(s, 4).shape == (2,)
    assert not torch.allclose(d_high(s, 0), d_high(s, 12))           # the position channel counts
    thin = SlabCritic3D(SlabCriticConfig(size=S, thickness=4, channels=(4, 8, 8)))
    assert thin.cfg.depths == (2, 1, 1) and thin(s, 4).shape == (2,)     # one slice thick: halve H and W only
    with pytest.raises(ValueError, match=r"x: expected a slab of shape \(B, 1, 4, 16, 16\)"):
        d_high(torch.rand(2, 1, S, S, S), 0)
    with pytest.raises(ValueError, match=r"position: expected the slab's first slice in 0..12"):
        d_high(s, 13)
    with pytest.raises(ValueError, match="size 12 must be a multiple"):
        SlabCritic3D(SlabCriticConfig(size=12, thickness=4, channels=(4, 8, 8)))
    with pytest.raises(ValueError, match=r"D_L judges 4³ cubes"):
        hagan_critics(g.cfg, channels=(4, 8, 8))


# Training -----------------------------------------------------------------------------------------

def _run(steps: int = 3):
    torch.manual_seed(0)
    g = small(template=True).set_template(torch.full((1, S, S, S), 0.4))
    d_low, d_high = hagan_critics(g.cfg, channels=(4, 8))
    batches = Batches({"image": torch.rand(6, 1, S, S, S, generator=torch.Generator().manual_seed(0))}, 2, seed=0)
    return train_hagan(g, d_low, d_high, batches, max_steps=steps, seed=0, desc="test", probe_every=2,
                       probe=lambda G: {"fd": float(G.sample(1, generator=torch.Generator().manual_seed(0)).mean())},
                       keep_best="fd")


def test_train_hagan_is_seeded():
    (g1, h1), (g2, h2) = _run(), _run()
    assert h1.steps == 3 and {"d_loss", "g_loss", "w_low", "w_high", "gp", "fd"} <= set(h1.values)
    assert all(math.isfinite(v) for v in h1.values["d_loss"] + h1.values["g_loss"])
    assert h1.values == h2.values
    assert torch.equal(g1.sample(2, generator=torch.Generator().manual_seed(3)),
                       g2.sample(2, generator=torch.Generator().manual_seed(3)))
    assert not g1.training


def test_hagan_step_refuses_a_wrong_batch():
    g = small()
    d_low, d_high = hagan_critics(g.cfg, channels=(4, 8))
    opt = torch.optim.Adam(g.parameters())
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected shape \(B, 1, 16, 16, 16\)"):
        hagan_step({"image": torch.rand(2, 1, 8, 8, 8)}, 0, generator=g, critic_low=d_low, critic_high=d_high,
                   opt_g=opt, opt_d=opt)


def test_step_cost_hagan_needs_less_memory_at_64():
    table = step_cost((64,), width=8, batch=1, steps=1, timed_up_to=32)   # 64³: memory only, no timing
    assert list(table["model"]) == ["full-resolution GAN", "HA-GAN"] and list(table["size"]) == [64, 64]
    full, ha = table["activations (MB)"]
    assert 0 < ha < full / 2 and table["seconds per step"].isna().all()
    with pytest.raises(ValueError, match="powers of two"):
        step_cost((48,))


def test_save_and_load(tmp_path):
    from gen3d_lessons.training import load_model, save_model
    g = small(template=True)
    path = save_model(tmp_path / "hagan.pt", g, g.cfg)
    back = load_model(path, lambda c: HAGANGenerator3D(HAGANConfig(**c)))
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert back.cfg == g.cfg and torch.equal(back(z), g.eval()(z))
