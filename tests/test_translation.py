"""Chapter 9's cross-modality synthesis: the edge operator, the translator and translate(), the
pix2pix / Ea-GAN / L1 steps, the classical baselines and the evaluation tables."""

import numpy as np
import pytest
import torch

from gen3d_lessons.baselines.translation import TissueRemap, VoxelRegression
from gen3d_lessons.blocks import PatchDiscriminatorConfig
from gen3d_lessons.losses import edge_loss, sobel_magnitude
from gen3d_lessons.models.gan import PatchCritic3D
from gen3d_lessons.models.translation import Translator, TranslatorConfig, translate
from gen3d_lessons.tasks.translate import (edge_error, image_table, lesion_table, segmenter_table, tissue_means,
                                           translation_metrics)
from gen3d_lessons.training.gan import l1_step, pix2pix_step


# 1. The Sobel edge magnitude ---------------------------------------------------------------------

def test_sobel_magnitude_of_a_step_and_a_ramp():
    step = torch.zeros(1, 1, 8, 8, 8)
    step[..., 4:] = 1.0
    s = sobel_magnitude(step)
    assert s.shape == step.shape
    assert torch.allclose(s[0, 0, 4, 4, 3:5], torch.tensor([0.5, 0.5]), atol=1e-3)   # the two voxels either side
    assert s[0, 0, 4, 4, :2].max() < 1e-3 and s[0, 0, 4, 4, 6:].max() < 1e-3          # flat on both sides
    ramp = torch.arange(8.0).expand(1, 2, 8, 8, 8).clone()                           # slope 1 per voxel, 2 channels
    assert torch.allclose(sobel_magnitude(ramp)[0, 1, 4, 4, 1:7], torch.ones(6), atol=1e-3)
    assert sobel_magnitude(ramp)[0, 1, 4, 4, 0] == pytest.approx(0.5, abs=1e-3)        # replicated border: half


def test_edge_loss_is_zero_for_the_same_volume_and_grows_with_blur():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 1, 8, 8, 8, generator=g)
    blurred = torch.nn.functional.avg_pool3d(y, 3, stride=1, padding=1, count_include_pad=False)
    assert edge_loss(y, y).item() == pytest.approx(0.0, abs=1e-6)
    assert edge_loss(y, blurred).item() > 0.05
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        sobel_magnitude(torch.zeros(8, 8, 8))


# 2. The translator and translate() ---------------------------------------------------------------

def _translator(sources=("T1",), targets=("T2", "FLAIR")):
    torch.manual_seed(0)
    return Translator(TranslatorConfig(sources=sources, targets=targets, features=(4, 8)))


def test_translate_names_its_outputs_and_keeps_any_grid():
    G = _translator()
    t1 = np.random.default_rng(0).random((10, 12, 9)).astype(np.float32)
    out = translate(G, t1)
    assert list(out) == ["T2", "FLAIR"] and all(v.shape == t1.shape and v.dtype == np.float32 for v in out.values())
    assert G.training                                                # left in the mode it was in
    assert np.allclose(translate(G, {"T1": t1})["T2"], out["T2"])     # the dict form is the same


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8), np.float32), "2D image"),
    (np.zeros((8, 8, 8), np.int16), "floating-point"),
    (np.full((8, 8, 8), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 8), 4095.0, np.float32), r"scaled|\[0, 1\]"),
    (np.zeros((1, 8, 8, 8, 8), np.float32), "not a batch"),
    ({"T2": np.zeros((8, 8, 8), np.float32)}, r"reads \['T1'\].*missing \['T1'\].*not read: \['T2'\]"),
])
def test_translate_refuses_bad_input_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        translate(_translator(), bad)
    assert "\n" not in str(err.value)


def test_translate_checks_the_model_and_the_grids_of_several_sources():
    with pytest.raises(ValueError, match="Translator"):
        translate(torch.nn.Conv3d(1, 1, 1), np.zeros((8, 8, 8), np.float32))
    G = _translator(sources=("T1", "PD"), targets=("T2",))
    with pytest.raises(ValueError, match="different grids"):
        translate(G, {"T1": np.zeros((8, 8, 8), np.float32), "PD": np.zeros((8, 8, 6), np.float32)})
    with pytest.raises(ValueError, match="pass a dict"):
        translate(G, np.zeros((8, 8, 8), np.float32))
    assert translate(G, {"PD": np.zeros((8, 8, 8), np.float32), "T1": np.zeros((8, 8, 8), np.float32)})["T2"].shape == (8, 8, 8)
    with pytest.raises(ValueError, match="distinct"):
        TranslatorConfig(sources=("T1", "T1"))


