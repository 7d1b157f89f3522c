"""Chapter 10's library code: the U-Net, Vox2Vox and VAE-reg pieces, step functions, baselines,
domain randomisation and predict() on real NIfTI geometry."""

from dataclasses import asdict
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen3d_lessons.baselines.segmentation import (atlas_segmentation, heart_intensity_segmentation,
                                                  threshold_segmentation)
from gen3d_lessons.data.errors import DataError
from gen3d_lessons.blocks import PatchDiscriminator3D, PatchDiscriminatorConfig
from gen3d_lessons.models.segmentation import VAERegConfig, VAERegUNet
from gen3d_lessons.models.unet import UNet3D, UNetConfig, pad_to_multiple
from gen3d_lessons.data.batches import CropBatches, random_flip
from gen3d_lessons.data.datasets import read_dataset, stack_cases, stack_cine_phases
from gen3d_lessons.tasks.segment import (SegmenterConfig, SynthConfig, load_segmenter, model_grid, normalize_intensity,
                                   predict, predict_labels, save_segmenter, synthesize,
                                   train_brain_segmenter, unseen_conditions)
from gen3d_lessons.training import fit
from gen3d_lessons.training.segmentation import one_cycle, seg_step, vaereg_step, vox2vox_step

SMALL = UNetConfig(in_channels=1, out_channels=3, features=(4, 8, 16))


