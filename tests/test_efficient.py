"""Chapter 15: the cheaper U-Net blocks, what a network costs, and the comparison helpers."""

import pandas as pd
import pytest
import torch
from monai.losses import DiceCELoss

from gen3d_lessons.models.efficient import CONVS, ChannelShuffle, conv_block, neighbour_slices
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.tasks import efficient as E
from gen3d_lessons.training.benchmark import multiply_adds, network_costs, saved_bytes
from gen3d_lessons.viz import plot_tradeoff


@pytest.mark.parametrize("kind", CONVS)
def test_every_block_keeps_the_grid_and_the_unet_works(kind):
    x = torch.rand(2, 8, 8, 8, 8)
    assert conv_block(kind, 8, 16, norm="batch")(x).shape == (2, 16, 8, 8, 8)
    net = UNet3D(UNetConfig(2, 3, (4, 8, 16), "batch", conv=kind))
    assert net(torch.rand(2, 2, 8, 8, 8)).shape == (2, 3, 8, 8, 8)


def test_blocks_have_the_weights_the_chapter_states():
    w = {k: sum(p.numel() for p in conv_block(k, 32, 64, norm="none").parameters() if p.ndim > 1) for k in CONVS}
    assert w["full"] == 27 * 32 * 64 + 27 * 64 * 64
    assert w["2+1d"] == (9 * 32 * 64 + 3 * 64 * 64) + (9 * 64 * 64 + 3 * 64 * 64)
    assert w["depthwise"] == (27 * 32 + 32 * 64) + (27 * 64 + 64 * 64)
    assert w["shuffle"] == 32 * 64 + 2 * 27 * 32 * 32
    assert w["2.5d"] == 9 * 32 * 64 + 9 * 64 * 64


def test_unet_config_checks_the_block_and_old_configs_still_load():
    with pytest.raises(ValueError, match="conv"):
        UNetConfig(conv="magic")
    old = {"in_channels": 1, "out_channels": 4, "features": [8, 16], "norm": "batch", "dropout": 0.0}
    assert UNetConfig(**old).conv == "full"                                    # a file saved before chapter 15
    a, b = UNet3D(UNetConfig(1, 2, (4, 8))), UNet3D(UNetConfig(1, 2, (4, 8), conv="full"))
    assert list(a.state_dict()) == list(b.state_dict())


def test_neighbour_slices_and_shuffle():
    x = torch.arange(4.0).view(1, 1, 4, 1, 1)
    y = neighbour_slices(x, 1)
    assert y.shape == (1, 3, 4, 1, 1)
    assert y[0, :, :, 0, 0].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]   # below, itself, above; edges repeat
    assert torch.equal(neighbour_slices(x, 0), x)
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        neighbour_slices(x[0], 1)
    s = ChannelShuffle(2)(torch.arange(4.0).view(1, 4, 1, 1, 1))
    assert s.flatten().tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="even"):
        conv_block("shuffle", 4, 5)


def test_multiply_adds_and_saved_bytes():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    x = torch.rand(1, 2, 4, 4, 4)
    assert multiply_adds(conv, x) == 4 * 64 * 2 * 27
    up = torch.nn.ConvTranspose3d(4, 2, 2, stride=2)
    assert multiply_adds(up, torch.rand(1, 4, 2, 2, 2)) == 4 * 8 * 2 * 8
    assert saved_bytes(torch.nn.Sequential(conv, torch.nn.ReLU()), x) > 0
    net = UNet3D(UNetConfig(2, 3, (4, 8), "batch"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    costs = network_costs(net.eval(), 8, in_channels=2, classes=3, steps=1)
    assert set(costs) == {"size", "params", "GMACs", "memory_MB", "s_per_step"} and costs["s_per_step"] > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and not net.training   # left as found


def _table():
    return pd.DataFrame({"params": [100, 40, 60], "s_per_step 8": [1.0, 0.6, 0.3], "s_per_step 16": [8.0, 4.0, 2.0],
                         "memory_MB 16": [10.0, 12.0, 9.0], "Dice": [0.80, 0.795, 0.70]},
                        index=pd.Index(["full 3D", "a", "b"], name="architecture"))


def test_extrapolate_pick_and_goal_candidates():
    t = E.extrapolate(_table(), 8, 16, 32)
    assert t.loc["full 3D", "s_per_step 32 (extrapolated)"] == pytest.approx(64.0)
    weights = 16 * 100 / 2 ** 20
    assert t.loc["full 3D", "memory_MB 32 (extrapolated)"] == pytest.approx(weights + (10.0 - weights) * 8)
    assert E.pick(_table(), "s_per_step 16") == "a"                              # b is faster, but 0.1 Dice worse
    assert E.goal_candidates(_table(), 16) == {"a": True, "b": False}
    with pytest.raises(ValueError, match="no column"):
        E.extrapolate(_table(), 4, 16, 32)
    with pytest.raises(ValueError, match="pick"):
        E.pick(_table(), "seconds")


def test_architecture_row_trains_and_measures():
    grid = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij")).float()
    y = ((grid - 4).norm(dim=0) < 3).long()[None, None].repeat(2, 1, 1, 1, 1)
    x = torch.cat([y.float(), 1 - y.float()], 1)
    row, model = E.architecture_row("2.5d", UNetConfig(2, 4, (4, 8), "batch"), x, y, x, y,
                                    loss_fn=DiceCELoss(to_onehot_y=True, softmax=True), steps=1, lr=1e-2, crop=8, batch=2,
                                    sizes=(8,), cost_steps=1)
    assert row["architecture"] == E.NAMES["2.5d"] and {"params", "GMACs", "memory_MB 8", "s_per_step 8", "Dice"} <= set(row)
    assert model.cfg.conv == "2.5d" and not model.training
    with pytest.raises(ValueError, match="kind"):
        E.architecture_row("magic", UNetConfig(2, 4, (4, 8)), x, y, x, y, loss_fn=None, steps=1, lr=1e-2, crop=8, batch=2)


def test_plot_tradeoff():
    fig = plot_tradeoff(_table(), {"seconds": "s_per_step 16"})
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="no column"):
        plot_tradeoff(_table(), {"seconds": "nope"})