# 3. Training steps ------------------------------------------------------------------------------

def _pairs(n=4, size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, size, size, size, generator=g)
    return {"x": x, "y": torch.cat([1 - x, x ** 2], 1)}                 # two targets, functions of x


def test_l1_step_learns_a_voxel_map():
    G = _translator()
    opt = torch.optim.Adam(G.parameters(), 1e-2)
    batch = _pairs()
    losses = [l1_step(batch, i, model=G, optimizer=opt)["l1"] for i in range(60)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("edges", [False, True])
def test_pix2pix_step_trains_both_networks_and_ea_gan_adds_edges(edges):
    G = _translator()
    D = PatchCritic3D(PatchDiscriminatorConfig(in_channels=1 + 2 * (2 if edges else 1), features=(4, 8)))
    before_g, before_d = [p.clone() for p in G.parameters()], [p.clone() for p in D.parameters()]
    out = pix2pix_step(_pairs(), 0, generator=G, discriminator=D, opt_g=torch.optim.Adam(G.parameters(), 1e-3),
                       opt_d=torch.optim.Adam(D.parameters(), 1e-3), edge_weight=10.0 if edges else 0.0,
                       critic_edges=edges)
    assert ("edge" in out) == edges and all(np.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_g, G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, D.parameters()))


def test_pix2pix_step_refuses_a_critic_without_room_for_the_edges():
    G, D = _translator(), PatchCritic3D(PatchDiscriminatorConfig(in_channels=3, features=(4, 8)))
    with pytest.raises(ValueError, match="channels"):
        pix2pix_step(_pairs(), 0, generator=G, discriminator=D, opt_g=torch.optim.Adam(G.parameters()),
                     opt_d=torch.optim.Adam(D.parameters()), critic_edges=True)


# 4. The classical baselines -----------------------------------------------------------------------

def _tissue_subjects(n=3, size=16, seed=0):
    """Blocky three-tissue brains: T1 dark CSF < GM < WM, the target the reverse, with noise."""
    rng = np.random.default_rng(seed)
    subjects = []
    for _ in range(n):
        labels = np.zeros((size,) * 3, np.int64)
        labels[2:-2, 2:-2, 2:-2] = 2
        labels[5:-5, 5:-5, 5:-5] = 3
        labels[7:9, 4:12, 4:12] = 1
        t1 = np.choose(labels, [0.02, 0.3, 0.55, 0.8]) + rng.normal(0, 0.01, labels.shape)
        t2 = np.choose(labels, [0.02, 0.85, 0.65, 0.5]) + rng.normal(0, 0.01, labels.shape)
        subjects.append((t1, t2[None], labels > 0, labels))
    return subjects


def test_tissue_remap_and_voxel_regression_recover_a_contrast_swap():
    train, test = _tissue_subjects(3), _tissue_subjects(1, seed=9)[0]
    t1, t2, mask, _ = test
    for method in (TissueRemap(), VoxelRegression(max_iter=50)):
        method.fit(*zip(*[s[:3] for s in train]))
        out = method(t1, mask)
        assert out.shape == (1, *t1.shape) and out.dtype == np.float32
        assert np.abs(out[0][mask] - t2[0][mask]).mean() < 0.03, type(method).__name__
    remap = TissueRemap().fit(*zip(*[s[:3] for s in train]))
    assert list(remap.table.index) == ["CSF", "GM", "WM"]
    assert remap.table.loc["CSF", "target 0 mean"] == pytest.approx(0.85, abs=0.02)


def test_baselines_refuse_bad_input():
    t1, t2, mask, _ = _tissue_subjects(1)[0]
    with pytest.raises(ValueError, match="fit"):
        TissueRemap()(t1, mask)
    with pytest.raises(ValueError, match="equal non-zero lengths"):
        VoxelRegression().fit([t1], [t2, t2], [mask])
    with pytest.raises(ValueError, match="source grid"):
        TissueRemap().fit([t1], [t2[:, :8]], [mask])
    with pytest.raises(ValueError, match="NaN"):
        TissueRemap().fit([t1], [np.full_like(t2, np.nan)], [mask])
    fitted = VoxelRegression(max_iter=5).fit([t1], [t2], [mask])
    with pytest.raises(ValueError, match="mask"):
        fitted(t1, mask[:8])