def blobs(n=4, size=16, seed=0):
    """Images with a bright ball (label 2) inside a dim box (label 1): a toy segmentation problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size).float()
    zz, yy, xx = torch.meshgrid(x, x, x, indexing="ij")
    images, labels = [], []
    for _ in range(n):
        c = size / 2 + 2 * (torch.rand(3, generator=g) - 0.5)
        r = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2).sqrt()
        lab = torch.zeros(size, size, size, dtype=torch.long)
        lab[3:-3, 3:-3, 3:-3] = 1
        lab[r < size / 5] = 2
        img = torch.tensor([0.0, 0.4, 0.9])[lab] + 0.05 * torch.randn(lab.shape, generator=g)
        images.append(img[None])
        labels.append(lab[None])
    return torch.stack(images), torch.stack(labels)        # (N, 1, S, S, S) each


# models ----------------------------------------------------------------------------------------

def test_unet_shapes_encode_decode_and_errors():
    net = UNet3D(SMALL)
    x = torch.randn(2, 1, 16, 16, 8)
    feats = net.encode(x)
    assert [f.shape[1] for f in feats] == [4, 8, 16] and feats[-1].shape[2:] == (4, 4, 2)
    assert net(x).shape == (2, 3, 16, 16, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 10, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="group")
    assert UNetConfig(**asdict(SMALL)) == SMALL and UNetConfig(features=[4, 8]).features == (4, 8)


def test_pad_to_multiple_round_trip():
    x = torch.randn(1, 2, 11, 16, 5)
    xp, crop = pad_to_multiple(x, 8)
    assert xp.shape == (1, 2, 16, 16, 8)
    assert torch.equal(xp[(slice(None), slice(None), *crop)], x)


def test_patch_discriminator_and_vaereg_shapes():
    d = PatchDiscriminator3D(PatchDiscriminatorConfig(in_channels=1 + 3, features=(4, 8)))
    assert d(torch.randn(2, 1, 16, 16, 16), torch.rand(2, 3, 16, 16, 16)).shape == (2, 1, 4, 4, 4)
    cfg = VAERegConfig(unet=SMALL, crop=(16, 16, 16), latent_dim=8)
    net = VAERegUNet(cfg)
    logits, recon, mu, logvar = net.forward_train(torch.randn(2, 1, 16, 16, 16))
    assert logits.shape == (2, 3, 16, 16, 16) and recon.shape == (2, 1, 16, 16, 16) and mu.shape == (2, 8)
    assert net(torch.randn(1, 1, 24, 16, 8)).shape == (1, 3, 24, 16, 8)       # seg path: any divisible size
    with pytest.raises(ValueError, match="crops of"):
        net.forward_train(torch.randn(1, 1, 24, 16, 16))
    assert VAERegConfig(**asdict(cfg)) == cfg                                   # survives save / load


# training ----------------------------------------------------------------------------------------

def test_crop_batches_are_seeded_and_shaped():
    images, labels = blobs(3)
    a = next(iter(CropBatches(images, labels, crop=8, batch_size=2, seed=1)))
    b = next(iter(CropBatches(images, labels, crop=8, batch_size=2, seed=1)))
    assert a["image"].shape == (2, 1, 8, 8, 8) and a["label"].shape == (2, 1, 8, 8, 8)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="larger than"):
        CropBatches(images, labels, crop=32)
    flipped = random_flip({"image": images, "label": labels}, torch.Generator().manual_seed(0))
    assert flipped["image"].shape == images.shape and not torch.equal(flipped["image"], images)


def test_crop_batches_oversample_a_rare_class():
    images, labels = blobs(4, size=16)
    labels[1:, 0][labels[1:, 0] == 2] = 1            # the ball (label 2) is left in one volume only ...
    labels[0, 0][labels[0, 0] == 2] = 1
    labels[0, 0, 7:9, 7:9, 7:9] = 2                  # ... and there it is 8 voxels of 4096 x 4
    batch = next(iter(CropBatches(images, labels, crop=6, batch_size=200, foreground=1.0, seed=0)))
    has_rare = (batch["label"] == 2).flatten(1).any(1).float().mean().item()
    assert has_rare > 0.35                           # a class drawn uniformly of two: about half the crops
    with pytest.raises(ValueError, match="foreground"):
        CropBatches(images, labels, crop=6, foreground=1.5)


def test_one_cycle_rises_then_falls():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = one_cycle(opt, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.01 and max(lrs) == pytest.approx(0.1, rel=1e-3) and lrs[-1] < 0.01
    assert 1 <= int(np.argmax(lrs)) <= 2             # the peak after about 10 % of the steps


def test_stack_cases_and_cine_phases(brain_msd, heart_msd):
    brains = read_dataset(brain_msd)
    images, labels = stack_cases(brains.split("train"))
    assert images.shape == (3, 4, 12, 12, 12) and images.dtype == torch.float32
    assert labels.shape == (3, 1, 12, 12, 12) and labels.dtype == torch.int64
    t1, _ = stack_cases(brains.split("train"), channels=[0])
    assert torch.equal(t1[:, 0], images[:, 0])
    hearts = read_dataset(heart_msd)
    frames, frame_labels, phases = stack_cine_phases(hearts.split("train"), z=slice(2, 10))
    assert frames.shape == (4, 1, 12, 12, 8) and frame_labels.shape == (4, 1, 12, 12, 8)
    assert phases == ["ED", "ES", "ED", "ES"]
    record = hearts.split("train")[0]
    cine = nib.load(record.files["image"]).get_fdata()
    assert np.allclose(frames[1, 0].numpy(), cine[..., 2:10, 3], atol=1e-5)      # es_frame = 3
    assert np.array_equal(frame_labels[1, 0].numpy(), nib.load(record.files["es"]).get_fdata()[..., 2:10])
    with pytest.raises(ValueError, match="no cases"):
        stack_cases([])


def _dice_of(model, images, labels):
    with torch.no_grad():
        pred = model(images).argmax(1)
    inter = ((pred == 2) & (labels[:, 0] == 2)).sum().item()
    return 2 * inter / ((pred == 2).sum().item() + (labels[:, 0] == 2).sum().item())


def test_seg_step_learns_a_toy_problem():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    images, labels = blobs(4)
    net = UNet3D(SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    step = partial(seg_step, model=net, optimizer=opt, loss_fn=DiceCELoss(to_onehot_y=True, softmax=True))
    h = fit(step, [{"image": images, "label": labels}], max_steps=40)
    assert h.values["loss"][-1] < 0.5 * h.values["loss"][0]
    assert _dice_of(net.eval(), images, labels) > 0.8


def test_vox2vox_and_vaereg_steps_update_their_networks():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    images, labels = blobs(2)
    batch = {"image": images, "label": labels}
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g, d = UNet3D(SMALL), PatchDiscriminator3D(PatchDiscriminatorConfig(in_channels=4, features=(4, 8)))
    g0, d0 = [p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()]
    out = vox2vox_step(batch, 0, generator=g, discriminator=d, opt_g=torch.optim.Adam(g.parameters(), 1e-3),
                       opt_d=torch.optim.Adam(d.parameters(), 1e-3), loss_fn=loss_fn)
    assert set(out) == {"seg", "adv", "loss_d"} and all(np.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    net = VAERegUNet(VAERegConfig(unet=SMALL, crop=(16, 16, 16), latent_dim=8))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    first = vaereg_step(batch, 0, model=net, optimizer=opt, loss_fn=loss_fn)
    for i in range(15):
        last = vaereg_step(batch, i, model=net, optimizer=opt, loss_fn=loss_fn)
    assert last["l2"] < first["l2"] and last["seg"] < first["seg"] and last["kl"] >= 0


# baselines -----------------------------------------------------------------------------------------

def test_threshold_segmentation_orders_classes_by_brightness():
    images, labels = blobs(1)
    img, lab = images[0, 0].numpy(), labels[0, 0].numpy()
    for method in ("otsu", "kmeans"):
        pred = threshold_segmentation(img, mask=lab > 0, n_classes=2, method=method)
        assert ((pred == lab) | (lab == 0)).mean() > 0.99
    with pytest.raises(ValueError, match="method"):
        threshold_segmentation(img, mask=lab > 0, method="magic")
    with pytest.raises(DataError, match="NaN"):
        threshold_segmentation(np.full((8, 8, 8), np.nan))


def test_atlas_labels_follow_a_shift():
    images, labels = blobs(1, size=24)
    fixed = images[0, 0]
    theta_true = torch.tensor([[[1.0, 0, 0, 0.15], [0, 1.0, 0, -0.1], [0, 0, 1.0, 0.0]]])
    grid = F.affine_grid(theta_true, [1, 1, 24, 24, 24], align_corners=False)
    moving = F.grid_sample(fixed[None, None], grid, align_corners=False)[0, 0]
    # the affine fit itself is tested in test_registration.py
    probs = F.one_hot(labels[0, 0], 3).float()
    probs_moving = F.grid_sample(probs.permute(3, 0, 1, 2)[None], grid, align_corners=False)[0].permute(1, 2, 3, 0)
    pred = atlas_segmentation(moving.numpy(), probs_moving.numpy(), fixed.numpy(), iterations=150)
    assert (pred == labels[0, 0].numpy()).mean() > 0.95


def test_heart_baseline_finds_two_pools_and_a_ring():
    x = np.zeros((40, 40, 20), np.float32) + 0.3                           # tissue
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    lv = (i - 24) ** 2 + (j - 20) ** 2 < 36
    wall = ((i - 24) ** 2 + (j - 20) ** 2 < 81) & ~lv
    rv = ((i - 11) ** 2 + (j - 20) ** 2 < 25)
    x[..., 5:15][lv] = 0.9
    x[..., 5:15][rv] = 0.85
    x[..., 5:15][wall] = 0.2
    out = heart_intensity_segmentation(x, spacing=(2.0, 2.0, 2.0), wall_mm=6.0)
    assert (out[..., 10][lv] == 3).all() and (out[..., 10][rv] == 1).all()
    assert (out[..., 10][wall] == 2).mean() > 0.8


# domain randomisation and predict() --------------------------------------------------------------------

def test_synthesize_draws_varied_images_from_labels():
    _, labels = blobs(3, size=16)
    g = torch.Generator().manual_seed(0)
    image, lab = synthesize(labels, g, SynthConfig(fov_crop_prob=0.0, max_rotation_deg=0, max_scale=0), n_labels=3)
    assert image.shape == labels.shape and image.min() >= 0 and image.max() <= 1
    assert torch.equal(lab, labels)                                          # no pose change asked for
    means = [[image[b][lab[b] == k].mean().item() for k in range(3)] for b in range(3)]
    assert np.std([m[2] - m[1] for m in means]) > 0.05                      # contrasts differ between samples
    image2, _ = synthesize(labels, torch.Generator().manual_seed(0), SynthConfig(fov_crop_prob=0.0,
                           max_rotation_deg=0, max_scale=0), n_labels=3)
    assert torch.equal(image, image2)                                        # seeded


def test_normalize_intensity_maps_percentiles_to_unit_range():
    x = torch.randn(2, 1, 8, 8, 8) * 100 + 50
    y = normalize_intensity(x)
    assert y.min() == 0 and y.max() == 1 and y.shape == x.shape


def test_model_grid_covers_the_field_of_view():
    affine = np.array([[-2.0, 0, 0, 32], [0, 2, 0, -40], [0, 0, 2, -16], [0, 0, 0, 1]])    # LAS, 2 mm
    shape, grid_affine = model_grid((33, 41, 25), affine, 3.0, divisor=8)
    assert all(s % 8 == 0 for s in shape) and np.allclose(np.diag(grid_affine)[:3], 3.0)
    corners = np.array([[0, 0, 0, 1], [32, 40, 24, 1]]).T
    world = affine @ corners
    ijk = np.linalg.inv(grid_affine) @ world
    assert (ijk[:3] >= 0).all() and (ijk[:3].T <= np.array(shape) - 1).all()


@pytest.fixture
def saved_identity_segmenter(tmp_path: Path) -> Path:
    """A 'segmenter' whose network is untrained but whose file, config and geometry are real."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(unet=UNetConfig(in_channels=1, out_channels=4, features=(4, 8)), spacing_mm=3.0)
    return save_segmenter(UNet3D(cfg.unet), cfg, tmp_path / "seg.pt")


