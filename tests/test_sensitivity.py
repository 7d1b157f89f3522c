"""Known damage of known strength (tasks/sensitivity.py): the proof that the yardstick measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig
from gen3d_lessons.tasks import sensitivity as S
from gen3d_lessons.tasks import yardstick as Y


def brains(n: int, seed: int, size: int = 12) -> torch.Tensor:
    """n smooth 'heads' (n, 1, size³): a bright ball with texture on a zero background."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    r = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    ball = (r < size / 3).astype(float)
    out = [ball * (0.5 + 0.5 * gaussian_filter(rng.random((size,) * 3), 1.0)) for _ in range(n)]
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


def test_each_damage_does_what_it_says():
    x = brains(4, 0)
    assert torch.equal(S.damage(x, "noise", 0.0), x)
    assert S.damage(x, "blur", 1.5).var() < x.var()
    noisy = S.damage(x, "noise", 0.1, seed=3)
    assert torch.equal(noisy, S.damage(x, "noise", 0.1, seed=3))             # seeded
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.05)
    biased = S.damage(x, "bias field", 0.2)
    ratio = biased[x > 0] / x[x > 0]
    assert (ratio > 0).all() and ratio.log().std().item() == pytest.approx(0.2, rel=0.5)
    shifted = S.damage(x, "intensity shift", 0.1)
    assert torch.allclose(shifted[x > 0.1] - x[x > 0.1], torch.tensor(0.1)) and torch.equal(shifted[x == 0], x[x == 0])
    with pytest.raises(ValueError, match="kind"):
        S.damage(x, "sharpen", 1.0)
    with pytest.raises(ValueError, match="strength"):
        S.damage(x, "blur", -1.0)
    with pytest.raises(ValueError, match="x: expected"):
        S.damage(x[0], "blur", 1.0)


def test_damage_sets_replace_the_first_brains_of_the_set():
    base, train = brains(4, 1), brains(6, 2)
    site = brains(4, 3)
    sets = S.damage_sets(base, {"one site": site}, train, seed=0)
    assert next(iter(sets)) == ("none", 0.0)
    assert len(sets) == 1 + sum(map(len, S.IMAGE_DAMAGE.values())) + 2 * 4      # one site and copies
    half = sets[("one site", 0.5)]
    assert torch.equal(half[:2], site[:2]) and torch.equal(half[2:], base[2:])
    copies = sets[("copies of training", 1.0)]
    assert all(any(torch.equal(c, t) for t in train) for c in copies)
    assert len({c.sum().item() for c in copies}) == 4                          # distinct training brains
    with pytest.raises(ValueError, match="modes"):
        S.damage_sets(base, {"one site": site[:3]}, train)
    with pytest.raises(ValueError, match="train"):
        S.damage_sets(base, {}, train[:3])


def test_rank_check_counts_the_steps_that_went_up():
    idx = pd.MultiIndex.from_tuples([("none", 0.0), ("blur", 1.0), ("blur", 2.0), ("noise", 1.0), ("noise", 2.0)],
                                    names=["damage", "strength"])
    t = pd.DataFrame({"fd": [1.0, 2.0, 3.0, 2.0, 1.5], "kid": [0.0, 1.0, 2.0, 1.0, 2.0]}, index=idx)
    r = S.rank_check(t, metrics=("fd", "kid"), damages=("blur", "noise", "absent"))
    assert r.loc["blur", "fd"] == 1.0 and r.loc["noise", "fd"] == 0.5 and r.loc["noise", "kid"] == 1.0
    assert list(r.index) == ["blur", "noise"] and r.attrs["all"] == pytest.approx(7 / 8)
    strict = S.rank_check(t, metrics=("fd",), damages=("blur",), margin={"fd": 1.5})   # a rise of 1 is within noise
    assert strict.loc["blur", "fd"] == 0.0


def test_sensitivity_table_scores_every_set_in_every_encoder():
    size = 12
    cfg = EncoderConfig(size=size, feature_dim=16, channels=(8, 16))
    enc = Y.YardstickEncoder(Encoder3D(cfg).eval(), cfg, {}, {}, {}, {}, Path("unused.pt"))
    base, ref, train = brains(5, 4), brains(8, 5), brains(6, 6)
    sets = {k: v for k, v in S.damage_sets(base, {}, train).items() if k[0] in ("none", "blur", "copies of training")}
    t = S.sensitivity_table(sets, reference=ref, train=train, heldout=ref, ms_ssim_pairs=4,
                            encoders={"trained": enc, "random": Y.random_encoder(enc, seed=2)})
    assert list(t.columns) == ["fd", "kid", "mmd", "one_nn", "one_nn (train)", "fd (random)", "ms_ssim", "mem_ratio",
                               "mem_frac"]
    copies = t.loc[("copies of training", 1.0)]
    assert copies["mem_frac"] == 1.0 and t.loc[("none", 0.0), "mem_frac"] < 1.0 and copies["one_nn (train)"] == 0.0
    assert t.attrs["encoder"] == "trained" and 0 < t.attrs["ms_ssim_real"] <= 1
    assert np.isfinite(t.to_numpy(dtype=float)).all()
    said = S.summary(t)
    assert said["flagged"] and said["copy_mem"] == 1.0 and said["copy_1nn"] == 0.0
    assert said["ms_blur"] == t.loc[("blur", 2.0), "ms_ssim"] and np.isnan(said["ms_site"])
    with pytest.raises(ValueError, match="encoders"):
        S.sensitivity_table(sets, reference=ref, train=train, heldout=ref, encoders={})


def test_floor_spread_is_the_noise_of_fd_between_real_sets():
    size = 12
    cfg = EncoderConfig(size=size, feature_dim=16, channels=(8, 16))
    enc = Y.YardstickEncoder(Encoder3D(cfg).eval(), cfg, {}, {}, {}, {}, Path("unused.pt"))
    real = brains(20, 7)
    a, b = S.floor_spread(enc, real, n=6, seed=0), S.floor_spread(enc, real, n=6, seed=0)
    assert a == b and a["mean"] > 0 and a["std"] > 0
    with pytest.raises(ValueError, match="n: expected"):
        S.floor_spread(enc, real, n=19)
