"""Registration: VoxelMorph, its loss and step, the per-pair optimisers, register() and its checks, and the
evaluation of chapter 13 (scores, timing, the optimiser's curve, volume change) with its figures."""

import time
from functools import partial

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gen3d_lessons import losses, spatial, viz  # noqa: E402
from gen3d_lessons.baselines.registration import AffineFit, matrix_to_theta, register_affine, theta_to_matrix  # noqa: E402
from gen3d_lessons.data.datasets import load_case, read_dataset  # noqa: E402
from gen3d_lessons.data.heart import make_heart_dataset  # noqa: E402
from gen3d_lessons.models.registration import RegistrationConfig, VoxelMorph, similarity_force  # noqa: E402
from gen3d_lessons.tasks.register import (Atlas, CinePairs, OptimiserMatch, Registered, brain_atlas,  # noqa: E402
                                          cine_pairs, folding_by_parametrisation, folding_scores, iterative_path,
                                          match_numbers, mean_jacobian, network_displacement, optimiser_curve, optimiser_match,
                                          register, register_iterative, score_fields, seconds_per_pair, timed_batch,
                                          registration_metrics, volume_change, volume_change_summary, warp_labels)
from gen3d_lessons.training import load_model, save_model  # noqa: E402
from gen3d_lessons.training.registration import (RegistrationLoss, atlas_batches, pair_batches,  # noqa: E402
                                                 registration_step, train_registration)

N = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blob(shift=(0.0, 0.0, 0.0), n: int = N) -> torch.Tensor:
    """A smooth ball (1, 1, n, n, n), its centre moved by ``shift`` voxels: something to register."""
    x = spatial.identity_grid((n, n, n))[0]                                  # (3, n, n, n)
    centre = torch.tensor([(n - 1) / 2 + s for s in shift]).view(3, 1, 1, 1)
    r = (x - centre).pow(2).sum(0).sqrt()
    return torch.sigmoid((n / 4 - r) / 1.0)[None, None]


def _net(**kw) -> VoxelMorph:
    torch.manual_seed(0)
    return VoxelMorph(RegistrationConfig(features=(4, 8, 8), **kw))


# 1. The network -----------------------------------------------------------------------------------

@pytest.mark.parametrize("diffeomorphic", [False, True])
@pytest.mark.parametrize("flow_level", [0, 1, 2])
def test_voxelmorph_shapes_and_identity_start(diffeomorphic, flow_level):
    net = _net(diffeomorphic=diffeomorphic, flow_level=flow_level)
    moving, fixed = torch.rand(2, 1, N, N, N, generator=_gen(0)), torch.rand(2, 1, N, N, N, generator=_gen(1))
    out = net(moving, fixed)
    coarse = N // 2 ** flow_level
    assert out.field.shape == (2, 3, coarse, coarse, coarse)
    assert out.displacement.shape == (2, 3, N, N, N) and out.warped.shape == moving.shape
    # the head starts near zero, so an untrained network is (almost) the identity map
    assert out.displacement.abs().max() < 1e-2
    assert torch.allclose(out.warped, moving, atol=1e-2)


def test_voxelmorph_rejects_bad_shapes_and_configs():
    net = _net()
    with pytest.raises(ValueError, match="one shape"):
        net(torch.zeros(1, 1, N, N, N), torch.zeros(1, 1, N, N, N - 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 10, 10, 10), torch.zeros(1, 1, 10, 10, 10))
    with pytest.raises(ValueError, match="one shape"):
        net(torch.zeros(1, 2, N, N, N), torch.zeros(1, 2, N, N, N))         # in_channels is 1
    with pytest.raises(ValueError, match="flow_level"):
        RegistrationConfig(features=(4, 8), flow_level=2)
    with pytest.raises(ValueError, match="features"):
        RegistrationConfig(features=(4,))


def test_velocity_field_is_integrated_by_scaling_and_squaring():
    """A large velocity folds space when used as a displacement, but not once exponentiated."""
    v = spatial.smooth_random_field((1, 3, 8, 8, 8), 1.0, 1.5, _gen(2))
    net = _net(diffeomorphic=True, flow_level=1)
    u_diffeo = net.field_to_displacement(v, (N, N, N))
    u_plain = spatial.resize_displacement(v, (N, N, N))
    assert torch.allclose(u_diffeo, spatial.resize_displacement(spatial.integrate_velocity(v, 7), (N, N, N)))
    fold = lambda u: (spatial.jacobian_determinant(u) <= 0).float().mean().item()   # noqa: E731
    assert fold(u_plain) > 0.01 and fold(u_diffeo) < fold(u_plain) / 5