# 5. The evaluation ------------------------------------------------------------------------------

def test_tables_score_a_perfect_copy_above_a_blank():
    subjects = _tissue_subjects(2)
    truth = [np.concatenate([s[1], s[1]]) for s in subjects]                # two "contrasts", T2 twice
    masks, labels = [s[2] for s in subjects], [s[3].copy() for s in subjects]
    labels[0][8, 8, 6:8] = 4                                                # a lesion beside WM in subject 0
    truth[0][1][labels[0] == 4] = 1.0                                       # bright in the second contrast
    outputs = {"copy": truth, "blank": [np.full_like(t, 0.5) for t in truth]}
    table = image_table(outputs, truth, masks, ("T2", "FLAIR"))
    assert table.loc["copy", ("T2", "PSNR (dB)")] > table.loc["blank", ("T2", "PSNR (dB)")]
    assert table.loc["copy", ("T2", "edge error")] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["copy", ("FLAIR", "sharpness")] == pytest.approx(1.0)
    lesions = lesion_table(outputs, truth, labels, ("T2", "FLAIR"))
    assert lesions.loc["copy", "share of the real contrast"] == pytest.approx(1.0)
    assert lesions.loc["blank", "share of the real contrast"] == pytest.approx(0.0)
    no_lesions = lesion_table(outputs, truth, [s[3] for s in subjects], ("T2", "FLAIR"))
    assert no_lesions.isna().all().all()                                     # nothing to measure
    segment = lambda batch: torch.as_tensor(np.stack([np.digitize(v[0], [0.1, 0.6, 0.75]) for v in batch.numpy()]))
    seg = segmenter_table(segment, outputs, truth, [s[3] for s in subjects], ("T2", "FLAIR"),
                          classes={"CSF": 3, "GM": 2, "WM": 1})              # T2: the order reversed
    assert list(seg.index) == ["real", "copy", "blank"] and seg.loc["copy", "mean − real"] == 0
    assert seg.loc["real", "mean"] > seg.loc["blank", "mean"]
    metrics = translation_metrics(table, seg, lesions, {})
    assert metrics["T2 PSNR (dB), copy"] == table.loc["copy", ("T2", "PSNR (dB)")]
    with pytest.raises(ValueError, match="shape"):
        image_table({"bad": [t[:1] for t in truth]}, truth, masks, ("T2", "FLAIR"))
    with pytest.raises(ValueError, match="PD"):
        lesion_table(outputs, truth, labels, ("T2", "FLAIR"), contrast="PD")


def test_tissue_means_and_edge_error():
    images = np.zeros((1, 2, 4, 4, 4))
    images[0, 1] = 1.0
    labels = np.zeros((1, 1, 4, 4, 4), np.int64)
    labels[0, 0, :2] = 1
    means = tissue_means(images, labels, ("A", "B"), ["background", "tissue", "absent"])
    assert means.loc["B", "tissue"] == 1.0 and means.loc["A", "background"] == 0.0 and np.isnan(means.loc["A", "absent"])
    with pytest.raises(ValueError, match="expected"):
        tissue_means(images, labels, ("A",), ["background"])
    ramp = np.tile(np.arange(8.0), (8, 8, 1))
    assert edge_error(ramp, ramp, np.ones_like(ramp)) == 0.0
    assert edge_error(2 * ramp, ramp, np.ones_like(ramp)) > 0.5


def test_load_paired_models_round_trip_and_a_clear_error(tmp_path):
    from gen3d_lessons.models.unet import UNet3D, UNetConfig
    from gen3d_lessons.tasks.translate import load_paired_models
    from gen3d_lessons.training import save_model

    with pytest.raises(FileNotFoundError, match="ch09_translation"):
        load_paired_models(tmp_path, "_smoke")
    G, seg = _translator(), UNet3D(UNetConfig(1, 4, (4, 8)))
    save_model(tmp_path / "ch09_pix2pix_smoke.pt", G, G.cfg)
    save_model(tmp_path / "ch09_t2_segmenter_smoke.pt", seg, seg.cfg)
    G2, seg2 = load_paired_models(tmp_path, "_smoke")
    t1 = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    assert G2.cfg == G.cfg and np.allclose(translate(G2, t1)["T2"], translate(G, t1)["T2"])
    assert all(torch.equal(a, b) for a, b in zip(seg.state_dict().values(), seg2.state_dict().values()))
