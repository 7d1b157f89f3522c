"""Metrics against cases whose answer is known, and against scikit-image, SciPy and MONAI."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gen3d_lessons import metrics as M


def box(shape=(16, 16, 16), start=(4, 4, 4), size=(8, 8, 8), value=1):
    lab = np.zeros(shape, dtype=np.int64)
    lab[tuple(slice(s, s + n) for s, n in zip(start, size))] = value
    return lab


def smooth_volume(shape=(24, 24, 24), seed=0):
    """A smooth volume in [0, 1] with some structure, like a blurred phantom."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.random(shape), 2.0)
    return (v - v.min()) / (v.max() - v.min())


# Dice -----------------------------------------------------------------------------------------

def test_dice_identical_and_disjoint():
    a = box(value=2)
    assert M.dice(a, a, [2]) == {2: 1.0}
    b = box(start=(0, 0, 0), size=(4, 4, 4), value=2)
    assert M.dice(a, b, [2]) == {2: 0.0}


def test_dice_shifted_box_known_value():
    a, b = box(), box(start=(6, 4, 4))       # shifted by 2 of 8 voxels along x
    # overlap 6·8·8 over 2·512 voxels
    assert M.dice(a, b, [1])[1] == pytest.approx(2 * 6 * 64 / (2 * 512))


def test_dice_labels_forms_and_empty():
    t = box(value=1) + box(start=(0, 0, 0), size=(3, 3, 3), value=2)
    p = t.copy()
    p[p == 2] = 0
    d = M.dice(torch.from_numpy(p), torch.from_numpy(t), {"A": 1, "B": 2, "C": 3})
    assert list(d) == ["A", "B", "C"]
    assert d["A"] == 1.0 and d["B"] == 0.0 and math.isnan(d["C"])  # C is in neither map
    assert set(M.dice(p, t)) == {1, 2}                                # None: labels present


def test_dice_bad_inputs():
    with pytest.raises(ValueError, match="pred: shape"):
        M.dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), [1])
    with pytest.raises(ValueError, match="pred: expected an integer label map"):
        M.dice(np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), [1])
    with pytest.raises(ValueError, match="target: contains 1 NaN"):
        t = np.zeros((4, 4, 4))
        t[0, 0, 0] = np.nan
        M.dice(np.zeros((4, 4, 4)), t, [1])


# Surface distances -----------------------------------------------------------------------------

def test_hd95_assd_identical_is_zero():
    a = box()
    assert M.hd95(a, a, [1]) == {1: 0.0}
    assert M.assd(a, a, [1]) == {1: 0.0}


def test_hd_of_shifted_box_and_spacing():
    a, b = box(), box(start=(7, 4, 4))       # shifted by 3 voxels along axis 0
    h = M.hd95(a, b, [1])[1]
    assert h == pytest.approx(3.0)            # the faces perpendicular to the shift are 3 apart
    assert M.hd95(a, b, [1], spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(6.0)
    assert M.hd95(a, b, [1], spacing=(1.0, 5.0, 5.0))[1] == pytest.approx(3.0)
    s = M.assd(a, b, [1])[1]
    assert 0 < s < 3.0


def test_surface_empty_conventions():
    a, empty = box(), np.zeros((16, 16, 16), dtype=int)
    assert math.isinf(M.hd95(a, empty, [1])[1]) and math.isinf(M.assd(empty, a, [1])[1])
    r = M.hd95(a, a, [1, 2])
    assert r[1] == 0.0 and math.isnan(r[2])


def test_surface_bad_inputs():
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(box(), box(), [1], spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="pred: expected a 2D or 3D"):
        M.assd(box()[None, None], box()[None, None], [1])


def test_hd95_and_assd_match_monai():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.standard_normal((20, 18, 16)), 2)
    p, t = np.digitize(a, [-0.1, 0.05]), np.digitize(a + 0.3 * ndimage.gaussian_filter(rng.standard_normal(a.shape), 2),
                                                     [-0.1, 0.05])
    spacing = [1.0, 1.5, 2.3]
    one_hot = [torch.from_numpy(np.stack([m == v for v in (1, 2)])[None]).float() for m in (p, t)]   # (1, 2, *S)
    hd = compute_hausdorff_distance(*one_hot, include_background=True, percentile=95, spacing=spacing)[0]
    sd = compute_average_surface_distance(*one_hot, include_background=True, symmetric=True, spacing=spacing)[0]
    assert list(M.hd95(p, t, [1, 2], spacing=spacing).values()) == pytest.approx(hd.tolist(), rel=1e-6)
    assert list(M.assd(p, t, [1, 2], spacing=spacing).values()) == pytest.approx(sd.tolist(), rel=1e-6)


