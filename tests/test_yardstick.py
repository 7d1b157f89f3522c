"""The yardstick for generated volumes: its reference rows and the cached encoder (its metrics: test_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen3d_lessons.tasks import yardstick as Y
from gen3d_lessons.data.msd import Case, write_msd_dataset
from gen3d_lessons.data.nifti import spacing_affine
from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig

S = 16  # voxels per side of the test volumes


def smooth_volumes(n, seed, size=S):
    """n smooth random volumes (n, 1, size, size, size) in about [0, 1]."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.random((size,) * 3), 1.5) for _ in range(n)])
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(v[:, None].astype(np.float32))


# The reference rows -----------------------------------------------------------------------------

def test_mean_noise_baseline_matches_voxelwise_moments():
    train = smooth_volumes(6, seed=14)
    x = Y.mean_noise_baseline(train, 2000, rng=0)
    assert x.shape == (2000, 1, S, S, S)
    assert torch.allclose(x.mean(0), train.mean(0), atol=0.02)
    assert torch.allclose(x.std(0), train.std(0), atol=0.02)


# The encoder: train, cache, reload ----------------------------------------------------------------

def _tiny_brains(root: Path, bump_age: float = 0.0) -> Path:
    """8 cases of 16³ with the brain phantoms' attributes; intensity grows with age."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(8):
        age = 20.0 + 8 * i
        img = smooth_volumes(1, seed=100 + i)[0, 0].numpy() * (1 + age / 100)
        img = np.stack([img, img, img, img], axis=-1)                   # T1, T2, FLAIR, PD
        cases.append(Case(id=f"brain_{i:03d}", split="train" if i < 6 else "test", image=img.astype(np.float32),
                          affine=spacing_affine((2.0, 2.0, 2.0), (S, S, S)),
                          label=rng.integers(0, 4, (S, S, S)).astype(np.uint8),
                          attributes={"age": age + (bump_age if i == 0 else 0.0), "site": i % 3,
                                      "has_lesion": i % 2 == 0, "csf_ml": 50.0 + i, "gm_ml": 600.0 - 5 * i,
                                      "wm_ml": 500.0 + 2 * i}))
    return write_msd_dataset(root, cases, name="tiny", description="test brains",
                             modality={"0": "T1", "1": "T2", "2": "FLAIR", "3": "PD"},
                             labels={"0": "background", "1": "CSF", "2": "GM", "3": "WM"})


def test_encoder_shapes_and_config_checks():
    m = Encoder3D(EncoderConfig(size=S, feature_dim=16))
    out = m(torch.zeros(2, 1, S, S, S))
    assert m.features(torch.zeros(2, 1, S, S, S)).shape == (2, 16)
    assert out["age"].shape == (2,) and out["site"].shape == (2, 3) and out["volumes"].shape == (2, 3)
    with pytest.raises(ValueError, match="groups"):
        EncoderConfig(feature_dim=12)
    with pytest.raises(ValueError, match=r"x: expected \(B, 1"):
        m.features(torch.zeros(2, 2, S, S, S))


def test_encoder_trains_caches_reloads_and_evaluates(tmp_path):
    folder = _tiny_brains(tmp_path / "tiny")
    kw = dict(size=S, channels=("T1",), budget_s=None, max_steps=3, batch_size=4, cache_dir=tmp_path / "models",
              config=EncoderConfig(size=S, feature_dim=16, n_sites=3))
    enc = Y.load_or_train_encoder(folder, **kw)
    assert not enc.cached and enc.path.is_file() and enc.training["steps"] == 3
    assert {"age_mae", "site_acc", "lesion_acc", "age_mae_baseline"} <= set(enc.heldout)

    volumes = Y.load_volumes(folder, "test", size=S)
    again = Y.load_or_train_encoder(folder, **kw)                  # a cache hit: same file, same features
    assert again.cached and again.path == enc.path and again.heldout == enc.heldout
    np.testing.assert_allclose(again.features(volumes), enc.features(volumes), rtol=1e-6, atol=1e-6)

    # a changed manifest is a new data version: a new file, trained afresh
    changed = _tiny_brains(tmp_path / "changed" / "tiny", bump_age=1.0)
    v1, v2 = Y.data_version(folder, S, ("T1",)), Y.data_version(changed, S, ("T1",))
    assert v1["dataset"] == v2["dataset"] and v1["manifest_sha256"] != v2["manifest_sha256"]
    assert Y.data_version(folder, 32, ("T1",)) != v1
    other = Y.load_or_train_encoder(changed, **kw)
    assert not other.cached and other.path != enc.path

    # the entry point and the reference rows, on the tiny cohort
    train = Y.load_volumes(folder, "train", size=S)
    rows = Y.reference_rows(train, volumes, enc, rng=0)
    assert list(rows) == ["held-out real", "mean + noise", "copy of training"]
    assert rows["copy of training"]["mem_frac"] == 1.0 and rows["held-out real"]["mem_frac"] == 0.0
    assert set(Y.COLUMNS) <= set(rows["mean + noise"])
    assert list(Y.table(rows).columns) == list(Y.COLUMNS)
    one = Y.evaluate_samples(volumes, reference=train, train=train, heldout=volumes, encoder=enc)
    two = Y.evaluate_samples(torch.cat([volumes, volumes]), reference=train, train=train, heldout=volumes,
                             encoder=enc, set_size=len(volumes))
    assert two["n"] == len(volumes) and two["fd_sets"] == 2 and two["fd"] == pytest.approx(one["fd"])
    with pytest.raises(ValueError, match="set_size"):
        Y.evaluate_samples(volumes, reference=train, train=train, heldout=volumes, encoder=enc, set_size=1)
    with pytest.raises(ValueError, match="samples: expected shape"):
        Y.evaluate_samples(train[:, :, :8], reference=train, train=train, heldout=volumes, encoder=enc)
    bad = train.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="samples: contains"):
        Y.evaluate_samples(bad, reference=train, train=train, heldout=volumes, encoder=enc)


def test_encoder_training_is_deterministic_and_probe_follows_a_generator(tmp_path):
    folder = _tiny_brains(tmp_path / "tiny")
    kw = dict(size=S, channels=("T1",), budget_s=None, max_steps=4, batch_size=4,
              config=EncoderConfig(size=S, feature_dim=16, n_sites=3))
    a = Y.load_or_train_encoder(folder, cache_dir=tmp_path / "a", **kw)
    b = Y.load_or_train_encoder(folder, cache_dir=tmp_path / "b", **kw)      # trained again, elsewhere
    assert a.path.name == b.path.name and a.training["stopped_by"] == "max_steps"
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name

    class Fixed(torch.nn.Module):                    # a "generator" that returns training volumes
        def __init__(self, volumes):
            super().__init__()
            self.volumes, self.w = volumes, torch.nn.Parameter(torch.zeros(()))

        def sample(self, n, c=None, generator=None):
            return self.volumes[torch.randperm(len(self.volumes), generator=generator)[:n]]

    train = Y.load_volumes(folder, "train", size=S)
    probe = Y.fd_probe(a, train, n=4, seed=0)
    assert probe(Fixed(train))["fd"] == probe(Fixed(train))["fd"] >= 0      # the same codes every call
    assert probe(Fixed(train * 0 + 0.5))["fd"] > probe(Fixed(train))["fd"]