def test_predict_returns_labels_on_the_input_grid(tmp_path, saved_identity_segmenter):
    affine = np.array([[-2.0, 0, 0, 32], [0, 0, 2.5, -40], [0, 2, 0, -16], [0, 0, 0, 1]])   # LSA, oblique axes
    data = np.random.default_rng(0).random((20, 13, 17)).astype(np.float32)
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    out = predict(path, model_path=saved_identity_segmenter)
    assert out.shape == data.shape and np.allclose(out.affine, affine) and out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}
    model, cfg = load_segmenter(saved_identity_segmenter)
    assert cfg.spacing_mm == 3.0 and cfg.labels == ("background", "CSF", "GM", "WM")


def test_predict_is_consistent_across_orientations(tmp_path, saved_identity_segmenter):
    """The same anatomy stored LAS or RAS gives the same labels at the same world positions."""
    data = np.random.default_rng(1).random((16, 16, 16)).astype(np.float32)
    ras = nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]))
    flipped_affine = np.diag([-2.0, 2, 2, 1])
    flipped_affine[0, 3] = 30.0                                               # voxel 15 of the flip = voxel 0
    las = nib.Nifti1Image(data[::-1].copy(), flipped_affine)
    a = np.asarray(predict(ras, model_path=saved_identity_segmenter).dataobj)
    b = np.asarray(predict(las, model_path=saved_identity_segmenter).dataobj)
    assert np.array_equal(a, b[::-1])