def test_score_segmentation_rows_in_a_box_and_checks():
    y = box(shape=(24, 24, 24), start=(4, 4, 4), size=(10, 10, 10)) + box(shape=(24, 24, 24), start=(16, 16, 16),
                                                                          size=(4, 4, 4), value=2)
    rows = M.score_segmentation(y, y, {"box": 1, "small": 2}, spacing=2.0)
    assert [r["class"] for r in rows] == ["box", "small"] and all(r["Dice"] == 1 and r["HD95"] == 0 for r in rows)
    shifted = np.roll(y, 2, axis=0)
    cut = M.score_segmentation(shifted, y, {"box": 1}, spacing=2.0)[0]          # scored inside a box
    assert cut["HD95"] == pytest.approx(M.hd95(shifted, y, labels=[1], spacing=2.0)[1])  # the same as on the full grid
    assert cut["ASSD"] == pytest.approx(M.assd(shifted, y, labels=[1], spacing=2.0)[1])
    assert cut["Dice"] == pytest.approx(M.dice(shifted, y, [1])[1])
    assert M.surface_distances(y == 1, y == 1) == (0.0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        M.score_segmentation(y, y[:-1], {"box": 1})


# Intensity metrics -------------------------------------------------------------------------------

def test_psnr_matches_skimage():
    y = smooth_volume()
    x = y + np.random.default_rng(1).normal(0, 0.05, y.shape)
    ours = M.psnr(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0)
    assert ours == pytest.approx(peak_signal_noise_ratio(y, x, data_range=1.0), rel=1e-9)
    assert M.psnr(x, y) == pytest.approx(peak_signal_noise_ratio(y, x, data_range=y.max() - y.min()))
    assert math.isinf(M.psnr(y, y))


def test_masked_psnr_rmse_nmse():
    y = smooth_volume()
    x = y.copy()
    x[:4] += 0.5                              # error only outside the mask
    mask = np.zeros(y.shape, bool)
    mask[8:] = True
    assert math.isinf(M.psnr(x, y, data_range=1.0, mask=mask))
    assert M.rmse(x, y, mask=mask) == 0.0
    assert M.rmse(x, y) == pytest.approx(math.sqrt(0.25 * 4 / 24))
    assert M.nmse(x, y, mask=mask) == 0.0
    assert M.nmse(2 * y, y) == pytest.approx(1.0)   # ||2y − y||² / ||y||²


def test_ssim_identical_noisy_and_skimage():
    y = smooth_volume((32, 32, 32))
    assert M.ssim(y, y, data_range=1.0) == pytest.approx(1.0)
    x = np.clip(y + np.random.default_rng(2).normal(0, 0.1, y.shape), 0, 1)
    ours = M.ssim(x, y, data_range=1.0)
    assert 0 < ours < 0.95
    ref, ref_map = structural_similarity(y, x, data_range=1.0, gaussian_weights=True,
                                         use_sample_covariance=False, full=True)
    # the local maps agree everywhere; skimage averages only 5 voxels away from the border
    our_map = M.ssim_map(x, y, data_range=1.0)
    np.testing.assert_allclose(our_map, ref_map, atol=1e-6)
    assert our_map[5:-5, 5:-5, 5:-5].mean() == pytest.approx(ref, abs=1e-6)
    assert ours == pytest.approx(ref, abs=0.05)   # the border voxels move the whole-volume mean a little


def test_ssim_mask_and_small_volumes():
    y = smooth_volume((16, 16, 16))
    x = y.copy()
    x[:3] = 0                                 # damage only outside the mask
    mask = np.zeros(y.shape, bool)
    mask[9:] = True
    assert M.ssim(x, y, data_range=1.0, mask=mask) == pytest.approx(1.0, abs=1e-6)
    assert M.ssim(x, y, data_range=1.0) < 0.99
    big = smooth_volume((64, 64, 64))
    assert M.ssim(torch.from_numpy(big).float(), torch.from_numpy(big).float()) == pytest.approx(1.0, abs=1e-5)


def test_intensity_bad_inputs():
    y = smooth_volume((8, 8, 8))
    with pytest.raises(ValueError, match="y: shape"):
        M.psnr(y, y[:4])
    bad = y.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        M.ssim(bad, y)
    with pytest.raises(ValueError, match="mask: selects no voxels"):
        M.rmse(y, y, mask=np.zeros(y.shape, bool))
    with pytest.raises(ValueError, match="data_range"):
        M.psnr(y, np.ones_like(y))
    with pytest.raises(ValueError, match="x: expected a 2D or 3D"):
        M.ssim(y[None, None], y[None, None])
    with pytest.raises(ValueError, match="y: is all zeros"):
        M.nmse(y, np.zeros_like(y))


# MMD ------------------------------------------------------------------------------------------------

def test_mmd_same_vs_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8))
    shifted = rng.normal(loc=1.0, size=(100, 8))
    same, diff = M.mmd(a, b), M.mmd(a, shifted)
    assert abs(same) < 0.02
    assert diff > 0.1 and diff > 10 * abs(same)
    assert M.mmd(torch.from_numpy(a), torch.from_numpy(shifted)) == pytest.approx(diff)


