"""The yardstick for generated volumes: metrics on cases with known answers, and the cached encoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from gen3d_lessons.tasks import yardstick as Y
from gen3d_lessons.data.msd import Case, write_msd_dataset
from gen3d_lessons.data.nifti import spacing_affine
from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig

S = 16  # voxels per side of the test volumes


def gaussian(n, mean, std, seed):
    return np.random.default_rng(seed).normal(mean, std, size=(n, len(std)))


def smooth_volumes(n, seed, size=S):
    """n smooth random volumes (n, 1, size, size, size) in about [0, 1]."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.random((size,) * 3), 1.5) for _ in range(n)])
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(v[:, None].astype(np.float32))


# Fréchet distance -------------------------------------------------------------------------------

def test_fd_of_identical_sets_is_zero():
    a = gaussian(300, 0.0, [1.0, 2.0, 0.5, 1.0], seed=0)
    assert abs(Y.frechet_distance(a, a)) < 1e-6


def test_fd_of_shifted_gaussians_matches_closed_form():
    # diagonal Gaussians: FD = ||mu_a - mu_b||² + sum (s_a - s_b)²
    s_a, s_b, mu_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5]), np.array([1.0, -2.0, 0.5])
    a, b = gaussian(40000, 0.0, s_a, seed=1), gaussian(40000, mu_b, s_b, seed=2)
    expected = mu_b @ mu_b + ((s_a - s_b) ** 2).sum()
    assert Y.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # and exactly the formula on the sample statistics, with a symmetric square root
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = linalg.sqrtm(c_a)
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r @ c_b @ r), 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    assert Y.frechet_distance(a, b) == pytest.approx(d @ d + np.trace(c_a + c_b) - 2 * tr_root, rel=1e-8)


def test_fd_singular_covariances_fewer_samples_than_features():
    a, b = gaussian(10, 0.0, np.ones(32), seed=3), gaussian(10, 0.0, np.ones(32), seed=4)
    fd = Y.frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0
    assert Y.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # MONAI passes SciPy a deprecated argument
def test_fd_matches_monai():
    from monai.metrics import FIDMetric
    a, b = gaussian(200, 0.0, [1.0, 2.0, 0.5, 1.0], seed=20), gaussian(150, 0.3, [1.5, 1.0, 0.5, 2.0], seed=21)
    expected = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert Y.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


# KID, MMD, 1-NN -----------------------------------------------------------------------------------