def test_predict_clear_errors(tmp_path, saved_identity_segmenter):
    with pytest.raises(FileNotFoundError, match="chapter 10"):
        predict(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), model_path=tmp_path / "none.pt")
    with pytest.raises(DataError, match="file not found"):
        predict(tmp_path / "missing.nii.gz", model_path=saved_identity_segmenter)
    with pytest.raises(DataError, match="2D"):
        predict(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), model_path=saved_identity_segmenter)
    with pytest.raises(DataError, match="NaN"):
        bad = np.ones((8, 8, 8), np.float32)
        bad[0, 0, 0] = np.nan
        predict(nib.Nifti1Image(bad, np.eye(4)), model_path=saved_identity_segmenter)
    with pytest.raises(DataError, match="3 volumes"):
        predict(nib.Nifti1Image(np.random.rand(8, 8, 8, 3).astype(np.float32), np.eye(4)),
                model_path=saved_identity_segmenter)
    with pytest.raises(DataError, match="nothing to segment"):
        predict(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), model_path=saved_identity_segmenter)
    with pytest.raises(TypeError, match="path to a NIfTI"):
        predict(np.zeros((8, 8, 8)), model_path=saved_identity_segmenter)
    with pytest.raises(DataError, match="too small to be a brain scan"):
        predict(nib.Nifti1Image(np.random.rand(4, 4, 4).astype(np.float32), np.eye(4)),
                model_path=saved_identity_segmenter)
    huge = np.full((8, 8, 8), 1e300)
    huge[2:6, 2:6, 2:6] = 3e300
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(huge, np.eye(4)), path)
    with pytest.raises(DataError, match=r"huge\.nii\.gz \(as float32\): contains .*inf"):
        predict(path, model_path=saved_identity_segmenter)


# inference, scores, robustness, training the T1 segmenter --------------------------------------------

def test_predict_labels_in_batches():
    images, _ = blobs(2, size=16)
    net = UNet3D(SMALL).eval()
    pred = predict_labels(net, images)
    assert pred.shape == (2, 16, 16, 16) and pred.dtype == torch.int64
    three = torch.cat([images, images[:1]])                                    # a last batch of one
    assert torch.equal(predict_labels(net, three, batch_size=2), torch.cat([pred, pred[:1]]))
    with pytest.raises(ValueError, match="batch_size"):
        predict_labels(net, images, batch_size=0)
    with pytest.raises(DataError, match="5D"):
        predict_labels(net, images[0])