def test_mmd_known_value_and_inputs():
    # two points each, at 0 and 1 apart in 1D with sigma 1: compute the estimate by hand
    x, y = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    k1 = math.exp(-0.5)
    assert M.mmd(x, y, sigma=1.0) == pytest.approx(1 + 1 - 2 * k1)
    vols = np.random.default_rng(1).random((4, 2, 3, 3))      # (N, C, H, W) flattened per sample
    assert math.isfinite(M.mmd(vols, vols + 1))
    with pytest.raises(ValueError, match="y_feats: 3 features"):
        M.mmd(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="x_feats: needs at least 2"):
        M.mmd(np.zeros((1, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="sigma"):
        M.mmd(np.zeros((3, 2)), np.ones((3, 2)), sigma=0)


# Denoiser scores (chapter 11) ------------------------------------------------------------------

def ball_phantom(size=16, noise=0.1, seed=0):
    """(clean, noisy, mask) float64 volumes: a bright ball in a dim box, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    r = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    clean = np.where(r < size / 4, 0.9, np.where(r < size / 2.2, 0.4, 0.0))
    return clean, clean + noise * rng.normal(size=clean.shape), r < size / 2.2


def test_scores_known_values():
    clean, _, mask = ball_phantom()
    s = M.scores(clean + 0.1, clean, mask)
    assert s["rmse"] == pytest.approx(0.1) and s["psnr"] == pytest.approx(20.0)
    assert M.scores(clean, clean, mask)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal non-zero lengths"):
        M.mean_scores([clean], [], [mask])


def test_detail_scores_tell_blur_from_noise():
    clean, _, mask = ball_phantom()
    blurred = ndimage.gaussian_filter(clean, 1.0)
    textured = clean + 0.05 * np.random.default_rng(1).normal(size=clean.shape)
    b, t = M.detail_scores(blurred, clean, mask), M.detail_scores(textured, clean, mask)
    assert b["sharpness"] < 1 < t["sharpness"]               # blur removes variation, noise adds it
    assert b["rmse_edges"] > 2 * b["rmse_flat"]              # blur errs at edges ...
    assert t["rmse_flat"] == pytest.approx(0.05, rel=0.2)    # ... texture everywhere, flat tissue too
    assert t["rmse_edges"] == pytest.approx(t["rmse_flat"], rel=0.3)
    assert M.detail_scores(clean, clean, mask)["rmse_edges"] == 0
    with pytest.raises(ValueError, match="mask: shape"):
        M.detail_scores(clean, clean, mask[:-1])


def test_added_detail_separates_true_from_invented_detail():
    clean, _, mask = ball_phantom()
    base = ndimage.gaussian_filter(clean, 1.0)
    truth = M.added_detail(clean, base, clean, mask)        # adds exactly what base missed
    assert truth["toward_target_edges"] == pytest.approx(1.0) and truth["added_rms_edges"] > 0
    noise = base + 0.05 * np.random.default_rng(2).normal(size=clean.shape)
    invented = M.added_detail(noise, base, clean, mask)
    assert abs(invented["toward_target_flat"]) < 0.2 and invented["added_rms_flat"] == pytest.approx(0.05, rel=0.2)
    assert M.added_detail(base, base, clean, mask)["toward_target_flat"] == 0.0
    with pytest.raises(ValueError, match="selects 0 voxels"):
        M.added_detail(clean, base, clean, np.zeros_like(mask))


def test_line_profile():
    v = np.zeros((8, 8, 8))
    v[4:] = 1.0
    p = M.line_profile(v, (0, 4, 4), (7, 4, 4), n=8)
    assert np.allclose(p, [0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="three voxel coordinates"):
        M.line_profile(v, (0, 0), (1, 1))


# Generative: sets of samples -------------------------------------------------------------------

def gaussian(n, mean, std, seed):
    return np.random.default_rng(seed).normal(mean, std, size=(n, len(std)))


def smooth_volumes(n, seed, size=16):
    """n smooth random volumes (n, 1, size, size, size) in about [0, 1]."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.random((size,) * 3), 1.5) for _ in range(n)])
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(v[:, None].astype(np.float32))


# Fréchet distance -------------------------------------------------------------------------------

def test_fd_of_identical_sets_is_zero():
    a = gaussian(300, 0.0, [1.0, 2.0, 0.5, 1.0], seed=0)
    assert abs(M.frechet_distance(a, a)) < 1e-6


def test_fd_of_shifted_gaussians_matches_closed_form():
    # diagonal Gaussians: FD = ||mu_a - mu_b||² + sum (s_a - s_b)²
    s_a, s_b, mu_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5]), np.array([1.0, -2.0, 0.5])
    a, b = gaussian(40000, 0.0, s_a, seed=1), gaussian(40000, mu_b, s_b, seed=2)
    expected = mu_b @ mu_b + ((s_a - s_b) ** 2).sum()
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # and exactly the formula on the sample statistics, with a symmetric square root
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = linalg.sqrtm(c_a)
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r @ c_b @ r), 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    assert M.frechet_distance(a, b) == pytest.approx(d @ d + np.trace(c_a + c_b) - 2 * tr_root, rel=1e-8)


