"""Chapter 9's super-resolution: thick slabs, their interpolation, SRNet3D, super_resolve, the
training patches and the score table."""

import numpy as np
import pytest
import torch

from gen3d_lessons.models.denoising import RED3D, REDConfig
from gen3d_lessons.models.superres import SRConfig, SRNet3D
from gen3d_lessons.tasks.superres import interpolate_slabs, slab_batches, sr_table, super_resolve, thick_slabs


def _volume(shape=(8, 9, 12), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_thick_slabs_average_runs_of_slices_and_drop_the_rest():
    x = _volume((4, 4, 11))
    t = thick_slabs(x, 3, axis=2)
    assert t.shape == (4, 4, 3) and t.dtype == np.float32
    assert np.allclose(t[..., 1], x[..., 3:6].mean(-1))
    assert thick_slabs(x, 2, axis=0).shape == (2, 4, 11)
    with pytest.raises(ValueError, match="factor"):
        thick_slabs(x, 1)
    with pytest.raises(ValueError, match="axis"):
        thick_slabs(x, 3, axis=3)
    with pytest.raises(ValueError, match="fewer than 2 slabs"):
        thick_slabs(x[..., :5], 3)


def test_interpolation_puts_each_slab_at_the_centre_of_its_slices():
    ramp = np.broadcast_to(np.arange(48, dtype=np.float32), (4, 4, 48)).copy() / 48   # linear along the slices
    t = thick_slabs(ramp, 3)
    for order, inner in ((1, slice(1, -1)), (3, slice(16, 32))):          # the cubic spline feels the edges further in
        back = interpolate_slabs(t, 3, order=order)
        assert back.shape == ramp.shape
        assert np.allclose(back[..., inner], ramp[..., inner], atol=1e-4), order    # exact between the centres
    flat = np.full((4, 4, 3), 0.5, np.float32)
    assert np.allclose(interpolate_slabs(flat, 3, order=3), 0.5)
    assert interpolate_slabs(t, 3, order=1, size=13).shape == (4, 4, 13)
    with pytest.raises(ValueError, match="order"):
        interpolate_slabs(t, 3, order=2)


def test_untrained_srnet_is_linear_interpolation():
    torch.manual_seed(0)
    net = SRNet3D(SRConfig(factor=3, channels=4, blocks=1))
    t = thick_slabs(_volume((6, 6, 12)), 3)
    y = net(torch.from_numpy(t)[None, None])[0, 0].detach().numpy()
    assert y.shape == (6, 6, 12)
    assert np.allclose(y[..., 1:-1], interpolate_slabs(t, 3, order=1)[..., 1:-1], atol=1e-5)
    with pytest.raises(ValueError, match="slices along the last axis"):
        net(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="factor"):
        SRConfig(factor=1)


def test_super_resolve_takes_any_orientation_and_refuses_bad_input():
    torch.manual_seed(0)
    net = SRNet3D(SRConfig(factor=2, channels=4, blocks=1))
    torch.nn.init.normal_(net.tail.weight, std=0.1)                         # not the identity any more
    t = _volume((6, 7, 5))
    y = super_resolve(net, t, axis=2)
    assert y.shape == (6, 7, 10) and y.dtype == np.float32
    assert np.allclose(np.moveaxis(super_resolve(net, np.moveaxis(t, 2, 0), axis=0), 0, 2), y, atol=1e-5)
    assert net.training                                                     # left in the mode it was in
    for bad, match in ((t[:, :, 0], "2D"), ((t * 4095).astype(np.int16), "floating-point"),
                       (np.full_like(t, np.nan), "NaN"), (t * 50, r"\[0, 1\]")):
        with pytest.raises(ValueError, match=match) as err:
            super_resolve(net, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="axis"):
        super_resolve(net, t, axis=-1)
    with pytest.raises(ValueError, match="SRNet3D"):
        super_resolve(RED3D(REDConfig()), t)


def test_slab_batches_cut_aligned_pairs():
    fine = torch.from_numpy(np.stack([_volume((8, 8, 12), seed=s) for s in range(3)]))[:, None]
    thick = torch.from_numpy(np.stack([thick_slabs(v[0].numpy(), 3) for v in fine]))[:, None]
    masks = torch.zeros_like(fine, dtype=torch.bool)
    masks[:, :, 2:6, 2:6, 3:9] = True
    batches = iter(slab_batches(thick, fine, masks, (4, 4, 2), batch_size=5, seed=0))
    batch = next(batches)
    assert batch["thick"].shape == (5, 1, 4, 4, 2) and batch["image"].shape == (5, 1, 4, 4, 6)
    for t, y in zip(batch["thick"], batch["image"]):                     # each thick patch is its fine patch, averaged
        assert np.allclose(t[0].numpy(), thick_slabs(y[0].numpy(), 3), atol=1e-6)
    again = next(iter(slab_batches(thick, fine, masks, (4, 4, 2), batch_size=5, seed=0)))
    assert torch.equal(again["image"], batch["image"])                     # seeded
    with pytest.raises(ValueError, match="patch"):
        slab_batches(thick, fine, masks, (9, 4, 2), batch_size=2)
    with pytest.raises(ValueError, match="factor"):
        slab_batches(thick, fine[..., :11], masks[..., :11], (4, 4, 2), batch_size=2)


def test_sr_table_ranks_a_near_copy_above_a_blur():
    fine = [_volume((8, 8, 12), seed=s) for s in range(2)]
    masks = [np.ones_like(v, dtype=bool) for v in fine]
    outputs = {"near copy": [v + 0.01 for v in fine], "slabs": [interpolate_slabs(thick_slabs(v, 3), 3, order=0) for v in fine]}
    table = sr_table(outputs, fine, masks, axis=2)
    assert table.loc["near copy", "PSNR (dB)"] == pytest.approx(40.0, abs=0.01)
    assert table.loc["near copy", "slice sharpness"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["slabs", "slice sharpness"] < 0.8
    with pytest.raises(ValueError, match="volumes for"):
        sr_table({"short": fine[:1]}, fine, masks)