def test_similarity_force_points_downhill():
    """A small step along the force lowers the squared difference (it is minus the gradient)."""
    moving, fixed = _blob(), _blob(shift=(1.0, 0.0, 0.0))
    force = similarity_force(moving, fixed)
    assert force.shape == (1, 6, N, N, N)
    raw, demons = force[:, :3], force[:, 3:]
    before = (fixed - moving).pow(2).sum()
    after = (fixed - spatial.warp(moving, 0.05 * raw)).pow(2).sum()
    assert after < before
    assert demons.norm(dim=1).max() <= 0.5 + 1e-4          # |F| / (|∇m|² + d²) <= 1 / (2 |...|) by AM-GM
    net_pull = raw.sum(dim=(2, 3, 4))[0]                                 # the blob must move +1 along D: u < 0
    assert net_pull[0] < 0 and net_pull[1:].abs().max() < 1e-3 * net_pull[0].abs()


def test_force_input_and_cascade_variant():
    net = _net(diffeomorphic=True, force_input=True, cascade=3)
    assert net.down[0][0].in_channels == 2 + 6
    moving, fixed = _blob(), _blob(shift=(1.0, 0.0, 0.0))
    out = net(moving, fixed)
    assert out.displacement.shape == (1, 3, N, N, N) and out.warped.shape == moving.shape
    assert torch.allclose(out.warped, moving, atol=1e-2)                 # still the identity at the start
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.25, 0.0, 0.0]))              # each pass: a constant shift of 0.5 voxel
    u = net(moving, fixed).displacement                                  # (coarse voxels are 2 fine ones here)
    assert torch.allclose(u[:, 0, 4:-4, 4:-4, 4:-4], torch.full((8, 8, 8), 3 * 0.25 * (N - 1) / (N // 2 - 1)), atol=0.05)
    with pytest.raises(ValueError, match="cascade"):
        RegistrationConfig(cascade=0)


def test_save_and_load_round_trip(tmp_path):
    net = _net(diffeomorphic=True, norm=True)
    with torch.no_grad():
        net.head.weight.normal_(std=0.1)                                    # a field that is not zero
    path = save_model(tmp_path / "vxm.pt", net, net.cfg)
    again = load_model(path, lambda c: VoxelMorph(RegistrationConfig(**c)))
    x, y = torch.rand(1, 1, N, N, N, generator=_gen(3)), torch.rand(1, 1, N, N, N, generator=_gen(4))
    net.eval()
    assert torch.allclose(net(x, y).displacement, again(x, y).displacement, atol=1e-6)


# 2. The loss and the training step ----------------------------------------------------------------

def test_registration_loss_on_known_cases():
    x = torch.rand(1, 1, 8, 8, 8, generator=_gen(5))
    zero = torch.zeros(1, 3, 8, 8, 8)
    for sim in ("mse", "ncc"):
        terms = RegistrationLoss(similarity=sim)(x, x, zero)
        assert terms["loss"].item() == pytest.approx(0.0, abs=1e-3)
    shift = zero.clone()
    shift[:, 0] = 2.0                                                       # constant: no gradient, no bending
    assert RegistrationLoss(regulariser="gradient")(x, x, shift)["smoothness"].item() == 0.0
    ramp = spatial.identity_grid((8, 8, 8)) * 0.1                           # affine: bends nothing, stretches
    assert RegistrationLoss(regulariser="bending")(x, x, ramp)["smoothness"].item() == pytest.approx(0.0, abs=1e-7)
    assert RegistrationLoss(regulariser="gradient")(x, x, ramp)["smoothness"].item() > 0
    with pytest.raises(ValueError, match="fixed_labels"):
        RegistrationLoss(dice=1.0)(x, x, zero)
    with pytest.raises(ValueError, match="similarity"):
        RegistrationLoss(similarity="mi")
    with pytest.raises(ValueError, match="weights"):
        RegistrationLoss(smoothness=-1.0)


@pytest.mark.parametrize("dice", [0.0, 1.0])
def test_registration_step_reaches_every_parameter_and_lowers_the_loss(dice):
    net = _net(diffeomorphic=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    moving, fixed = _blob(), _blob(shift=(1.5, 0.0, -1.0))
    labels = lambda img: torch.cat([1 - (img > 0.5).float(), (img > 0.5).float()], 1)   # noqa: E731
    batch = {"moving": moving, "fixed": fixed, "moving_labels": labels(moving), "fixed_labels": labels(fixed)}
    loss_fn = RegistrationLoss(smoothness=0.01, dice=dice)
    step = partial(registration_step, model=net, optimizer=optimizer, loss_fn=loss_fn)
    first = step(batch, 0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.head.weight.grad.abs().sum() > 0
    assert ("dice_loss" in first) == (dice > 0)
    for i in range(1, 31):
        last = step(batch, i)
    assert last["loss"] < first["loss"]


def test_atlas_batches_pair_the_atlas_with_random_subjects():
    atlas, atlas_p = torch.rand(1, 2, 8, 8, 8), torch.rand(1, 3, 8, 8, 8)
    images, labels = torch.rand(5, 2, 8, 8, 8), torch.randint(0, 3, (5, 8, 8, 8))
    batches = atlas_batches(atlas, atlas_p, images, labels, batch_size=3, generator=_gen(0))
    b = next(iter(batches))
    assert b["moving"].shape == (3, 2, 8, 8, 8) and b["fixed"].shape == (3, 2, 8, 8, 8)
    assert b["moving_labels"].shape == (3, 3, 8, 8, 8) and b["fixed_labels"].shape == (3, 3, 8, 8, 8)
    assert torch.equal(b["fixed_labels"].sum(1), torch.ones(3, 8, 8, 8))   # one-hot
    with pytest.raises(ValueError, match="labels"):
        atlas_batches(atlas, atlas_p, images, labels[:4], batch_size=3)


def test_pair_batches_keep_pairs_together():
    moving = torch.arange(5.0).view(5, 1, 1, 1, 1).expand(5, 1, 4, 4, 4)
    fixed, labels = moving + 10, torch.rand(5, 3, 4, 4, 4)
    b = next(pair_batches(moving, fixed, labels, labels, batch_size=4, generator=_gen(0)))
    assert b["moving"].shape == (4, 1, 4, 4, 4) and b["fixed_labels"].shape == (4, 3, 4, 4, 4)
    assert torch.equal(b["fixed"], b["moving"] + 10)                     # the i-th moving goes with the i-th fixed
    with pytest.raises(ValueError, match="fixed"):
        pair_batches(moving, fixed[:4], labels, labels, batch_size=2)
    with pytest.raises(ValueError, match="fixed_labels"):
        pair_batches(moving, fixed, labels, labels[:, :, :2], batch_size=2)


# 3. The classical optimisers and warp_labels --------------------------------------------------------

def test_iterative_registration_recovers_a_shift_without_folding():
    moving, fixed = _blob(), _blob(shift=(1.5, 0.0, -1.0))
    u = register_iterative(moving, fixed, RegistrationLoss(smoothness=0.01), grid=8, steps=60, lr=0.1)
    before = F.mse_loss(moving, fixed).item()
    after = F.mse_loss(spatial.warp(moving, u), fixed).item()
    assert after < 0.25 * before
    centre = u[0, :, N // 2, N // 2, N // 2]
    assert centre[0] < -0.7 and centre[2] > 0.4                            # fixed(x) = moving(x - shift)
    assert (spatial.jacobian_determinant(u) > 0).all()
    with pytest.raises(ValueError, match="labels"):
        register_iterative(moving, fixed, RegistrationLoss(dice=1.0))


def test_iterative_path_keeps_every_shorter_run_on_the_way():
    moving, fixed = _blob(), _blob(shift=(1.5, 0.0, -1.0))
    loss = RegistrationLoss(smoothness=0.01)
    path = iterative_path(moving, fixed, loss, at_steps=(10, 0, 3), grid=8, lr=0.1)
    assert [s.step for s in path] == [0, 3, 10]
    assert torch.equal(path[0].displacement, torch.zeros(1, 3, N, N, N))        # step 0: the identity map
    assert path[0].seconds <= path[1].seconds <= path[2].seconds
    assert torch.allclose(path[1].displacement, register_iterative(moving, fixed, loss, grid=8, lr=0.1, steps=3), atol=1e-6)
    with pytest.raises(ValueError, match="at_steps"):
        iterative_path(moving, fixed, loss, at_steps=())


def test_affine_registration_recovers_a_translation():
    moving, fixed = _blob(), _blob(shift=(2.0, -1.0, 0.0))
    fit = register_affine(moving, fixed, steps=80, lr=0.02)
    assert isinstance(fit, AffineFit)
    assert torch.allclose(fit.matrix[0, :, 3], torch.tensor([-2.0, 1.0, 0.0]), atol=0.4)
    assert fit.displacement.shape == (1, 3, N, N, N) and fit.theta.shape == (1, 3, 4)
    # fitted on volumes shrunk twice, the map comes back in the full grid's voxels
    half = register_affine(moving, fixed, steps=80, lr=0.02, blur_vox=0.0, shrink=2)
    assert torch.allclose(half.matrix[0, :, 3], torch.tensor([-2.0, 1.0, 0.0]), atol=0.5)


def test_affine_registration_in_normalised_coordinates_recovers_a_known_theta():
    # chapter 10's convention: F.affine_grid's theta, global NCC, a contrast change between the two
    fixed = _blob(n=24)
    theta_true = torch.tensor([[[1.0, 0, 0, 0.15], [0, 1.0, 0, -0.1], [0, 0, 1.0, 0.0]]])
    grid = F.affine_grid(theta_true, [1, 1, 24, 24, 24], align_corners=False)
    moving = 2.0 * F.grid_sample(fixed, grid, align_corners=False) + 0.3
    # moving(p) = fixed(A p): the map that brings moving onto fixed is A's inverse
    fit = register_affine(moving, fixed, similarity="global_ncc", steps=150, lr=0.02, blur_vox=0.0,
                          resample="affine_grid")
    assert torch.allclose(fit.theta[0, :, 3], torch.tensor([-0.15, 0.1, 0.0]), atol=0.04)
    # the same map as a voxel matrix: a shift of theta_t half-widths (12 voxels), axes in (D, H, W) order
    assert torch.allclose(fit.matrix[0, :, 3], 12 * fit.theta[0, :, 3].flip(0))


def test_affine_forms_agree_theta_matrix_round_trip_and_both_resamplers():
    shape = (12, 16, 20)                                              # not a cube: the axes must not mix up
    theta = torch.tensor([[[1.05, 0.02, -0.03, 0.10], [0.01, 0.97, 0.04, -0.05], [0.02, -0.01, 1.02, 0.08]]])
    matrix = theta_to_matrix(theta, shape)
    assert torch.allclose(matrix_to_theta(matrix, shape), theta, atol=1e-6)
    x = torch.rand(1, 2, *shape, generator=_gen(3))
    by_grid = F.grid_sample(x, F.affine_grid(theta, [1, 2, *shape], align_corners=False), align_corners=False)
    by_warp = spatial.warp(x, spatial.affine_displacement(matrix, shape))
    assert torch.allclose(by_grid, by_warp, atol=1e-5)
    # each resampler's fit, in the three forms, describes one map
    moving, fixed = _blob(), _blob(shift=(1.0, 0.5, -1.0))
    for resample in ("warp", "affine_grid"):
        fit = register_affine(moving, fixed, steps=20, resample=resample, blur_vox=0.0)
        assert torch.allclose(fit.displacement, spatial.affine_displacement(fit.matrix, (N, N, N)))
        assert torch.allclose(matrix_to_theta(fit.matrix, (N, N, N)), fit.theta, atol=1e-6)


def test_affine_registration_refuses_bad_options():
    moving, fixed = _blob(), _blob(shift=(1.0, 0.0, 0.0))
    for kwargs, match in (({"similarity": "mi"}, "similarity"), ({"resample": "nearest"}, "resample"),
                          ({"shrink": 3}, "shrink"), ({"smoothness": 0.1, "resample": "affine_grid"}, "smoothness")):
        with pytest.raises(ValueError, match=match):
            register_affine(moving, fixed, steps=1, **kwargs)
    with pytest.raises(ValueError, match="fixed"):
        register_affine(moving, fixed[..., :-1], steps=1)


def test_global_ncc_ignores_gain_and_offset_per_image():
    a = torch.rand(2, 1, 8, 8, 8, generator=_gen(4))
    b = torch.rand(2, 1, 8, 8, 8, generator=_gen(5))
    assert losses.global_ncc(a, 3.0 * a + 1.0).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.global_ncc(a, -a).item() == pytest.approx(-1.0, abs=1e-6)
    both = losses.global_ncc(a, b).item()                               # the mean of the two pairs' NCC
    assert both == pytest.approx((losses.global_ncc(a[:1], b[:1]) + losses.global_ncc(a[1:], b[1:])).item() / 2)
    with pytest.raises(ValueError, match="warped: shape"):
        losses.global_ncc(a, b[:1])


def test_folding_fraction_counts_folded_voxels():
    assert spatial.folding_fraction(torch.zeros(2, 3, 6, 6, 6)).tolist() == [0.0, 0.0]
    flip = -2 * spatial.identity_grid((6, 6, 6))[:, :1].expand(1, 1, 6, 6, 6)   # x -> -x along the first axis
    u = torch.cat([flip, torch.zeros(1, 2, 6, 6, 6)], 1)
    assert spatial.folding_fraction(u).item() == 1.0


def test_warp_labels_keeps_labels_under_identity_and_needs_num_classes():
    labels = torch.randint(0, 4, (2, 1, 8, 8, 8), generator=_gen(6))
    zero = torch.zeros(2, 3, 8, 8, 8)
    assert torch.equal(warp_labels(labels, zero, num_classes=4), labels[:, 0])
    with pytest.raises(ValueError, match="num_classes"):
        warp_labels(labels, zero)


# 4. register(): the public helper ------------------------------------------------------------------

def _pair() -> tuple[np.ndarray, np.ndarray]:
    return _blob()[0, 0].numpy(), _blob(shift=(1.0, 0.0, 0.0))[0, 0].numpy()


def test_register_with_a_model_and_with_the_optimiser():
    moving, fixed = _pair()
    labels = (moving > 0.5).astype(np.uint8)
    out = register(moving, fixed, _net(diffeomorphic=True), moving_labels=labels, num_classes=2)
    assert isinstance(out, Registered)
    assert out.displacement.shape == (3, N, N, N) and out.warped.shape == moving.shape
    assert out.warped_labels.shape == moving.shape and out.seconds > 0
    out = register(moving, fixed, steps=20, grid=8)                          # no model: per-pair optimiser
    assert out.warped_labels is None and np.abs(out.displacement).max() > 0.1
    # channels-last volumes keep their channels
    out = register(np.stack([moving, moving], -1), np.stack([fixed, fixed], -1), steps=2, grid=8)
    assert out.warped.shape == (N, N, N, 2)


def test_register_rejects_bad_input_with_clear_errors():
    moving, fixed = _pair()
    net = _net()
    with pytest.raises(ValueError, match="fixed: shape"):
        register(moving, fixed[:-1], net)
    with pytest.raises(ValueError, match="2D image"):
        register(moving[0], fixed[0], net)
    nan = moving.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="moving: contains 1 NaN"):
        register(nan, fixed, net)
    with pytest.raises(ValueError, match="fixed: contains"):
        register(moving, np.where(fixed > 0.5, np.inf, fixed), net)
    with pytest.raises(ValueError, match="dtype"):
        register(moving.astype(bool), fixed, net)
    with pytest.raises(ValueError, match="expects 1 channel"):
        register(np.stack([moving] * 2, -1), np.stack([fixed] * 2, -1), net)
    with pytest.raises(ValueError, match="divisible"):
        register(moving[:10, :10, :10], fixed[:10, :10, :10], net)
    with pytest.raises(TypeError, match="steps"):
        register(moving, fixed, net, steps=3)
    labels = (moving > 0.5).astype(np.int64)
    with pytest.raises(ValueError, match=r"values \[7\] are outside the expected labels 0..1"):
        register(moving, fixed, net, moving_labels=np.where(labels == 1, 7, 0), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        register(moving, fixed, net, moving_labels=labels)
    with pytest.raises(ValueError, match="fractional"):
        register(moving, fixed, net, moving_labels=labels * 0.5, num_classes=2)
    with pytest.raises(ValueError, match="moving_labels: spatial shape"):
        register(moving, fixed, net, moving_labels=labels[:-1], num_classes=2)
    with pytest.raises(ValueError, match=r"moving_labels: a 4D input .* \[0, 1\]"):
        register(moving, fixed, net, moving_labels=np.stack([labels * 2.0, 1 - labels], -1))


def test_register_refuses_overflow_and_non_finite_results():
    import numpy as np
    from gen3d_lessons.tasks.register import register

    big = np.full((8, 8, 8), 1e300)
    big[2:5, 2:5, 2:5] = 2e300
    with pytest.raises(ValueError, match=r"moving \(as float32\): contains"):
        register(big, big)
    huge = np.zeros((8, 8, 8), np.float32)
    huge[2:5, 2:5, 2:5] = 1e30
    with pytest.raises(ValueError, match="non-finite.*scale both volumes"):
        register(huge, np.roll(huge, 1, axis=0), steps=5, grid=None)
    with pytest.raises(ValueError, match="at least 4 voxels"):
        register(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))


# 5. The chapter's evaluation: scores, time, the optimiser's curve, volume change ------------------

CLASSES = {"ball": 1}


def _balls(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n fixed images (n, 1, N, N, N), their labels (n, N, N, N), and the moving labels as probabilities (n, 2, ...)."""
    fixed = torch.cat([_blob(shift=(float(i), 0.0, 0.0)) for i in range(n)])
    labels = (fixed[:, 0] > 0.5).long()
    return fixed, labels, F.one_hot(labels, 2).movedim(-1, 1).float()


def _scaling(n: int, a: float) -> torch.Tensor:
    """u(x) = a (x - c): a uniform stretch with det J = (1 + a)³ everywhere, (n, 3, N, N, N)."""
    x = spatial.identity_grid((N, N, N))
    return (a * (x - (N - 1) / 2)).expand(n, -1, -1, -1, -1).clone()


def test_score_fields_is_perfect_for_the_identity_and_broadcasts_an_atlas():
    fixed, labels, probs = _balls()
    zero = torch.zeros(2, 3, N, N, N)
    row = score_fields(zero, probs, labels, CLASSES, spacing=2.0, seconds=0.5)
    assert row["mean Dice"] == pytest.approx(1.0) and row["Dice ball"] == pytest.approx(1.0)
    assert row["HD95 (mm)"] == pytest.approx(0.0) and row["folded voxels (%)"] == 0.0 and row["s per pair"] == 0.5
    atlas_row = score_fields(zero, probs[:1], labels, CLASSES)           # one atlas for both pairs
    assert atlas_row["mean Dice"] < 1.0                                  # the second ball sits elsewhere
    with pytest.raises(ValueError, match="1 or 2"):
        score_fields(zero, probs[:1], labels[:1], CLASSES)


def test_folding_scores_of_the_identity_and_of_a_folding_field():
    fixed, labels, probs = _balls()
    clean = folding_scores(torch.zeros(2, 3, N, N, N), probs, labels, CLASSES)
    assert clean == {"folded voxels (%)": 0.0, "min det J": pytest.approx(1.0), "mean Dice": pytest.approx(1.0)}
    folded = folding_scores(_scaling(2, -1.5), probs, torch.cat([labels, labels]), CLASSES)   # det J = -1/8
    assert folded["folded voxels (%)"] > 50 and folded["min det J"] < 0
    with pytest.raises(ValueError, match="at least 2"):
        folding_scores(torch.zeros(2, 3, N, N, N), probs, labels[:1], CLASSES)


def test_folding_by_parametrisation_gives_one_row_per_parametrisation():
    fixed, labels, probs = _balls()
    table = folding_by_parametrisation(_blob(), probs[:1], fixed, labels, CLASSES, None,
                                       RegistrationLoss(smoothness=1e-4), steps=3, lr=0.1)
    assert list(table.index) == ["displacement, id + u", "velocity, exp(v)"]
    assert list(table.columns) == ["folded voxels (%)", "min det J", "mean Dice"]
    assert np.isfinite(table.to_numpy(dtype=float)).all()


def test_seconds_per_pair_times_one_pair_at_a_time_and_timed_batch_all_at_once():
    seen = []
    register_batch = lambda x: seen.append(tuple(x.shape)) or time.sleep(0.01)
    s = seconds_per_pair(register_batch, torch.zeros(3, 1, 4, 4, 4), n=2)
    assert seen == [(1, 1, 4, 4, 4)] * 2 and s >= 0.01
    with pytest.raises(ValueError, match="1 to 3"):
        seconds_per_pair(register_batch, torch.zeros(3, 1, 4, 4, 4), n=4)
    out, per_pair = timed_batch(lambda x: time.sleep(0.02) or x * 2, torch.ones(4, 1, 2, 2, 2))
    assert torch.equal(out, torch.full((4, 1, 2, 2, 2), 2.0)) and 0.005 <= per_pair < 0.02


def test_optimiser_curve_scores_the_fields_of_one_run_and_times_single_pairs():
    fixed, _, _ = _balls()
    moving, loss = _blob(), RegistrationLoss(smoothness=0.01)
    scored = []
    rows = optimiser_curve(moving, fixed, loss, lambda u, s: scored.append((u, s)) or {"s": s}, at_steps=(2, 4),
                           n_timed=1, grid=4, lr=0.1)
    assert list(rows) == ["iterative, 2 steps", "iterative, 4 steps"] and rows["iterative, 4 steps"]["s"] > 0
    path = iterative_path(moving.expand(2, -1, -1, -1, -1), fixed, loss, at_steps=(2, 4), grid=4, lr=0.1)
    assert all(torch.equal(u, snap.displacement) for (u, _), snap in zip(scored, path))   # the same fields
    with pytest.raises(ValueError, match="n_timed"):
        optimiser_curve(moving, fixed, loss, lambda u, s: {}, at_steps=(1,), n_timed=3)
    with pytest.raises(ValueError, match="1 or 2"):
        optimiser_curve(torch.cat([moving] * 3), fixed, loss, lambda u, s: {}, at_steps=(1,), n_timed=1)


def test_network_displacement_is_one_forward_pass_on_the_cpu():
    net = _net(diffeomorphic=True)
    fixed, _, _ = _balls()
    u = network_displacement(net, _blob(), fixed)
    assert u.shape == (2, 3, N, N, N) and not u.requires_grad and u.device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(u, net(_blob().expand(2, -1, -1, -1, -1), fixed).displacement)


def test_optimiser_match_finds_the_cheapest_run_that_reaches_the_network():
    table = pd.DataFrame({"mean Dice": [0.5, 0.6, 0.7, 0.8, 0.65], "s per pair": [0.0, 1.0, 2.0, 4.0, 0.1]},
                         index=["none", "iterative, 5 steps", "iterative, 10 steps", "iterative, 20 steps", "net"])
    match = optimiser_match(table, "net")
    assert isinstance(match, OptimiserMatch)
    assert (match.row, match.reached, match.steps, match.longest, match.longest_steps) == (
        "iterative, 10 steps", True, 10, "iterative, 20 steps", 20)
    assert match.speedup == pytest.approx(20.0)
    table.loc["net", "mean Dice"] = 0.9                                  # better than every run: the longest one
    assert optimiser_match(table, "net")[:3] == ("iterative, 20 steps", False, 20)
    with pytest.raises(ValueError, match="rows starting"):
        optimiser_match(table, "net", prefix="demons")


def test_match_numbers_read_the_match_off_the_table():
    table = pd.DataFrame({"mean Dice": [0.5, 0.6, 0.7, 0.8, 0.65], "s per pair": [0.0, 1.0, 2.0, 4.0, 0.1]},
                         index=["none", "iterative, 5 steps", "iterative, 10 steps", "iterative, 20 steps", "net"])
    numbers = match_numbers(table, "net", optimiser_match(table, "net"))
    assert numbers == pytest.approx(dict(net_dice=0.65, net_ms=100.0, matched_steps=10, matched_dice=0.7, matched_s=2.0,
                                         speedup=20.0, speed_factor=20.0, iter_steps=20, iter_dice=0.8))
    table.loc["net", "s per pair"] = 8.0                                 # a slow network: the factor stays >= 1
    numbers = match_numbers(table, "net", optimiser_match(table, "net"))
    assert numbers["speedup"] == pytest.approx(0.25) and numbers["speed_factor"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="rows"):
        match_numbers(table.drop("net"), "net", optimiser_match(table, "net"))


def test_registration_metrics_flatten_every_table_in_order():
    brain = pd.DataFrame({"mean Dice": [0.5, 0.8], "s per pair": [0.0, 0.1]}, index=["none", "net"])
    heart = pd.DataFrame({"mean Dice": [0.6, 0.7]}, index=["none", "net"])
    motion = pd.DataFrame({"cavity": [1.5, 1.2], "wall": [1.1, 1.0], "corr": [0.9, 0.8]}, index=["iter", "net"])
    history = type("History", (), {"steps": 3, "seconds": 1.5})()
    metrics = registration_metrics(brain, heart, motion, "iterative, 5 steps", 2.5, {"brain": history})
    assert list(metrics) == ["brain Dice, none", "brain Dice, net", "brain s per pair, none", "brain s per pair, net",
                             "optimiser run matched", "heart Dice, none", "heart Dice, net", "corr(LV det J, EDV/ESV), iter",
                             "corr(LV det J, EDV/ESV), net", "mean LV det J, iter", "mean LV det J, net",
                             "mean MYO det J, iter", "mean MYO det J, net", "mean EDV/ESV", "training steps, brain",
                             "training s, brain"]
    assert metrics["brain Dice, net"] == 0.8 and metrics["mean MYO det J, iter"] == 1.1 and metrics["training s, brain"] == 1.5
    with pytest.raises(ValueError, match="missing"):
        registration_metrics(brain.drop(columns="s per pair"), heart, motion, "x", 2.5, {})


def test_cine_pairs_pool_ed_and_es_to_cubes(tmp_path):
    root = make_heart_dataset(tmp_path / "heart", n=2, size=16, frames=3, seed=4, test_fraction=0)
    records = read_dataset(root).split("train")
    pairs = cine_pairs(records, z=slice(4, 12))
    assert isinstance(pairs, CinePairs)
    assert pairs.moving.shape == pairs.fixed.shape == (2, 1, 8, 8, 8)
    assert pairs.moving_labels.shape == pairs.fixed_labels.shape == (2, 4, 8, 8, 8)
    assert torch.allclose(pairs.fixed_labels.sum(1), torch.ones(2, 8, 8, 8))        # class fractions
    assert not torch.equal(pairs.moving, pairs.fixed)                                # ED is not ES
    raw = read_dataset(root).split("train")[0]
    spacing = np.array(pairs.spacing) / np.array([2, 2, 1])
    assert pairs.spacing[0] == pairs.spacing[2] and np.allclose(spacing, _spacing_of(raw))
    with pytest.raises(ValueError, match="no cases"):
        cine_pairs([])


def _spacing_of(record) -> tuple[float, ...]:
    return load_case(record, ["label"])["label"].spacing


def test_mean_jacobian_inside_a_mask():
    mask = torch.zeros(2, N, N, N, dtype=torch.bool)
    mask[:, 4:12, 4:12, 4:12] = True
    assert mean_jacobian(torch.zeros(2, 3, N, N, N), mask) == pytest.approx([1.0, 1.0])
    assert mean_jacobian(_scaling(2, 0.1), mask) == pytest.approx([1.1 ** 3] * 2, rel=1e-4)
    assert mean_jacobian(torch.zeros(2, 3, N, N, N), torch.zeros_like(mask)) == pytest.approx([0.0, 0.0])   # empty
    with pytest.raises(ValueError, match="mask"):
        mean_jacobian(torch.zeros(2, 3, N, N, N), mask[:1])


def test_volume_change_and_its_summary_read_a_known_stretch():
    fractions = torch.zeros(2, 4, N, N, N)
    fractions[:, 0] = 1.0
    fractions[:, :, 4:12, 4:12, 4:12] = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 4, 1, 1, 1)    # LV: label 3
    fractions[:, :, 2:4, 4:12, 4:12] = torch.tensor([0.0, 0.0, 1.0, 0.0]).view(1, 4, 1, 1, 1)     # MYO: label 2
    moving = fractions.clone()
    moving[1, 3] *= 2.0                                                  # a volume ratio of 1 and of 2
    fields = {"stretch": _scaling(2, 0.1), "still": torch.zeros(2, 3, N, N, N)}
    table = volume_change(fields, moving, fractions, {"LV": 3, "MYO": 2}, "EDV / ESV", index=["a", "b"])
    assert list(table.columns) == ["EDV / ESV", "LV det J, stretch", "LV det J, still", "MYO det J, stretch",
                                   "MYO det J, still"]
    assert list(table.index) == ["a", "b"] and table["EDV / ESV"].tolist() == pytest.approx([1.0, 2.0])
    assert table["LV det J, stretch"].tolist() == pytest.approx([1.1 ** 3] * 2, rel=1e-4)
    summary = volume_change_summary(table, fields, "LV", "MYO", "EDV / ESV")
    assert list(summary.columns) == ["cavity", "wall", "corr", "recovered", "wall_steady"]
    assert summary.loc["still", "cavity"] == pytest.approx(1.0) and summary.loc["still", "recovered"] == pytest.approx(0.0)
    assert summary.loc["stretch", "recovered"] == pytest.approx((1.1 ** 3 - 1) / 0.5, rel=1e-3)
    assert not summary.loc["stretch", "wall_steady"]                     # the wall stretches as much as the cavity


def test_brain_atlas_is_the_template_as_tensors():
    atlas = brain_atlas(16)
    assert isinstance(atlas, Atlas)
    assert atlas.image.shape == (1, 1, 16, 16, 16) and atlas.probabilities.shape == (1, 4, 16, 16, 16)
    assert atlas.labels.shape == (16, 16, 16) and len(atlas.spacing) == 3 and atlas.spacing[0] > 0
    assert torch.allclose(atlas.probabilities.sum(1), torch.ones(1, 16, 16, 16), atol=1e-5)


def test_train_registration_runs_fit_over_the_step_and_leaves_the_model_in_eval_mode():
    fixed, labels, probs = _balls()
    net = _net()
    batches = pair_batches(_blob().expand(2, -1, -1, -1, -1), fixed, probs, probs, batch_size=2, generator=_gen(0))
    history = train_registration(net, batches, RegistrationLoss(dice=1.0), lr=1e-3, max_steps=3, desc="test")
    assert history.steps == 3 and not net.training and "dice_loss" in history.values


# 6. The chapter's figures ----------------------------------------------------------------------------

def test_accuracy_against_time_draws_a_curve_points_and_a_reference():
    fig = viz.accuracy_against_time({5: (0.1, 0.6), 10: (0.2, 0.7)}, {"net": (0.01, 0.65), "affine": (0.05, 0.55)},
                                    {"none": 0.4}, ylabel="mean Dice")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts] == ["5", "10"]
    assert [l.get_label() for l in ax.lines] == ["iterative optimiser (steps)", "net", "affine", "none"]
    with pytest.raises(ValueError, match="seconds > 0"):
        viz.accuracy_against_time({5: (0.0, 0.6)}, {})
    with pytest.raises(ValueError, match="non-empty"):
        viz.accuracy_against_time({}, {"net": (0.1, 0.5)})


def test_volume_change_figure_draws_the_pair_det_j_and_the_truth():
    vol = torch.rand(N, N, N, generator=_gen(3))
    mask = torch.zeros(N, N, N, dtype=torch.bool)
    mask[4:8, 4:8, 10:12] = True
    fig = viz.volume_change_figure(vol, vol, torch.ones(N, N, N), mask, [1.5, 2.0], {"a": [1.2, 1.6], "b": [1.4, 1.9]},
                                   title="heart, slice {index}")
    assert len(fig.axes) == 5 and fig._suptitle.get_text() == "heart, slice 10"           # 4 panels + a colour bar
    assert len(fig.axes[3].collections) == 2                                             # one scatter per method
    with pytest.raises(ValueError, match="non-empty mask"):
        viz.volume_change_figure(vol, vol, vol, torch.zeros(N, N, N), [1.0], {"a": [1.0]})
    with pytest.raises(ValueError, match="one value per pair"):
        viz.volume_change_figure(vol, vol, vol, mask, [1.0, 2.0], {"a": [1.0]})
