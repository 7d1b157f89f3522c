"""gen3d_lessons.spatial: warping, scaling and squaring, Jacobians, random fields, affines."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from gen3d_lessons import spatial


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identity_grid_holds_voxel_indices():
    grid = spatial.identity_grid((3, 4, 5))
    assert grid.shape == (1, 3, 3, 4, 5)
    assert grid[0, :, 2, 1, 4].tolist() == [2.0, 1.0, 4.0]


def test_warp_zero_displacement_is_identity_and_integer_shift_moves_voxels():
    image = torch.rand(2, 3, 6, 7, 8, generator=_gen(0))
    zero = torch.zeros(2, 3, 6, 7, 8)
    assert torch.allclose(spatial.warp(image, zero), image, atol=1e-5)
    # u = +1 voxel along H: output(x) = image(x + e_H), so the content moves one voxel down H
    shift = zero.clone()
    shift[:, 1] = 1.0
    out = spatial.warp(image, shift)
    assert torch.allclose(out[:, :, :, :-1], image[:, :, :, 1:], atol=1e-5)
    assert torch.all(out[:, :, :, -1] == 0)                   # came from outside the grid: zeros
    # the same along W, in 2D: the helpers do not assume 3D
    image2d, shift2d = torch.rand(1, 1, 5, 6, generator=_gen(1)), torch.zeros(1, 2, 5, 6)
    shift2d[:, 1] = -2.0
    assert torch.allclose(spatial.warp(image2d, shift2d)[..., 2:], image2d[..., :-2], atol=1e-5)


def test_nearest_warp_keeps_label_values():
    labels = torch.randint(0, 5, (1, 1, 10, 10, 10), generator=_gen(2)).float()
    u = spatial.smooth_random_field((1, 3, 10, 10, 10), 2.0, 0.7, _gen(3))
    out = spatial.warp(labels, u, mode="nearest", padding_mode="border")
    assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_warp_rejects_mismatched_shapes_with_named_argument():
    with pytest.raises(ValueError, match="displacement"):
        spatial.warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="image"):
        spatial.warp(torch.zeros(1, 1, 4, 4, 5), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        spatial.warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mode="cubic")


def test_compose_matches_warping_twice_better_than_adding_fields():
    size = 32
    u_a = spatial.smooth_random_field((1, 3, size, size, size), 5.0, 1.0, _gen(4))
    u_b = spatial.smooth_random_field((1, 3, size, size, size), 5.0, 1.0, _gen(5))
    image = spatial.gaussian_blur(torch.rand(1, 1, size, size, size, generator=_gen(6)), 2.0)
    image = (image - image.mean()) / image.std()
    twice = spatial.warp(spatial.warp(image, u_a, padding_mode="border"), u_b, padding_mode="border")
    composed = spatial.warp(image, spatial.compose(u_a, u_b), padding_mode="border")
    added = spatial.warp(image, u_a + u_b, padding_mode="border")
    inner = (..., slice(6, -6), slice(6, -6), slice(6, -6))
    err_composed = (composed - twice)[inner].abs().mean()
    err_added = (added - twice)[inner].abs().mean()
    assert err_composed < 0.05
    assert err_composed < err_added / 2


def test_scaling_and_squaring_does_not_fold_where_the_plain_displacement_does():
    # a large, fairly rough velocity field: used directly as a displacement it folds space
    v = spatial.smooth_random_field((1, 3, 24, 24, 24), sigma_vox=3.0, amplitude=1.5, generator=_gen(0))
    assert spatial.jacobian_determinant(v).min() < -0.3
    # its exponential (scaling and squaring) is a diffeomorphism: det J > 0 everywhere
    u = spatial.integrate_velocity(v, steps=7)
    assert spatial.jacobian_determinant(u).min() > 0.05
    # and exp(-v) undoes exp(v) (away from the edges, where the flow leaves the grid)
    residual = spatial.compose(spatial.integrate_velocity(-v), u)[..., 4:-4, 4:-4, 4:-4]
    assert residual.abs().mean() < 0.1
    assert u.abs().mean() > 1.0                                # the test is not trivial


def test_integrate_zero_steps_is_the_field_itself_and_bad_steps_are_refused():
    v = spatial.smooth_random_field((1, 3, 8, 8, 8), 2.0, 0.3, _gen(1))
    assert torch.equal(spatial.integrate_velocity(v, steps=0), v)
    with pytest.raises(ValueError, match="steps"):
        spatial.integrate_velocity(v, steps=-1)


def test_jacobian_determinant_of_affine_fields_is_det_a():
    matrix = spatial.random_affine(3, 3, max_rotation_deg=20, max_scale=0.2, max_shear=0.1,
                                   max_translation=2.0, generator=_gen(7))
    u = spatial.affine_displacement(matrix, (9, 10, 11))
    det = spatial.jacobian_determinant(u)
    assert det.shape == (3, 9, 10, 11)
    expected = torch.linalg.det(matrix[:, :, :3].double()).float().view(3, 1, 1, 1)
    assert torch.allclose(det, expected.expand_as(det), atol=1e-4)
    # 2D works through the general path
    u2 = torch.zeros(1, 2, 5, 5)
    u2[:, 0] = 0.5 * spatial.identity_grid((5, 5))[:, 0]          # stretch axis 0 by 1.5
    assert torch.allclose(spatial.jacobian_determinant(u2), torch.full((1, 5, 5), 1.5))


def test_random_affine_is_small_orientation_preserving_and_seeded():
    a = spatial.random_affine(16, 3, max_rotation_deg=10, max_scale=0.1, max_shear=0.05,
                              max_translation=3.0, generator=_gen(8))
    b = spatial.random_affine(16, 3, max_rotation_deg=10, max_scale=0.1, max_shear=0.05,
                              max_translation=3.0, generator=_gen(8))
    assert a.shape == (16, 3, 4) and torch.equal(a, b)
    det = torch.linalg.det(a[:, :, :3])
    assert torch.all(det > (0.9 ** 3) - 1e-4) and torch.all(det < (1.1 ** 3) + 1e-4)
    assert (a[:, :, :3] - torch.eye(3)).abs().max() < 0.4
    assert a[:, :, 3].abs().max() <= 3.0
    assert not torch.allclose(a[:, :, :3], torch.eye(3).expand(16, 3, 3))


def test_affine_displacement_rotates_about_the_grid_centre():
    # a 90 degree turn in the (H, W) plane keeps the centre voxel fixed
    matrix = torch.zeros(1, 3, 4)
    matrix[0, 0, 0] = 1.0
    matrix[0, 1, 2], matrix[0, 2, 1] = -1.0, 1.0
    u = spatial.affine_displacement(matrix, (5, 5, 5))
    assert torch.allclose(u[0, :, 2, 2, 2], torch.zeros(3), atol=1e-6)
    assert torch.allclose(u[0, :, 2, 2, 4] + torch.tensor([2.0, 2.0, 4.0]), torch.tensor([2.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="matrix"):
        spatial.affine_displacement(torch.zeros(1, 3, 3), (5, 5, 5))


def test_smooth_random_field_statistics_smoothness_and_seed():
    f = spatial.smooth_random_field((2, 3, 32, 32, 32), sigma_vox=4.0, amplitude=2.5, generator=_gen(9))
    g = spatial.smooth_random_field((2, 3, 32, 32, 32), sigma_vox=4.0, amplitude=2.5, generator=_gen(9))
    h = spatial.smooth_random_field((2, 3, 32, 32, 32), sigma_vox=4.0, amplitude=2.5, generator=_gen(10))
    assert f.shape == (2, 3, 32, 32, 32) and torch.equal(f, g) and not torch.allclose(f, h)
    dims = (2, 3, 4)
    assert torch.allclose(f.mean(dims), torch.zeros(2, 3), atol=1e-4)
    assert torch.allclose(f.std(dims), torch.full((2, 3), 2.5), atol=1e-3)
    # neighbouring voxels are strongly correlated (white noise would give ~0)
    corr = torch.corrcoef(torch.stack([f[..., :-1].flatten(), f[..., 1:].flatten()]))[0, 1]
    assert corr > 0.9
    with pytest.raises(ValueError, match="sigma_vox"):
        spatial.smooth_random_field((1, 1, 4, 4, 4), 0.0)


def test_gaussian_blur_matches_scipy_and_keeps_constants():
    x = torch.rand(1, 2, 12, 13, 14, generator=_gen(11))
    ours = spatial.gaussian_blur(x, (1.5, 0.0, 2.0))[0].numpy()
    reference = np.stack([ndimage.gaussian_filter(c, (1.5, 0.0, 2.0), mode="nearest", truncate=3.0)
                          for c in x[0].numpy()])
    # our kernel radius is ceil(3 sigma), scipy's round(3 sigma): equal for these sigmas
    assert np.abs(ours - reference).max() < 1e-5
    assert torch.allclose(spatial.gaussian_blur(torch.full((1, 1, 6, 6, 6), 3.0), 2.0), torch.tensor(3.0))


def test_resize_displacement_rescales_voxel_units():
    u = torch.ones(1, 3, 9, 9, 9)                               # 1 coarse voxel everywhere
    up = spatial.resize_displacement(u, (17, 17, 17))           # twice the voxels over the same extent
    assert up.shape == (1, 3, 17, 17, 17) and torch.allclose(up, torch.full_like(up, 2.0))
    # an affine field is linear, so resizing it loses nothing
    matrix = spatial.random_affine(1, 3, max_rotation_deg=10, max_translation=1.0, generator=_gen(12))
    coarse = spatial.affine_displacement(matrix, (9, 9, 9))
    fine = spatial.resize_displacement(coarse, (17, 17, 17))
    matrix_fine = matrix.clone()
    matrix_fine[:, :, 3] *= 2.0                                 # the translation is in voxels too
    assert torch.allclose(fine, spatial.affine_displacement(matrix_fine, (17, 17, 17)), atol=1e-4)