def test_synthesize_keeps_an_intensity_order():
    _, labels = blobs(6, size=16)
    quiet = SynthConfig(order=(1, 2), std_max=0, clutter_prob=0, blur_max_vox=0, thick_slice_prob=0, bias_max=0,
                        noise_max=0, max_rotation_deg=0, max_scale=0, fov_crop_prob=0)
    image, lab = synthesize(labels, torch.Generator().manual_seed(3), quiet, n_labels=3)
    for b in range(6):
        assert image[b][lab[b] == 1].mean() < image[b][lab[b] == 2].mean()


def test_unseen_conditions():
    t1 = torch.rand(2, 1, 16, 16, 12)
    out = unseen_conditions(t1, lowdose=t1 * 0.9, generator=torch.Generator().manual_seed(0))
    assert list(out) == ["clean", "low-dose", "thick slices", "bias field", "contrast x²"]
    assert all(v.shape == t1.shape for v in out.values())
    assert torch.equal(out["clean"], t1) and not torch.equal(out["bias field"], t1)
    with pytest.raises(ValueError, match="differs"):
        unseen_conditions(t1, lowdose=t1[:1])


def test_train_brain_segmenter_from_scratch_and_from_a_start():
    images, labels = blobs(3, size=16)
    small = UNetConfig(in_channels=1, out_channels=4, features=(4, 8))
    model, cfg, h = train_brain_segmenter(images, labels, 3.0, unet=small, crop=8, batch_size=2, max_steps=3,
                                          synth=SynthConfig(), p_synthetic=0.5)
    assert h.steps == 3 and cfg.spacing_mm == 3.0 and not model.training
    again, _, _ = train_brain_segmenter(images, labels, 3.0, init=model, crop=8, batch_size=2, max_steps=2)
    assert again is not model and any(not torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="classes"):
        train_brain_segmenter(images, labels + 2, 3.0, unet=small, max_steps=1)
    with pytest.raises(ValueError, match="channels"):
        train_brain_segmenter(images.repeat(1, 2, 1, 1, 1), labels, 3.0, unet=small, max_steps=1)


def test_predict_refuses_a_multichannel_model_and_a_corrupt_file(tmp_path):
    cfg = SegmenterConfig(unet=UNetConfig(in_channels=2, out_channels=4, features=(4, 8)))
    path = save_segmenter(UNet3D(cfg.unet), cfg, tmp_path / "two.pt")
    volume = nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4))
    with pytest.raises(ValueError, match="2 channels"):
        predict(volume, model_path=path)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="broken.nii.gz"):
        predict(bad, model_path=path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        predict(volume, model_path=corrupt)


# the chapter's recipes, tables and figures -------------------------------------------------------

def test_train_segmenter_is_adamw_one_cycle_seg_step_and_fit():
    from monai.losses import DiceCELoss

    images, labels = blobs(2)
    batches = [{"image": images, "label": labels}]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    torch.manual_seed(0)
    by_hand, recipe = UNet3D(SMALL), UNet3D(SMALL)
    recipe.load_state_dict(by_hand.state_dict())
    opt = torch.optim.AdamW(by_hand.parameters(), lr=1e-2, weight_decay=1e-4)
    fit(partial(seg_step, model=by_hand, optimizer=opt, scheduler=one_cycle(opt, 4), loss_fn=loss_fn), batches, max_steps=4)
    from gen3d_lessons.training.segmentation import train_segmenter

    h = train_segmenter(recipe, batches, loss_fn, lr=1e-2, max_steps=4)
    assert h.steps == 4 and list(h.values) == ["loss"]
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), recipe.state_dict().values()))


def test_train_vox2vox_and_vaereg_recipes():
    from monai.losses import DiceCELoss

    from gen3d_lessons.training.segmentation import train_vaereg, train_vox2vox

    torch.manual_seed(0)
    images, labels = blobs(2)
    batches = [{"image": images, "label": labels}]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g, d = UNet3D(SMALL), PatchDiscriminator3D(PatchDiscriminatorConfig(in_channels=4, features=(4, 8)))
    g0, d0 = [p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()]
    h = train_vox2vox(g, d, batches, loss_fn, lr=1e-3, max_steps=2, adv_weight=0.2)
    assert h.steps == 2 and set(h.values) == {"seg", "adv", "loss_d"}
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    net = VAERegUNet(VAERegConfig(unet=SMALL, crop=(16, 16, 16), latent_dim=8))
    h = train_vaereg(net, batches, loss_fn, lr=1e-3, max_steps=3)
    assert h.steps == 3 and set(h.values) == {"seg", "l2", "kl"}


def test_tissue_map_counts_a_lesion_as_white_matter():
    from gen3d_lessons.tasks.segment import tissue_map

    y = torch.tensor([[0, 1, 2, 3, 4]])
    assert torch.equal(tissue_map(y), torch.tensor([[0, 1, 2, 3, 3]]))
    assert tissue_map(y).dtype == y.dtype