def test_unbiased_mmd_estimator_matches_monai_and_rbf_mmd_matches_scipy():
    from monai.metrics.mmd import compute_mmd
    from scipy.spatial.distance import cdist
    a, b = gaussian(30, 0.0, np.ones(5), seed=22), gaussian(30, 0.5, np.ones(5), seed=23)
    # the unbiased estimator behind KID, with MONAI's linear kernel: MONAI's MMD (equal sizes only)
    lin = Y._mmd2_unbiased(a @ a.T, b @ b.T, a @ b.T)
    assert lin == pytest.approx(float(compute_mmd(torch.from_numpy(b), torch.from_numpy(a), None)), rel=1e-8)
    # RBF kernel with the median heuristic, written out with SciPy's distances
    pooled = np.concatenate([a, b])
    sigma = np.median(cdist(pooled, pooled)[np.triu_indices(len(pooled), 1)])
    k = lambda x, y: np.exp(-cdist(x, y, "sqeuclidean") / (2 * sigma ** 2))  # noqa: E731
    expected = Y._mmd2_unbiased(k(a, a), k(b, b), k(a, b))
    assert Y.mmd(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_on_whole_sets_is_the_unbiased_polynomial_mmd():
    from scipy.spatial.distance import cdist
    a, b = gaussian(20, 0.0, np.ones(3), seed=24), gaussian(20, 1.0, np.ones(3), seed=25)
    k = lambda x, y: (1.0 - cdist(x, y, lambda u, v: -(u @ v) / 3)) ** 3  # noqa: E731  (xᵀy/F + 1)³
    expected = Y._mmd2_unbiased(k(a, a), k(b, b), k(a, b))
    mean, std = Y.kid(a, b, subsets=3, subset_size=20)          # every subset is the whole set
    assert mean == pytest.approx(expected, rel=1e-8) and std == pytest.approx(0.0, abs=1e-12)


def test_one_nn_matches_a_scipy_nearest_neighbour_search():
    from scipy.spatial import cKDTree
    a, b = gaussian(40, 0.0, np.ones(3), seed=26), gaussian(25, 0.7, np.ones(3), seed=27)
    x, label = np.concatenate([a, b]), np.r_[np.zeros(40), np.ones(25)]
    _, idx = cKDTree(x).query(x, k=2)                            # the first neighbour is the point itself
    correct = label[idx[:, 1]] == label
    assert Y.one_nn_accuracy(a, b) == pytest.approx(0.5 * (correct[:40].mean() + correct[40:].mean()))


def test_kid_and_mmd_near_zero_for_one_distribution_and_positive_when_shifted():
    a, b = gaussian(200, 0.0, np.ones(8), seed=5), gaussian(200, 0.0, np.ones(8), seed=6)
    c = gaussian(200, 1.0, np.ones(8), seed=7)
    same, same_std = Y.kid(a, b, subsets=20, subset_size=100)
    shifted, _ = Y.kid(a, c, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and same_std >= 0
    assert shifted > 0.5 and shifted > 10 * abs(same)
    assert abs(Y.mmd(a, b)) < 0.02 and Y.mmd(a, c) > 0.1


def test_one_nn_half_for_one_distribution_one_for_separated_low_for_copies():
    a, b = gaussian(300, 0.0, np.ones(2), seed=8), gaussian(300, 0.0, np.ones(2), seed=9)
    assert Y.one_nn_accuracy(a, b) == pytest.approx(0.5, abs=0.07)
    assert Y.one_nn_accuracy(a, b + 20.0) == 1.0
    assert Y.one_nn_accuracy(a, a.copy()) == 0.0        # copies sit on their originals
    assert Y.one_nn_accuracy(a[:30], a) < 0.45          # ... also when only some reals are copied
    # unequal sizes: balanced accuracy stays near 0.5
    assert Y.one_nn_accuracy(a[:60], b) == pytest.approx(0.5, abs=0.1)


def test_feature_metrics_refuse_bad_input():
    a = gaussian(10, 0.0, np.ones(4), seed=10)
    with pytest.raises(ValueError, match="feats_b: 3 features"):
        Y.frechet_distance(a, a[:, :3])
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Y.kid(a, bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        Y.one_nn_accuracy(a[:1], a)


# MS-SSIM and memorisation -------------------------------------------------------------------------

def test_ms_ssim_identical_volumes_is_one_and_diversity_orders_sets():
    v = smooth_volumes(4, seed=11)
    assert torch.allclose(Y.ms_ssim(v, v, data_range=1.0), torch.ones(4), atol=1e-5)
    copies = v[:1].repeat(4, 1, 1, 1, 1)
    assert Y.ms_ssim_diversity(copies, data_range=1.0) == pytest.approx(1.0, abs=1e-5)
    assert Y.ms_ssim_diversity(v, data_range=1.0) < 0.9
    with pytest.raises(ValueError, match="too small"):
        Y.ms_ssim(v[:, :, :8, :8, :8], v[:, :, :8, :8, :8], 1.0)


def test_memorisation_flags_copies_and_not_heldout():
    train, heldout = smooth_volumes(12, seed=12), smooth_volumes(5, seed=13)
    copied = Y.memorisation(train[:5], train, heldout)
    assert copied["mem_frac"] == 1.0 and copied["mem_ratio"] < 1e-3
    fresh = Y.memorisation(heldout, train, heldout)
    assert fresh["mem_frac"] == 0.0 and fresh["mem_ratio"] == pytest.approx(1.0)
    near = Y.memorisation(train[:5] + 0.01 * torch.randn_like(train[:5]), train, heldout)
    assert near["mem_frac"] == 1.0 and near["mem_ratio"] < 0.2


def test_memorisation_distances_match_scipy_and_the_check_passes_or_fails():
    from scipy.spatial.distance import cdist
    train, heldout, samples = smooth_volumes(10, seed=15), smooth_volumes(4, seed=16), smooth_volumes(6, seed=17)
    t, h, s = (v.flatten(1).double().numpy() for v in (train, heldout, samples))
    scale = t.std() * math.sqrt(t.shape[1])
    d_hh = cdist(h, h)
    np.fill_diagonal(d_hh, np.inf)                                   # the nearest *other* held-out volume
    q_s = cdist(s, t).min(1) / cdist(s, h).min(1)
    q_h = cdist(h, t).min(1) / d_hh.min(1)
    out = Y.memorisation(samples, train, heldout)
    assert out["mem_ratio"] == pytest.approx(np.median(q_s) / np.median(q_h), rel=1e-6)
    assert out["mem_frac"] == pytest.approx((q_s < 0.5 * np.median(q_h)).mean())
    assert out["mem_median"] == pytest.approx(np.median(cdist(s, t).min(1)) / scale, rel=1e-6)
    assert Y.memorisation_passed({"mem_frac": 0.0, "mem_ratio": 1.0})
    assert not Y.memorisation_passed(Y.memorisation(train[:4], train, heldout))


def test_memorisation_does_not_mistake_blur_for_copying():
    train, heldout = smooth_volumes(12, seed=30), smooth_volumes(6, seed=31)
    average = train.mean(0, keepdim=True).repeat(6, 1, 1, 1, 1)     # close to every brain, a copy of none
    out = Y.memorisation(average, train, heldout)
    assert Y.memorisation_passed(out) and out["mem_frac"] == 0.0
    assert out["mem_median"] < out["mem_median_heldout"]            # nearer the training set than new volumes are


def test_ms_ssim_matches_monai_on_a_shifted_pair():
    from monai.metrics import MultiScaleSSIMMetric
    v = smooth_volumes(2, seed=18, size=32)
    w = torch.roll(v, 3, dims=2)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=5, weights=Y.MS_SSIM_WEIGHTS)
    expected = metric(w, v)[:, 0]
    assert torch.allclose(Y.ms_ssim(w, v, data_range=1.0), expected, atol=1e-6)
    assert (expected < 0.99).all()


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
