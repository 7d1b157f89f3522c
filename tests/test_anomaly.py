"""Anomaly detection (chapter 12): registration helpers, the three detectors, score(), the metrics, table and figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen3d_lessons import spatial
from gen3d_lessons.tasks.anomaly import (ResidualDetector, StandardisedDetector, VQTransformerDetector, ZScoreAtlas,
                                   age_site_condition, invert_displacement, phantom_cohort, score, score_cohort,
                                   signed_residual, to_subject, to_template)
from gen3d_lessons.metrics.detection import (detection_table, evaluate, lesion_fraction, lesion_volumes,
                                             small_lesions)
from gen3d_lessons.models.vae import VAE3D, VAEConfig
from gen3d_lessons.models.vqvae import CodeTransformer, TransformerConfig, VQVAE3D, VQVAEConfig, to_sequence

N = 16   # edge of the test volumes


@pytest.fixture(scope="module")
def cohort():
    return phantom_cohort(3, 2, size=N, seed=5, lesion_radius_mm=(10.0, 16.0), progress=False)


@pytest.fixture(scope="module")
def atlas(cohort):
    return ZScoreAtlas.fit(to_template(cohort.image[:3], cohort.displacement[:3]))


def smooth_field(seed: int = 0, amplitude: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return spatial.smooth_random_field((1, 3, N, N, N), sigma_vox=4.0, amplitude=amplitude, generator=g)


# 1. Data and registration ---------------------------------------------------------------------------

def test_phantom_cohort_shapes_and_order(cohort):
    assert cohort.image.shape == (5, 1, N, N, N) and cohort.image.dtype == torch.float32
    assert cohort.label.shape == (5, N, N, N) and cohort.displacement.shape == (5, 3, N, N, N)
    assert cohort.has_lesion.tolist() == [False, False, False, True, True]
    assert not cohort.lesion[:3].any() and all(cohort.lesion[i].any() for i in (3, 4))
    assert (cohort.lesion <= cohort.brain).all() and cohort.spacing_mm > 5
    two = phantom_cohort(1, size=N, seed=5, channels=("T1", "FLAIR"), progress=False)
    assert two.image.shape == (1, 2, N, N, N)
    assert torch.equal(two.image[:, 1:], cohort.image[:1])                   # same seed, same subject


@pytest.mark.parametrize("kwargs, match", [(dict(n_healthy=-1), "n_healthy"), (dict(n_healthy=0), "at least one"),
                                           (dict(n_healthy=1, channels=("DWI",)), "channels")])
def test_phantom_cohort_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        phantom_cohort(size=N, progress=False, **kwargs)


def test_age_site_condition():
    c = age_site_condition([{"age": 50.0, "site": 2}, {"age": 20.0, "site": 0}])
    assert torch.allclose(c, torch.tensor([[0.5, 0, 0, 1], [0.2, 1, 0, 0]]))
    with pytest.raises(ValueError, match="site 3"):
        age_site_condition([{"age": 50.0, "site": 3}])


def test_inverse_displacement_undoes_the_map():
    u = smooth_field()
    v = invert_displacement(u)
    residual = v + spatial.warp(u, v, padding_mode="border")                 # phi_u(phi_v(y)) - y
    inner = (slice(None), slice(None), *(slice(3, -3),) * 3)
    assert residual[inner].abs().max() < 0.01 < 1 < u.abs().max()


def test_to_template_and_back_is_close_to_identity():
    u = smooth_field(1)
    x = spatial.gaussian_blur(torch.rand(1, 1, N, N, N, generator=torch.Generator().manual_seed(0)), 2.0)
    back = to_subject(to_template(x, u), u)
    inner = (slice(None), slice(None), *(slice(3, -3),) * 3)
    assert (back - x)[inner].abs().max() < 0.02
    assert to_subject(x, torch.zeros(3, 3, N, N, N)).shape == (3, 1, N, N, N)   # a template broadcasts


def test_signed_residual_polarities():
    x, e = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    assert signed_residual(x, e).tolist() == [0.5, -0.5]
    assert signed_residual(x, e, "dark").tolist() == [-0.5, 0.5]
    assert signed_residual(x, e, "both").tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="polarity"):
        signed_residual(x, e, "up")


# 2. The atlas baseline -----------------------------------------------------------------------------

def test_zscore_atlas_flags_a_bright_spot():
    g = torch.Generator().manual_seed(0)
    healthy = 0.5 + 0.05 * torch.randn(20, 1, 8, 8, 8, generator=g)
    atlas = ZScoreAtlas.fit(healthy, registered=False)
    assert torch.allclose(atlas.mean, healthy.mean(0, keepdim=True)) and atlas.needs == ()
    x = healthy[:1].clone()
    x[0, 0, 4, 4, 4] += 1.0
    z = score(atlas, x[0])                                                   # one volume in, one map out
    assert z.shape == (1, 8, 8, 8)
    assert z.flatten().argmax() == np.ravel_multi_index((4, 4, 4), (8, 8, 8)) and z.max() > 10


def test_zscore_atlas_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        ZScoreAtlas.fit(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        ZScoreAtlas.fit(torch.rand(3, 1, 8, 8, 8), channel=1)
    with pytest.raises(ValueError, match="NaN"):
        ZScoreAtlas.fit(torch.full((3, 1, 8, 8, 8), float("nan")))


def test_registered_atlas_scores_in_subject_space(cohort, atlas):
    z = score(atlas, cohort.image, displacement=cohort.displacement)
    assert z.shape == (5, 1, N, N, N) and torch.isfinite(z).all()
    metrics = evaluate(z[:, 0], cohort.lesion, cohort.brain)
    assert metrics["auroc"] > 0.8                                            # lesions are bright on FLAIR


# 3. The generative detectors ------------------------------------------------------------------------

def tiny_cvae(cond_dim: int = 4) -> VAE3D:
    torch.manual_seed(0)
    return VAE3D(VAEConfig(size=N, channels=(8, 16), latent_dim=8, cond_dim=cond_dim))


def test_residual_detector_registered_cvae(cohort):
    detector = ResidualDetector(tiny_cvae())
    assert set(detector.needs) == {"condition", "displacement"}
    c = age_site_condition(cohort.attributes)
    a = score(detector, cohort.image, condition=c, displacement=cohort.displacement)
    x_hat = detector.reconstruct(cohort.image, c, cohort.displacement)
    assert a.shape == (5, 1, N, N, N) and torch.allclose(a, cohort.image - x_hat, atol=1e-5)
    single = score(detector, cohort.image[0], condition=c[0], displacement=cohort.displacement[0])
    assert torch.allclose(single, a[0], atol=1e-5)


def test_residual_detector_unregistered_vae_needs_nothing(cohort):
    detector = ResidualDetector(tiny_cvae(cond_dim=0), registered=False, polarity="both")
    a = score(detector, cohort.image.numpy())                                # numpy works too
    assert detector.needs == () and a.shape == (5, 1, N, N, N) and (a >= 0).all()


def tiny_vq(codes: int = 8) -> tuple[VQVAE3D, CodeTransformer]:
    torch.manual_seed(0)
    vq = VQVAE3D(VQVAEConfig(channels=(8, 8), num_embeddings=codes, embedding_dim=4))
    tf = CodeTransformer(TransformerConfig(vocab_size=codes, block_size=(N // 4) ** 3, n_layer=1, n_head=2, n_embd=16))
    return vq.eval(), tf.eval()


def test_healing_replaces_unlikely_codes_in_raster_order():
    vq, tf = tiny_vq()
    codes = torch.randint(0, 8, (2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    same, none = VQTransformerDetector(vq, tf, threshold=0.0).heal(codes)
    assert torch.equal(same, codes) and not none.any()
    # every code is "unlikely" below a threshold above 1: the first three positions are resampled
    healed, resampled = VQTransformerDetector(vq, tf, threshold=1.1, max_resampled=3).heal(codes)
    s, r = to_sequence(healed), to_sequence(resampled)
    assert r[:, :3].all() and not r[:, 3:].any()
    assert torch.equal(s[:, 3:], to_sequence(codes)[:, 3:])
    # each replacement is the transformer's most likely code given the healed prefix
    assert torch.equal(s[:, :3], tf(s)[:, :3].argmax(-1))


def test_vq_detector_maps_and_mask(cohort):
    vq, tf = tiny_vq()
    detector = VQTransformerDetector(vq, tf, threshold=1.1, max_resampled=2, mask_floor=0.5)
    x_healed, m = detector.reconstruct(cohort.image, cohort.displacement)
    assert x_healed.shape == cohort.image.shape and m.shape == (5, 1, N, N, N)
    assert 0 <= m.min() and m.max() <= 1 and m.max() > 0
    a = score(detector, cohort.image, displacement=cohort.displacement)
    assert torch.allclose(a, (cohort.image - x_healed) * (0.5 + m), atol=1e-5)


def test_standardised_detector_is_a_zscore_of_healthy_maps(cohort):
    base = ResidualDetector(tiny_cvae(cond_dim=0))
    std = StandardisedDetector.fit(base, cohort.image[:3], displacement=cohort.displacement[:3])
    assert std.needs == ("displacement",) and std.mean.shape == (1, 1, N, N, N) and (std.std >= 0).all()
    a = score(std, cohort.image, displacement=cohort.displacement)
    raw = score(base, cohort.image, displacement=cohort.displacement)
    mean, sd = to_subject(std.mean, cohort.displacement), to_subject(std.std, cohort.displacement)
    assert torch.allclose(a, (raw - mean) / (sd + std.eps), atol=1e-4)
    cvae = StandardisedDetector.fit(ResidualDetector(tiny_cvae()), cohort.image[:3], displacement=cohort.displacement[:3],
                                    condition=age_site_condition(cohort.attributes[:3]))
    assert set(cvae.needs) == {"condition", "displacement"}
    with pytest.raises(ValueError, match="takes 4 values"):
        score(cvae, cohort.image[:1], condition=torch.zeros(1, 2), displacement=cohort.displacement[:1])
    with pytest.raises(ValueError, match="at least 2"):
        StandardisedDetector.fit(base, cohort.image[:1], displacement=cohort.displacement[:1])


# 4. score(): bad input gives clear errors ---------------------------------------------------------

@pytest.mark.parametrize("make_image, match", [
    (lambda x: x[0, 0, :, :, 0], r"a 2D image\?"),                         # a 2D slice
    (lambda x: x[0, 0], r"without its channel axis"),                       # 3D without channels
    (lambda x: x.index_fill(2, torch.tensor([3]), float("nan")), "NaN"),
    (lambda x: torch.cat([x, x], 1), r"expected 1 channel"),
    (lambda x: x.permute(0, 2, 3, 4, 1), r"channel"),                      # channels last
    (lambda x: x[:, :, :8, :8, :8], r"built for volumes of \(16, 16, 16\)"),
    (lambda x: x.numpy().astype(bool), "dtype bool"),
    (lambda x: x.tolist(), "expected an array or tensor"),
])
def test_score_rejects_bad_images(cohort, atlas, make_image, match):
    with pytest.raises(ValueError, match=match):
        score(atlas, make_image(cohort.image[:2].clone()), displacement=cohort.displacement[:2])


def test_score_rejects_bad_context(cohort, atlas):
    x, u = cohort.image[:2], cohort.displacement[:2]
    with pytest.raises(ValueError, match="needs a displacement"):
        score(atlas, x)
    with pytest.raises(ValueError, match="1 given for 2"):
        score(atlas, x, displacement=u[:1])
    with pytest.raises(ValueError, match=r"displacement: expected shape \(3, 16, 16, 16\)"):
        score(atlas, x, displacement=u[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        score(atlas, x, displacement=torch.full_like(u, float("nan")))
    cvae = ResidualDetector(tiny_cvae())
    with pytest.raises(ValueError, match="needs a condition"):
        score(cvae, x, displacement=u)
    with pytest.raises(ValueError, match="takes 4 values"):
        score(cvae, x, condition=torch.zeros(2, 3), displacement=u)
    with pytest.raises(TypeError, match="detector"):
        score(lambda x: x, x)


# 5. Scoring a cohort, small lesions, the table and the figure (chapter 12's evaluation) ----------------

def test_score_cohort_matches_score_and_batches(cohort, atlas):
    maps = score_cohort(atlas, cohort, batch=2)
    assert maps.shape == (5, N, N, N)
    assert torch.equal(maps, score(atlas, cohort.image, displacement=cohort.displacement)[:, 0])
    cvae = ResidualDetector(tiny_cvae())                                       # the condition comes from the cohort
    c = age_site_condition(cohort.attributes)
    assert torch.allclose(score_cohort(cvae, cohort, batch=3),
                          score(cvae, cohort.image, condition=c, displacement=cohort.displacement)[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        score_cohort(atlas, cohort, batch=0)


def two_lesions() -> tuple[torch.Tensor, torch.Tensor]:
    lesion = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    lesion[0, 1:3, 1:3, 1:3] = True                                             # 8 voxels
    lesion[0, 6, 6, 6] = True                                                   # 1 voxel, apart from the first
    lesion[1, 4:7, 4:7, 4:7] = True                                             # 27 voxels
    return lesion, torch.ones(2, 8, 8, 8, dtype=torch.bool)


def test_lesion_volumes_counts_connected_pieces():
    lesion, _ = two_lesions()
    size_of, volumes = lesion_volumes(lesion)
    assert sorted(volumes.tolist()) == [1, 8, 27] and size_of.dtype == torch.int64
    assert size_of[0, 1, 1, 1] == 8 and size_of[0, 6, 6, 6] == 1 and size_of[1, 5, 5, 5] == 27
    assert (size_of[~lesion] == 0).all()
    diagonal = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    diagonal[0, 0, 0, 0] = diagonal[0, 1, 1, 1] = True                         # corners touch: one lesion (26-neighbours)
    assert lesion_volumes(diagonal)[1].tolist() == [2]
    with pytest.raises(ValueError, match="binary"):
        lesion_volumes(torch.rand(1, 4, 4, 4))


def test_small_lesions_leave_the_larger_ones_out():
    lesion, brain = two_lesions()
    small = small_lesions(lesion, brain)                                        # median of (1, 8, 27) is 8
    assert small.below == 8.0 and small.count == 1
    assert small.lesion.sum() == 1 and small.lesion[0, 6, 6, 6]
    assert (small.brain == brain & ~(lesion & ~small.lesion)).all()            # larger lesions are neither positive nor healthy
    assert small_lesions(lesion, brain, below=10).lesion.sum() == 9
    with pytest.raises(ValueError, match="no lesion"):
        small_lesions(torch.zeros_like(lesion), brain)
    with pytest.raises(ValueError, match="one shape"):
        small_lesions(lesion, brain[:1])


def test_lesion_fraction_and_detection_table():
    lesion, brain = two_lesions()
    assert lesion_fraction(lesion, brain) == pytest.approx(36 / 1024)
    g = torch.Generator().manual_seed(0)
    perfect = lesion.float() + 0.01 * torch.rand(lesion.shape, generator=g)
    maps = {"perfect": perfect, "noise": torch.rand(lesion.shape, generator=g)}
    table = detection_table(maps, lesion, brain, [True, True], small=small_lesions(lesion, brain))
    assert list(table.index) == ["perfect", "noise"]
    assert list(table.columns) == ["auroc", "auprc", "best_dice", "volume_auroc", "auroc_small", "auprc_small"]
    assert table.loc["perfect", ["auroc", "auprc", "best_dice", "auprc_small"]].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert np.isnan(table.loc["perfect", "volume_auroc"])                       # every volume is lesioned
    row = evaluate(maps["noise"], lesion, brain, [True, True])
    assert table.loc["noise", "auprc"] == row["auprc"] and table.loc["noise", "auroc"] == row["auroc"]
    assert list(detection_table(maps, lesion, brain).columns) == ["auroc", "auprc", "best_dice", "volume_auroc"]
    with pytest.raises(ValueError, match="non-empty dict"):
        detection_table({}, lesion, brain)


def test_anomaly_panels_draws_the_image_and_every_map(cohort):
    from gen3d_lessons.viz import anomaly_panels

    i = 4                                                                      # a lesioned subject
    fig = anomaly_panels({"FLAIR": cohort.image[i, 0], "a": cohort.image[i, 0], "b": -cohort.image[i, 0],
                          "c": cohort.image[i, 0]}, cohort.lesion[i], cohort.brain[i], title="subject 4")
    assert len(fig.axes) == 6 and [a.get_title() for a in fig.axes[:4]] == ["FLAIR", "a", "b", "c"]
    k = int(cohort.lesion[i].sum((0, 1)).argmax())
    assert f"z={k}" in fig._suptitle.get_text()                                 # the slice with the most lesion
    with pytest.raises(ValueError, match="selects no voxel"):
        anomaly_panels({"FLAIR": cohort.image[i, 0]}, cohort.lesion[i], torch.zeros_like(cohort.brain[i]))
    with pytest.raises(ValueError, match="differs"):
        anomaly_panels({"FLAIR": cohort.image[i, 0], "a": cohort.image[i, 0, :8]}, cohort.lesion[i], cohort.brain[i])