def test_score_table_rows_and_summary():
    from gen3d_lessons.tasks.segment import score_table

    _, labels = blobs(3, size=16)
    targets = labels[:, 0].numpy()                                           # (3, 16, 16, 16): 1 box, 2 ball
    shifted = [np.roll(t, 2, axis=0) for t in targets]
    preds = {"perfect": list(targets), "shifted": shifted}
    scores, table = score_table(preds, targets, {"box": 1}, spacing=(1.0, 1.0, 2.0), extra_classes={"perfect": {"ball": 2}})
    assert len(scores) == 3 * 2 + 3 and list(scores.columns) == ["model", "case", "class", "Dice", "HD95", "ASSD"]
    assert list(table.index) == ["perfect", "shifted"] and table.columns[0] == ("Dice", "mean")
    assert table.loc["perfect", ("Dice", "mean")] == 1.0 and table.loc["perfect", ("HD95", "ball")] == 0.0
    assert table.loc["shifted", ("Dice", "mean")] < 1.0 and np.isnan(table.loc["shifted", ("Dice", "ball")])
    # per-volume columns, grouped rows (the heart's phases)
    scores, table = score_table(preds, targets, {"box": 1, "ball": 2}, info={"phase": ["ED", "ES", "ED"]},
                                by=("model", "phase"), mean="both")
    assert "phase" in scores and "case" not in scores and list(table.index.names) == ["model", "phase"]
    row = table.loc[("shifted", "ED")]
    assert row[("Dice", "both")] == pytest.approx((row[("Dice", "box")] + row[("Dice", "ball")]) / 2)
    with pytest.raises(ValueError, match="label maps for 3 targets"):
        score_table({"short": shifted[:2]}, targets, {"box": 1})
    with pytest.raises(ValueError, match="info"):
        score_table(preds, targets, {"box": 1}, info={"phase": ["ED"]})