def test_fd_singular_covariances_fewer_samples_than_features():
    a, b = gaussian(10, 0.0, np.ones(32), seed=3), gaussian(10, 0.0, np.ones(32), seed=4)
    fd = M.frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # MONAI passes SciPy a deprecated argument
def test_fd_matches_monai():
    from monai.metrics import FIDMetric
    a, b = gaussian(200, 0.0, [1.0, 2.0, 0.5, 1.0], seed=20), gaussian(150, 0.3, [1.5, 1.0, 0.5, 2.0], seed=21)
    expected = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


# KID, MMD, 1-NN -----------------------------------------------------------------------------------

def test_unbiased_mmd_estimator_matches_monai_and_rbf_mmd_matches_scipy():
    from monai.metrics.mmd import compute_mmd
    from scipy.spatial.distance import cdist
    a, b = gaussian(30, 0.0, np.ones(5), seed=22), gaussian(30, 0.5, np.ones(5), seed=23)
    # the unbiased estimator behind KID, with MONAI's linear kernel: MONAI's MMD (equal sizes only)
    lin = M.mmd2_unbiased(a @ a.T, b @ b.T, a @ b.T)
    assert lin == pytest.approx(float(compute_mmd(torch.from_numpy(b), torch.from_numpy(a), None)), rel=1e-8)
    # RBF kernel with the median heuristic, written out with SciPy's distances
    pooled = np.concatenate([a, b])
    sigma = np.median(cdist(pooled, pooled)[np.triu_indices(len(pooled), 1)])
    k = lambda x, y: np.exp(-cdist(x, y, "sqeuclidean") / (2 * sigma ** 2))  # noqa: E731
    expected = M.mmd2_unbiased(k(a, a), k(b, b), k(a, b))
    assert M.mmd(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_on_whole_sets_is_the_unbiased_polynomial_mmd():
    from scipy.spatial.distance import cdist
    a, b = gaussian(20, 0.0, np.ones(3), seed=24), gaussian(20, 1.0, np.ones(3), seed=25)
    k = lambda x, y: (1.0 - cdist(x, y, lambda u, v: -(u @ v) / 3)) ** 3  # noqa: E731  (xᵀy/F + 1)³
    expected = M.mmd2_unbiased(k(a, a), k(b, b), k(a, b))
    mean, std = M.kid(a, b, subsets=3, subset_size=20)          # every subset is the whole set
    assert mean == pytest.approx(expected, rel=1e-8) and std == pytest.approx(0.0, abs=1e-12)


def test_one_nn_matches_a_scipy_nearest_neighbour_search():
    from scipy.spatial import cKDTree
    a, b = gaussian(40, 0.0, np.ones(3), seed=26), gaussian(25, 0.7, np.ones(3), seed=27)
    x, label = np.concatenate([a, b]), np.r_[np.zeros(40), np.ones(25)]
    _, idx = cKDTree(x).query(x, k=2)                            # the first neighbour is the point itself
    correct = label[idx[:, 1]] == label
    assert M.one_nn_accuracy(a, b) == pytest.approx(0.5 * (correct[:40].mean() + correct[40:].mean()))


def test_kid_and_mmd_near_zero_for_one_distribution_and_positive_when_shifted():
    a, b = gaussian(200, 0.0, np.ones(8), seed=5), gaussian(200, 0.0, np.ones(8), seed=6)
    c = gaussian(200, 1.0, np.ones(8), seed=7)
    same, same_std = M.kid(a, b, subsets=20, subset_size=100)
    shifted, _ = M.kid(a, c, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and same_std >= 0
    assert shifted > 0.5 and shifted > 10 * abs(same)
    assert abs(M.mmd(a, b)) < 0.02 and M.mmd(a, c) > 0.1


def test_one_nn_half_for_one_distribution_one_for_separated_low_for_copies():
    a, b = gaussian(300, 0.0, np.ones(2), seed=8), gaussian(300, 0.0, np.ones(2), seed=9)
    assert M.one_nn_accuracy(a, b) == pytest.approx(0.5, abs=0.07)
    assert M.one_nn_accuracy(a, b + 20.0) == 1.0
    assert M.one_nn_accuracy(a, a.copy()) == 0.0        # copies sit on their originals
    assert M.one_nn_accuracy(a[:30], a) < 0.45          # ... also when only some reals are copied
    # unequal sizes: balanced accuracy stays near 0.5
    assert M.one_nn_accuracy(a[:60], b) == pytest.approx(0.5, abs=0.1)


def test_feature_metrics_refuse_bad_input():
    a = gaussian(10, 0.0, np.ones(4), seed=10)
    with pytest.raises(ValueError, match="feats_b: 3 features"):
        M.frechet_distance(a, a[:, :3])
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.kid(a, bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.one_nn_accuracy(a[:1], a)


# MS-SSIM and memorisation -------------------------------------------------------------------------

def test_ms_ssim_identical_volumes_is_one_and_diversity_orders_sets():
    v = smooth_volumes(4, seed=11)
    assert torch.allclose(M.ms_ssim(v, v, data_range=1.0), torch.ones(4), atol=1e-5)
    copies = v[:1].repeat(4, 1, 1, 1, 1)
    assert M.ms_ssim_diversity(copies, data_range=1.0) == pytest.approx(1.0, abs=1e-5)
    assert M.ms_ssim_diversity(v, data_range=1.0) < 0.9
    with pytest.raises(ValueError, match="too small"):
        M.ms_ssim(v[:, :, :8, :8, :8], v[:, :, :8, :8, :8], 1.0)


def test_memorisation_flags_copies_and_not_heldout():
    train, heldout = smooth_volumes(12, seed=12), smooth_volumes(5, seed=13)
    copied = M.memorisation(train[:5], train, heldout)
    assert copied["mem_frac"] == 1.0 and copied["mem_ratio"] < 1e-3
    fresh = M.memorisation(heldout, train, heldout)
    assert fresh["mem_frac"] == 0.0 and fresh["mem_ratio"] == pytest.approx(1.0)
    near = M.memorisation(train[:5] + 0.01 * torch.randn_like(train[:5]), train, heldout)
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
    out = M.memorisation(samples, train, heldout)
    assert out["mem_ratio"] == pytest.approx(np.median(q_s) / np.median(q_h), rel=1e-6)
    assert out["mem_frac"] == pytest.approx((q_s < 0.5 * np.median(q_h)).mean())
    assert out["mem_median"] == pytest.approx(np.median(cdist(s, t).min(1)) / scale, rel=1e-6)
    assert M.memorisation_passed({"mem_frac": 0.0, "mem_ratio": 1.0})
    assert not M.memorisation_passed(M.memorisation(train[:4], train, heldout))
    from gen3d_lessons.metrics.generative import MemorisationCheck                 # the real brains fixed once
    check = MemorisationCheck(train, heldout)
    assert check(samples) == out and check(train[:4]) == M.memorisation(train[:4], train, heldout)
    with pytest.raises(ValueError, match="samples: 8 voxels"):
        check(torch.zeros(2, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="heldout: needs at least 2"):
        MemorisationCheck(train, heldout[:1])


def test_memorisation_does_not_mistake_blur_for_copying():
    train, heldout = smooth_volumes(12, seed=30), smooth_volumes(6, seed=31)
    average = train.mean(0, keepdim=True).repeat(6, 1, 1, 1, 1)     # close to every brain, a copy of none
    out = M.memorisation(average, train, heldout)
    assert M.memorisation_passed(out) and out["mem_frac"] == 0.0
    assert out["mem_median"] < out["mem_median_heldout"]            # nearer the training set than new volumes are


def test_ms_ssim_matches_monai_on_a_shifted_pair():
    from monai.metrics import MultiScaleSSIMMetric
    v = smooth_volumes(2, seed=18, size=32)
    w = torch.roll(v, 3, dims=2)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=5, weights=M.MS_SSIM_WEIGHTS)
    expected = metric(w, v)[:, 0]
    assert torch.allclose(M.ms_ssim(w, v, data_range=1.0), expected, atol=1e-6)
    assert (expected < 0.99).all()


# Detection: anomaly maps against lesion masks -----------------------------------------------------

def lesion_case():
    lesion = np.zeros((2, 8, 8, 8), dtype=bool)
    lesion[0, 2:4, 2:4, 2:4] = True
    brain = np.zeros_like(lesion)
    brain[:, 1:7, 1:7, 1:7] = True
    return lesion, brain


def test_metrics_of_perfect_inverted_and_random_maps():
    lesion, brain = lesion_case()
    perfect = M.voxel_metrics(lesion.astype(float), lesion, brain)
    assert perfect["auroc"] == 1 and perfect["auprc"] == 1 and perfect["best_dice"] == 1
    assert M.voxel_metrics(-lesion.astype(float), lesion, brain)["auroc"] == 0
    noise = np.random.default_rng(0).random(lesion.shape)
    random = M.voxel_metrics(noise, lesion, brain)
    assert abs(random["auroc"] - 0.5) < 0.15 and random["auprc"] < 0.2
    assert random["lesion_fraction"] == pytest.approx(8 / (2 * 216))


def test_best_dice_known_case():
    truth = np.array([1, 1, 0, 0, 0], dtype=bool)
    dice, t = M.best_dice(np.array([0.9, 0.2, 0.8, 0.1, 0.0]), truth)
    # thresholds: >= 0.9 -> P 1, R .5, Dice 2/3; >= 0.8 -> P .5, R .5, Dice .5; >= 0.2 -> P 2/3, R 1, Dice .8
    assert dice == pytest.approx(0.8) and t == pytest.approx(0.2)


def test_volume_level_auroc():
    lesion, brain = lesion_case()
    maps = np.zeros(lesion.shape)
    maps[0, 3, 3, 3] = 5.0                                                   # the lesioned volume scores higher
    assert M.volume_scores(maps, brain, top=0.01).tolist()[1] == 0
    assert M.detection.evaluate(maps, lesion, brain)["volume_auroc"] == 1
    assert np.isnan(M.detection.evaluate(maps, lesion, brain, has_lesion=[True, True])["volume_auroc"])


@pytest.mark.parametrize("change, match", [
    (dict(maps=np.zeros((2, 8, 8))), "one shape"),
    (dict(lesions=np.full((2, 8, 8, 8), 2)), "binary mask"),
    (dict(maps=np.full((2, 8, 8, 8), np.nan)), "NaN"),
    (dict(brains=np.zeros((2, 8, 8, 8))), "select no voxel"),
    (dict(lesions=np.zeros((2, 8, 8, 8))), "both lesion and healthy"),
    (dict(has_lesion=[True]), "has_lesion"),
])
def test_evaluate_rejects_bad_input(change, match):
    lesion, brain = lesion_case()
    args = dict(maps=np.zeros(lesion.shape), lesions=lesion, brains=brain) | change
    with pytest.raises(ValueError, match=match):
        M.detection.evaluate(**args)
