"""Metrics against cases whose answer is known, and against scikit-image."""

import math

import numpy as np
import pytest
import torch
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