class _Oracle(torch.nn.Module):
    """A "network" that returns the true labels as logits, whatever the image: Dice 1."""

    def __init__(self, labels: torch.Tensor, n_classes: int = 4):
        super().__init__()
        self.labels, self.n, self.seen = labels, n_classes, 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        y = self.labels[self.seen:self.seen + len(x)]
        self.seen = (self.seen + len(x)) % len(self.labels)
        logits = 10.0 * F.one_hot(y, self.n).permute(0, 4, 1, 2, 3).float()    # (B, K, *S)
        pad = [(s - t) for s, t in zip(x.shape[2:], y.shape[1:])]
        return F.pad(logits, [p for e in reversed(pad) for p in (e // 2, e - e // 2)])


def test_mean_tissue_dice_of_networks_and_otsu():
    from gen3d_lessons.tasks.segment import mean_tissue_dice

    images, labels = blobs(2, size=16)                                      # labels 0, 1, 2
    y = labels[:, 0]
    out = mean_tissue_dice({"oracle": _Oracle(y)}, images, y.numpy())
    assert list(out.columns) == ["oracle", "Otsu"] and len(out) == 2
    assert np.allclose(out.oracle, 1.0) and (out.Otsu <= 1.0).all()
    with pytest.raises(ValueError, match="label maps"):
        mean_tissue_dice({"oracle": _Oracle(y)}, images, y.numpy()[:1])


def test_robustness_study_by_site_and_condition(brain_msd):
    from gen3d_lessons.tasks.segment import mean_tissue_dice, robustness_study

    cases = read_dataset(brain_msd).cases                                  # 4 cases of 12³, with "lowdose" copies
    for i, case in enumerate(cases):
        case.attributes["site"] = i % 2
    images, labels = stack_cases(cases, channels=[0])
    y = labels[:, 0].clamp(max=3)
    models = {"oracle": _Oracle(torch.cat([y, y[[0, 1]]] * 8))}              # enough truths for every call
    clean, by_site, robust = robustness_study(models, cases, images, y.numpy(), per_site=1)
    assert list(clean.columns) == ["oracle", "Otsu"] and len(clean) == 4
    assert list(by_site.index) == ["site 0", "site 1"] and by_site.index.name == "clean test T1, by site"
    assert list(robust.index) == ["clean", "low-dose", "thick slices", "bias field", "contrast x²"]
    assert robust.index.name == "mean tissue Dice, 2 test brains"
    picked = mean_tissue_dice({"oracle": _Oracle(y[[0, 1]])}, images[[0, 1]], y.numpy()[[0, 1]])
    assert robust.loc["clean", "Otsu"] == pytest.approx(picked.Otsu.mean())
    with pytest.raises(ValueError, match="per_site"):
        robustness_study(models, cases, images, y.numpy(), per_site=0)
    with pytest.raises(ValueError, match="records"):
        robustness_study(models, cases[:2], images, y.numpy())


def test_tissue_baselines_are_the_three_classical_methods():
    from gen3d_lessons.baselines.segmentation import tissue_baselines

    images, labels = blobs(2, size=16)
    t1, masks = images[:, 0].numpy(), labels[:, 0].numpy() > 0
    probs = np.stack([(labels[0, 0].numpy() == k).astype(np.float32) for k in range(4)], -1)    # (X, Y, Z, 4)
    out = tissue_baselines(t1, masks, t1[0], probs)
    assert list(out) == ["Otsu (T1)", "k-means (T1)", "affine atlas"]
    assert all(len(v) == 2 and v[0].shape == (16, 16, 16) for v in out.values())
    assert np.array_equal(out["Otsu (T1)"][1], threshold_segmentation(t1[1], masks[1], method="otsu"))
    with pytest.raises(ValueError, match="masks"):
        tissue_baselines(t1, masks[:1], t1[0], probs)


def test_compare_labels_and_plot_histories():
    from gen3d_lessons.viz import compare_labels, plot_histories

    image = torch.rand(12, 12, 12)
    truth = torch.zeros(12, 12, 12, dtype=torch.long)
    truth[4:8, 4:8, 8:10] = 3
    fig = compare_labels(image, {"truth": truth, "method": truth.flip(2)}, focus=3)
    assert len(fig.axes) == 2 and fig._suptitle.get_text() == "axial z=8"     # through the label's centre
    assert compare_labels(image, {"truth": truth}, focus=4)._suptitle.get_text() == "axial z=6"   # absent: the centre
    with pytest.raises(ValueError, match="label map"):
        compare_labels(image, {})
    histories = {"pre": {"loss": [3.0, 2.0, 1.0]}, "a": {"loss": [1.0, 0.5]}, "b": {"seg": [1.0, 0.7], "adv": [0.1, 0.1]}}
    fig = plot_histories(histories, [["pre", "a", "b"], ["a"]], keys=("loss", "seg"), continued=["pre"])
    assert len(fig.axes) == 2
    lines = fig.axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[0, 1, 2], [3, 4], [3, 4]]   # both continue from "pre"
    assert np.allclose(lines[0].get_ydata(), [3.0, 2.5, 2.0])                          # a moving mean
    with pytest.raises(ValueError, match="not among"):
        plot_histories(histories, [["c"]])
    with pytest.raises(ValueError, match="none of"):
        plot_histories(histories, [["b"]], keys=("loss",))


# chapter 10's evaluations and the numbers its text quotes ---------------------------------------

def _history(**values):
    from gen3d_lessons.training import History

    h = History()
    for i in range(len(next(iter(values.values())))):
        h.record({k: v[i] for k, v in values.items()})
    return h


def _brain_table():
    import pandas as pd

    from gen3d_lessons.tasks.segment import score_table

    truth = np.zeros((2, 6, 6, 6), dtype=int)
    truth[:, :2], truth[:, 2:4], truth[:, 4:] = 1, 2, 3
    shifted = np.roll(truth, 1, axis=1)                                         # a baseline off by one slice
    preds = {"Otsu (T1)": list(shifted), "atlas": list(np.roll(truth, 2, axis=1)), "U-Net": list(truth),
             "Vox2Vox": list(shifted), "VAE-reg": list(truth)}
    scores, table = score_table(preds, truth, {"CSF": 1, "GM": 2, "WM": 3}, mean="tissue mean",
                                extra_classes={n: {"lesion": 4} for n in ("U-Net", "Vox2Vox", "VAE-reg")})
    assert isinstance(table, pd.DataFrame)
    return scores, table


def test_dice_per_case_one_model_some_classes():
    from gen3d_lessons.tasks.segment import dice_per_case

    scores, _ = _brain_table()
    per_case = dice_per_case(scores, "U-Net", ["CSF", "GM", "WM"])
    assert list(per_case.index) == [0, 1] and np.allclose(per_case, 1.0) and int(per_case.idxmin()) == 0
    shifted = dice_per_case(scores, "Otsu (T1)", by=("case", "class"))
    assert shifted.index.nlevels == 2 and shifted.max() < 1
    with pytest.raises(ValueError, match="model"):
        dice_per_case(scores, "nobody")


def test_brain_summary_quotes_the_table():
    from gen3d_lessons.tasks.segment import brain_summary

    _, table = _brain_table()
    vox = _history(loss_d=[0.2] * 10 + [float(np.log(2))] * 50)
    vae = _history(seg=[1.0] * 50, l2=[0.5] * 50, kl=[0.5] * 50)
    numbers, lead = brain_summary(table, ["U-Net", "Vox2Vox", "VAE-reg"], vox, vae)
    tissue = table[("Dice", "tissue mean")]
    assert numbers["brain_unet"] == tissue["U-Net"] == 1.0
    assert numbers["baseline_best"] == tissue[["Otsu (T1)", "atlas"]].max()
    assert numbers["brain_margin"] == pytest.approx(1.0 - numbers["baseline_best"])
    assert numbers["vox_gap"] < 0 and numbers["vae_gap"] == 0 and numbers["helped"] == 0
    assert numbers["d_coin"] and numbers["loss_d"] == pytest.approx(np.log(2))
    assert numbers["vae_pct"] == pytest.approx(10.0) and numbers["n_methods"] == 5
    assert list(lead.index) == ["U-Net", "Vox2Vox", "VAE-reg"] and list(lead.columns) == ["CSF", "GM", "WM"]
    assert numbers["min_lead"] == lead.min().min()
    with pytest.raises(ValueError, match="networks"):
        brain_summary(table, ["Vox2Vox"], vox, vae)


def test_score_hearts_and_heart_summary():
    from gen3d_lessons.tasks.segment import heart_summary, score_hearts

    class Oracle(torch.nn.Module):                                             # one-hot logits of a fixed answer
        def __init__(self, answer):
            super().__init__()
            self.answer = answer

        def forward(self, x):
            return F.one_hot(self.answer[:len(x)], 4).permute(0, 4, 1, 2, 3).float()

    labels = torch.zeros(2, 1, 24, 24, 8, dtype=torch.long)
    labels[:, 0, 4:10, 6:18, 2:6], labels[:, 0, 12:20, 6:18, 2:6], labels[:, 0, 14:18, 8:16, 2:6] = 1, 2, 3
    images = torch.where(labels % 2 == 1, 1.0, 0.2).float()
    noisy = labels[:, 0].clone()
    noisy[:, 0, 0, 0] = 1                                                       # an island, far from the heart
    preds, scores, table = score_hearts(Oracle(noisy), images, labels, ["ED", "ES"], (1.0, 1.0, 2.0))
    assert list(preds) == ["U-Net", "U-Net, largest pieces", "k-means + geometry"]
    assert set(scores.phase) == {"ED", "ES"} and list(scores.case.unique()) == [0]
    numbers = heart_summary(scores)
    assert numbers["lcc_dice"] >= 0 and numbers["hd_after"] <= numbers["hd_before"]
    assert numbers["heart_worst"] in {"right ventricle", "myocardium", "left ventricle"}
    assert numbers["heart_margin"] == pytest.approx(numbers["heart_unet"] - numbers["heart_baseline"])
    with pytest.raises(ValueError, match="phases"):
        score_hearts(Oracle(noisy), images, labels, ["ED"], (1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="baseline"):
        heart_summary(scores, baseline="nobody")


def test_robustness_summary_counts_sites_and_conditions():
    import pandas as pd

    from gen3d_lessons.tasks.segment import robustness_summary

    clean = pd.DataFrame({"plain": [0.8, 0.6], "randomised": [0.7, 0.9]})
    by_site = pd.DataFrame({"plain": [0.8, 0.6], "randomised": [0.7, 0.9]}, index=["site 0", "site 1"])
    robust = pd.DataFrame({"plain": [0.7, 0.5, 0.6], "randomised": [0.8, 0.4, 0.7]},
                          index=["clean", "low-dose", "bias field"])
    numbers = robustness_summary(clean, by_site, robust)
    assert numbers["sites_ahead"] == 1 and numbers["n_sites"] == 2
    assert numbers["cond_ahead"] == 1 and numbers["n_cond"] == 2 and numbers["share_ahead"] == 0.5
    assert numbers["ahead_any"] and not numbers["ahead_all"]
    assert numbers["clean_gap"] == pytest.approx(0.1) and numbers["t1_best"] == pytest.approx(0.8)
    assert (numbers["plain_clean"], numbers["plain_worst"], numbers["rand_worst"]) == (0.7, 0.5, 0.4)
