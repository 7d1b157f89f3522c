"""Chapter 14, few labels: the pretext damage, weight transfer, the semi-supervised GAN, multi-atlas labels."""

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from gen3d_lessons.data.batches import CropBatches
from gen3d_lessons.models.fewshot import CropGenerator3D, CropGeneratorConfig, WithoutFake, transfer_weights
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.tasks import fewshot as FS
from gen3d_lessons.training.fewshot import corrupt, frozen_running_stats, train_pretext, train_semisup_gan

CFG = UNetConfig(in_channels=2, out_channels=4, features=(4, 8), norm="batch")


def _brains(n=3, size=16):
    """Two-channel volumes of nested shells (labels 1-3), shifted per volume, and their labels."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")).float()
    xs, ys = [], []
    for i in range(n):
        r = (grid - (size / 2 + i - 1)).norm(dim=0)
        y = (r < 7).long() + (r < 5).long() + (r < 3).long()                    # CSF, GM, WM shells
        xs.append(torch.stack([y.float() / 3, 1 - y.float() / 3 * (y > 0)]))
        ys.append(y[None])
    return torch.stack(xs), torch.stack(ys)


def test_corrupt_blanks_cubes_and_is_seeded():
    x = torch.ones(2, 3, 8, 8, 8)
    a = corrupt(x, torch.Generator().manual_seed(0), cubes=1, size=4, noise=0.0)
    b = corrupt(x, torch.Generator().manual_seed(0), cubes=1, size=4, noise=0.0)
    assert torch.equal(a, b) and torch.equal(x, torch.ones_like(x))              # seeded; the input is left alone
    assert ((a == 0).flatten(1).sum(1) == 3 * 4 ** 3).all()                      # one 4³ cube, every channel
    assert corrupt(x, torch.Generator().manual_seed(0), cubes=0, noise=0.1).std() > 0.05
    with pytest.raises(ValueError, match="crops"):
        corrupt(x[0], torch.Generator())
    with pytest.raises(ValueError, match="size <= the crop"):
        corrupt(x, torch.Generator(), size=9)


def test_transfer_weights_copies_the_encoder_only():
    torch.manual_seed(0)
    source, target = UNet3D(UNetConfig(2, 2, (4, 8), "batch")), UNet3D(CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    left = transfer_weights(source, target)
    after, src = target.state_dict(), source.state_dict()
    assert all(torch.equal(after[k], src[k]) for k in after if k.startswith("down."))
    assert left and all(not k.startswith("down.") for k in left)
    assert all(torch.equal(after[k], before[k]) for k in left)                   # the decoder and head untouched
    assert "head.weight" in transfer_weights(source, target, only=("",))         # head shapes differ: left alone
    with pytest.raises(ValueError, match="matches"):
        transfer_weights(torch.nn.Linear(2, 2), target)


def test_frozen_running_stats_and_without_fake():
    net = UNet3D(UNetConfig(2, 4, (4, 8), "batch"))
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    with frozen_running_stats(net):
        net(torch.randn(2, 2, 8, 8, 8) * 5).sum().backward()                    # gradients still flow
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)
    wrapped = WithoutFake(net)
    assert wrapped.cfg.out_channels == 3 and wrapped(torch.randn(1, 2, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="two outputs"):
        WithoutFake(torch.nn.Linear(2, 2))


def test_crop_generator_shapes_and_errors():
    gen = CropGenerator3D(CropGeneratorConfig(z_dim=8, channels=2, crop=8, features=(8, 4)))
    out = gen(torch.randn(3, 8))
    assert out.shape == (3, 2, 8, 8, 8) and (out >= 0).all()
    with pytest.raises(ValueError, match="z: expected"):
        gen(torch.randn(3, 7))
    with pytest.raises(ValueError, match="power of two"):
        CropGeneratorConfig(crop=12)


def test_pretext_and_semisup_gan_train():
    x, y = _brains()
    torch.manual_seed(0)
    pre = UNet3D(UNetConfig(2, 2, (4, 8), "batch"))
    h = train_pretext(pre, CropBatches(x, y, crop=8, batch_size=2), lr=1e-2, max_steps=3, cubes=1, size=4)
    assert h.steps == 3 and np.isfinite(h.values["loss"]).all()
    seg = UNet3D(UNetConfig(2, 5, (4, 8), "batch"))
    gen = CropGenerator3D(CropGeneratorConfig(z_dim=8, channels=2, crop=8, features=(8, 4)))
    h = train_semisup_gan(seg, gen, CropBatches(x, y, crop=8, batch_size=2), CropBatches(x, torch.zeros_like(y), crop=8,
                          batch_size=2, foreground=0.0), DiceCELoss(to_onehot_y=True, softmax=True), lr=1e-2, max_steps=2)
    assert h.steps == 2 and {"seg", "unlabelled", "fake", "feature_match"} <= set(h.values)
    with pytest.raises(ValueError, match="K \\+ 1"):
        train_semisup_gan(UNet3D(UNetConfig(2, 1, (4, 8))), gen, [], [], None, lr=1e-2, max_steps=1)


def test_label_orders_nested_and_tissue_dice():
    orders = FS.label_orders(10, 2, seed=0)
    assert len(orders) == 2 and sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]
    assert orders == FS.label_orders(10, 2, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        FS.label_orders(0, 1)
    t = torch.tensor([[1, 2, 3, 4]]).reshape(1, 1, 2, 2)
    assert FS.tissue_dice(t, t).tolist() == [1.0]
    assert FS.tissue_dice(torch.where(t == 4, 3, t), t).tolist() == [1.0]          # a lesion counts as WM
    wrong = torch.where(t == 1, 2, t)                                                  # CSF called GM
    assert np.allclose(FS.tissue_dice(wrong, t, per_class=True), [[0.0, 2 / 3, 1.0]])
    with pytest.raises(ValueError, match="same shape"):
        FS.tissue_dice(t, t[..., :1])


def test_multi_atlas_labels_identity_and_errors():
    x, y = _brains(2)
    same = FS.multi_atlas_labels(x[:1], y[:1], x[:1], steps=3, grid=4, pool=2, num_classes=4)
    assert same.shape == (1, 16, 16, 16) and FS.tissue_dice(same, y[:1, 0])[0] > 0.9      # an atlas on itself
    voted = FS.multi_atlas_labels(x, y, x[:1], steps=2, grid=4, num_classes=4)
    assert voted.shape == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="one grid"):
        FS.multi_atlas_labels(x, y, x[:, :1])
    with pytest.raises(ValueError, match="atlas_labels"):
        FS.multi_atlas_labels(x, y[:1], x)


def test_few_label_draw_rows_and_errors():
    x, y = _brains(3)
    torch.manual_seed(0)
    pre = UNet3D(UNetConfig(2, 2, (4, 8), "batch"))
    kw = dict(pretext=pre, cfg=CFG, loss_fn=DiceCELoss(to_onehot_y=True, softmax=True, batch=True), steps=1, lr=1e-2,
              crop=8, batch=2, atlas=dict(steps=1, grid=4, num_classes=4))
    rows = FS.few_label_draw([0, 1, 2], 1, x, y, x[:1], y[:1], **kw)
    assert [r["method"] for r in rows] == list(FS.METHODS) and all(0 <= r["Dice"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="budget"):
        FS.few_label_draw([0, 1, 2], 4, x, y, x[:1], y[:1], **kw)
    with pytest.raises(ValueError, match="methods"):
        FS.few_label_draw([0, 1, 2], 1, x, y, x[:1], y[:1], methods=["magic"], **kw)
    with pytest.raises(ValueError, match="pretext network"):
        FS.few_label_draw([0, 1, 2], 1, x, y, x[:1], y[:1], **(kw | dict(pretext=None)))


def test_crop_generator_default_features_follow_the_crop():
    assert CropGeneratorConfig(crop=16).features == (64, 32, 16)
    assert CropGeneratorConfig(crop=32).features == (64, 32, 16, 8)


def test_brain_mask_reads_images_only():
    x = torch.zeros(2, 3, 4, 4, 4)
    x[0, 1, 1, 1, 1] = 0.5
    m = FS.brain_mask(x)
    assert m.shape == (2, 1, 4, 4, 4) and m.dtype == torch.int64 and int(m.sum()) == 1 and m[0, 0, 1, 1, 1] == 1
    with pytest.raises(ValueError, match="images"):
        FS.brain_mask(x[0])
