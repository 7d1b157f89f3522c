"""Chapter 4's library: AE / DAE, PCA, VAE / CVAE, their step functions, and the deep SCM."""

import math

import numpy as np
import pytest
import torch

from gen3d_lessons.blocks import check_volumes
from gen3d_lessons.losses import gaussian_nll, kl_per_voxel, kl_to_standard_normal
from gen3d_lessons.models.autoencoder import AEConfig, Autoencoder3D, PCA3D, UNetAutoencoder3D
from gen3d_lessons.data.brain import ventricle_volume_ml
from gen3d_lessons.models.scm import DeepSCM, VolumeMechanism, VoxelwiseAgeModel
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.models.vae import VAE3D, VAEConfig
from gen3d_lessons.training import load_model, save_model
from gen3d_lessons.training.generative import ae_step, corrupt, vae_step

S = 16                                              # voxels per side: tiny, so the file runs in seconds


def tiny_ae(latent=4):
    return Autoencoder3D(AEConfig(size=S, channels=(8, 8), latent_dim=latent, groups=4))


def tiny_vae(cond_dim=0, latent=4):
    return VAE3D(VAEConfig(size=S, channels=(8, 8), latent_dim=latent, cond_dim=cond_dim, groups=4))


def volumes(n=3, seed=0):
    return torch.rand(n, 1, S, S, S, generator=torch.Generator().manual_seed(seed))


# 1. The plain autoencoder (Eq. 6) ----------------------------------------------------------------

def test_autoencoder_shapes_and_gradients():
    torch.manual_seed(0)
    ae = tiny_ae()
    x = volumes()
    z = ae.encode(x)
    assert z.shape == (3, 4)
    x_hat = ae(x)
    assert x_hat.shape == x.shape
    ((x_hat - x) ** 2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ae.parameters())
    assert ae.encoder[0][0].weight.grad.abs().sum() > 0          # the error reaches the first layer


@pytest.mark.parametrize("bad, what", [
    (torch.rand(2, 1, S, S), "shape"),                           # 2D images
    (torch.rand(2, 2, S, S, S), "shape"),                        # wrong channel count
    (torch.rand(2, 1, 8, 8, 8), "shape"),                        # wrong size
    (torch.full((2, 1, S, S, S), float("nan")), "NaN"),
    (torch.ones(2, 1, S, S, S, dtype=torch.int64), "floating"),
    (np.zeros((2, 1, S, S, S), np.float32), "torch.Tensor"),
])
def test_autoencoder_rejects_bad_input(bad, what):
    with pytest.raises(ValueError, match=what):
        tiny_ae().encode(bad)


def test_autoencoder_config_and_latent_checks():
    with pytest.raises(ValueError, match="multiple"):
        AEConfig(size=20, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="groups"):
        AEConfig(channels=(6, 8))
    with pytest.raises(ValueError, match="z"):
        tiny_ae().decode(torch.zeros(2, 5))


def test_autoencoder_save_load_round_trip(tmp_path):
    ae = tiny_ae()
    path = save_model(tmp_path / "ae.pt", ae, ae.cfg)
    back = load_model(path, lambda c: Autoencoder3D(AEConfig(**c)))
    x = volumes(2)
    assert torch.allclose(back.reconstruct(x), ae.reconstruct(x))


# 2. Training steps: AE, DAE (Eq. 9), U-Net, VAE ------------------------------------------------

def test_ae_step_learns_and_dae_corrupts():
    torch.manual_seed(0)
    ae = tiny_ae()
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    x = volumes(2)
    losses = [ae_step({"image": x}, i, model=ae, optimizer=opt)["loss"] for i in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    out = ae_step({"image": x}, 15, model=ae, optimizer=opt, noise_std=0.2)
    assert math.isfinite(out["loss"])
    with pytest.raises(ValueError, match="noise_std"):
        ae_step({"image": x}, 0, model=ae, optimizer=opt, noise_std=-1.0)
    with pytest.raises(ValueError, match="image"):
        ae_step({"x": x}, 0, model=ae, optimizer=opt)


def test_ae_step_trains_a_unet_and_refuses_a_wrong_output_shape():
    unet = UNet3D(UNetConfig(in_channels=1, out_channels=1, features=(4, 8)))
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    assert math.isfinite(ae_step({"image": volumes(2)}, 0, model=unet, optimizer=opt)["loss"])
    two = UNet3D(UNetConfig(in_channels=1, out_channels=2, features=(4, 8)))
    with pytest.raises(ValueError, match="shape"):
        ae_step({"image": volumes(2)}, 0, model=two, optimizer=torch.optim.Adam(two.parameters()))


def test_corrupt_adds_gaussian_noise_of_the_given_std():
    x = torch.zeros(4, 1, S, S, S)
    assert corrupt(x, 0.0) is x
    noisy = corrupt(x, 0.3, torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and abs(noisy.std().item() - 0.3) < 0.01 and abs(noisy.mean().item()) < 0.01


def test_vae_shapes_reparameterisation_and_step():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = volumes(3)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 4)
    # z = mu + sigma * eps: with logvar = log 4 the samples spread with std 2 around mu
    z = VAE3D.reparameterize(torch.zeros(20000, 1), torch.full((20000, 1), math.log(4.0)))
    assert abs(z.std().item() - 2.0) < 0.05
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    out = vae_step({"image": x}, 0, model=vae, optimizer=opt, beta=1.0)
    assert set(out) == {"loss", "mse", "kl"} and all(math.isfinite(v) for v in out.values())
    assert vae.sample(2).shape == (2, 1, S, S, S)
    assert vae.reconstruct(x).shape == x.shape


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    assert torch.allclose(kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))
    assert (kl_to_standard_normal(torch.ones(2, 3), torch.zeros(2, 3)) > 0).all()
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    # the VAE-regularised U-Net's KL: the same divergence, averaged over the batch and per voxel
    assert kl_per_voxel(mu, logvar, 1000).item() == pytest.approx(kl_to_standard_normal(mu, logvar).mean().item() / 1000)


def test_gaussian_nll_is_half_the_squared_error_per_volume():
    x = torch.zeros(2, 1, 2, 2, 2)
    assert gaussian_nll(x, x + 1.0).item() == pytest.approx(0.5 * 8)       # 8 voxels, each (1 - 0)² / 2


def test_cvae_needs_its_condition():
    cvae = tiny_vae(cond_dim=2)
    x = volumes(2)
    assert cvae(x, torch.zeros(2, 2))[0].shape == x.shape
    with pytest.raises(ValueError, match="condition"):
        cvae(x)
    with pytest.raises(ValueError, match="condition"):
        cvae(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cond_dim=0"):
        tiny_vae()(x, torch.zeros(2, 2))
    opt = torch.optim.Adam(cvae.parameters(), lr=1e-3)
    assert math.isfinite(vae_step({"image": x, "condition": torch.zeros(2, 2)}, 0, model=cvae, optimizer=opt)["loss"])


def test_vae_save_load_round_trip(tmp_path):
    vae = tiny_vae(cond_dim=1)
    path = save_model(tmp_path / "vae.pt", vae, vae.cfg)
    back = load_model(path, lambda c: VAE3D(VAEConfig(**c)))
    x, c = volumes(2), torch.zeros(2, 1)
    assert back.cfg == vae.cfg
    assert torch.allclose(back.reconstruct(x, c), vae.reconstruct(x, c))


# 3. PCA, the classical baseline --------------------------------------------------------------------

def test_pca_reconstructs_training_volumes_exactly_with_n_minus_1_components():
    x = volumes(5)
    pca = PCA3D(4).fit(x)
    assert torch.allclose(pca.reconstruct(x), x, atol=1e-5)
    v = pca.components
    assert torch.allclose(v @ v.T, torch.eye(4, dtype=v.dtype), atol=1e-8)        # orthonormal axes
    assert (pca.explained_variance[:-1] >= pca.explained_variance[1:]).all()      # sorted
    assert pca.encode(x).shape == (5, 4) and pca.decode(torch.zeros(1, 4)).shape == (1, 1, S, S, S)
    # fewer components: the error grows, and no linear code of that size does better on the training set
    err = [(PCA3D(k).fit(x).reconstruct(x) - x).pow(2).mean().item() for k in (1, 2, 3)]
    assert err[0] > err[1] > err[2] > 0


def test_pca_samples_have_the_training_variance_along_each_component():
    x = torch.randn(8, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pca = PCA3D(3).fit(x)
    samples = pca.sample(4000, torch.Generator().manual_seed(1))
    assert samples.shape == (4000, 1, 4, 4, 4)
    var = pca.encode(samples).var(0)                                      # back in component space
    assert torch.allclose(var, pca.explained_variance.float(), rtol=0.1)
    again = pca.sample(4000, torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)
    with pytest.raises(ValueError, match="fit"):
        PCA3D(2).sample(1)


def test_pca_rejects_bad_use():
    with pytest.raises(ValueError, match="at least"):
        PCA3D(5).fit(volumes(5))
    with pytest.raises(ValueError, match="fit"):
        PCA3D(2).encode(volumes(2))
    with pytest.raises(ValueError, match="k"):
        PCA3D(0)
    pca = PCA3D(2).fit(volumes(4))
    with pytest.raises(ValueError, match="shape"):
        pca.encode(torch.rand(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        pca.encode(torch.full((1, 1, S, S, S), float("nan")))
    with pytest.raises(ValueError, match="z"):
        pca.decode(torch.zeros(1, 3))


def test_check_volumes_accepts_a_good_batch():
    check_volumes(volumes(1), 1, S)


# 4. The deep SCM -----------------------------------------------------------------------------------

def test_ventricle_volume_counts_only_deep_csf():
    # a 20 mm-radius "brain" with CSF in its centre (radius 5 mm) and in a shell at its edge
    r = np.linalg.norm(np.indices((32, 32, 32)) - 15.5, axis=0)       # voxels of 2 mm: radius in voxels
    label = np.where(r < 10, 3, 0)                                      # WM brain, 20 mm radius
    label[r < 2.5] = 1                                                  # ventricle
    label[(r >= 9) & (r < 10)] = 1                                      # sulcal CSF at the surface
    vol = ventricle_volume_ml(label, spacing=2.0, depth_mm=8.0)
    assert vol == pytest.approx((r < 2.5).sum() * 8 / 1000)
    with pytest.raises(ValueError, match="3D"):
        ventricle_volume_ml(label[0], 2.0)
    with pytest.raises(ValueError, match="spacing"):
        ventricle_volume_ml(label, (2.0, -1.0, 2.0))
    with pytest.raises(ValueError, match="integer"):
        ventricle_volume_ml(label + 0.5, 2.0)


def test_volume_mechanism_fits_and_inverts():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 400)
    t = (age - age.mean()) / age.std(ddof=1)
    log_v = 3.5 + 0.4 * t + 0.1 * t ** 2 + 0.05 * rng.standard_normal(400)
    mech = VolumeMechanism.fit(age, np.exp(log_v))
    assert mech.coef == pytest.approx((3.5, 0.4, 0.1), abs=0.02) and mech.sigma == pytest.approx(0.05, abs=0.01)
    eps = mech.abduct(age, np.exp(log_v))
    assert torch.allclose(mech.predict(age, eps), torch.as_tensor(np.exp(log_v)), rtol=1e-9)
    older = mech.predict(age + 20, eps)
    assert (older > torch.as_tensor(np.exp(log_v))).float().mean() > 0.95   # volumes grow with age here
    with pytest.raises(ValueError, match="age"):
        mech.abduct([np.nan], [30.0])
    with pytest.raises(ValueError, match="positive"):
        mech.abduct([50.0], [-1.0])
    with pytest.raises(ValueError, match="ages"):
        mech.mu([200.0])


def make_scm():
    torch.manual_seed(0)
    ages, vols = [25.0, 40.0, 55.0, 70.0, 85.0], [20.0, 25.0, 30.0, 40.0, 55.0]
    return DeepSCM.from_cohort(ages, vols, tiny_vae(cond_dim=2))


def test_counterfactual_at_the_same_age_returns_the_observation():
    scm = make_scm()
    x = volumes(2)
    x_cf, v_cf = scm.counterfactual(x, [30.0, 60.0], [22.0, 35.0], new_age=[30.0, 60.0])
    assert torch.allclose(x_cf, x, atol=1e-5) and torch.allclose(v_cf, torch.tensor([22.0, 35.0]), rtol=1e-5)
    older, v_old = scm.counterfactual(x, [30.0, 60.0], [22.0, 35.0], new_age=[50.0, 80.0])
    assert older.shape == x.shape and (v_old > torch.tensor([22.0, 35.0])).all()
    mean_only, _ = scm.counterfactual(x, [30.0, 60.0], [22.0, 35.0], new_age=[50.0, 80.0], keep_residual=False)
    noise = scm.abduct(x, [30.0, 60.0], [22.0, 35.0])
    assert torch.allclose(older, mean_only + noise.eps_x, atol=1e-6)
    x_s, v_s = scm.sample([30.0, 80.0], generator=torch.Generator().manual_seed(0))
    assert x_s.shape == (2, 1, S, S, S) and v_s.shape == (2,)


def test_scm_rejects_bad_input():
    scm = make_scm()
    x = volumes(2)
    with pytest.raises(ValueError, match="shape"):
        scm.counterfactual(x[:, :, 0], [30.0, 60.0], [22.0, 35.0], [50.0, 80.0])
    with pytest.raises(ValueError, match="one per volume"):
        scm.counterfactual(x, [30.0], [22.0, 35.0], [50.0, 80.0])
    with pytest.raises(ValueError, match="new_age"):
        scm.counterfactual(x, [30.0, 60.0], [22.0, 35.0], [float("nan"), 80.0])
    with pytest.raises(ValueError, match="cond_dim=2"):
        DeepSCM.from_cohort([25.0, 40.0, 55.0, 70.0], [20.0, 25.0, 30.0, 40.0], tiny_vae(cond_dim=1))


def test_voxelwise_age_model_recovers_a_linear_trend():
    ages = torch.tensor([20.0, 40.0, 60.0, 80.0])
    base, slope = volumes(1), 0.01 * volumes(1, seed=1)
    x = base + slope * ages.view(-1, 1, 1, 1, 1)
    model = VoxelwiseAgeModel().fit(x, ages)
    assert torch.allclose(model.slope, slope, atol=1e-5)
    assert torch.allclose(model.counterfactual(x[:1], [20.0], [80.0]), x[3:], atol=1e-4)
    with pytest.raises(ValueError, match="fit"):
        VoxelwiseAgeModel().counterfactual(x, ages, ages)
    with pytest.raises(ValueError, match="different ages"):
        VoxelwiseAgeModel().fit(x, [50.0] * 4)


def test_voxelwise_age_model_separates_a_confounded_covariate():
    # site 1 is brighter, and its subjects happen to be the old ones: without the covariate the
    # brightness leaks into the age slope
    ages = torch.tensor([20.0, 30.0, 40.0, 60.0, 70.0, 80.0])
    site = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    base, slope = volumes(1), 0.01 * volumes(1, seed=1)
    x = base + slope * ages.view(-1, 1, 1, 1, 1) + 0.5 * site.view(-1, 1, 1, 1, 1)
    assert not torch.allclose(VoxelwiseAgeModel().fit(x, ages).slope, slope, atol=1e-3)
    assert torch.allclose(VoxelwiseAgeModel().fit(x, ages, covariates=site[:, None]).slope, slope, atol=1e-5)
    with pytest.raises(ValueError, match="covariates"):
        VoxelwiseAgeModel().fit(x, ages, covariates=site[:3, None])


def test_unet_autoencoder_copies_through_its_skips():
    torch.manual_seed(0)
    cfg = AEConfig(size=S, channels=(8, 8), latent_dim=4, groups=4)
    unet = UNetAutoencoder3D(cfg)
    x = volumes(2)
    z, skips = unet.encode_with_skips(x)
    assert z.shape == (2, 4) and [s.shape[2] for s in skips] == [S // 2, S // 4]
    assert unet(x).shape == x.shape and unet.decode(z).shape == x.shape      # decode(z) alone: zero skips
    # the output depends on the input through the skips even when the bottleneck is fixed
    y = unet.decode(torch.zeros_like(z), skips)
    y.sum().backward()
    assert unet.encoder[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="skips"):
        unet.decode(z, skips[:1])


# 5. Chapter 4's recipes, evaluations and checks ---------------------------------------------------

from functools import partial                                            # noqa: E402
from pathlib import Path                                                 # noqa: E402

from gen3d_lessons.book import results as book_results                   # noqa: E402
from gen3d_lessons.book.results import Checks                            # noqa: E402
from gen3d_lessons.data.batches import Batches                           # noqa: E402
from gen3d_lessons.metrics import reconstruction_scores, reconstruction_table   # noqa: E402
from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig        # noqa: E402
from gen3d_lessons.tasks import counterfactual as CF                     # noqa: E402
from gen3d_lessons.tasks import yardstick as Y                           # noqa: E402
from gen3d_lessons.training import fit                                   # noqa: E402
from gen3d_lessons.training.generative import train_autoencoder, train_vae   # noqa: E402


def test_train_autoencoder_is_the_fit_of_ae_step_it_replaces():
    x = volumes(4)
    torch.manual_seed(0)
    by_hand = tiny_ae()
    opt = torch.optim.Adam(by_hand.parameters(), lr=1e-3)
    h1 = fit(partial(ae_step, model=by_hand, optimizer=opt, noise_std=0.1),
             Batches({"image": x}, 2, seed=0, augment=("image",)), max_steps=3, desc="AE")
    torch.manual_seed(0)
    recipe = tiny_ae()
    h2 = train_autoencoder(recipe, x, steps=3, batch=2, lr=1e-3, noise_std=0.1)
    assert h1.values["loss"] == h2.values["loss"] and h2.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), recipe.state_dict().values()))


def test_train_vae_is_the_fit_of_vae_step_and_needs_a_condition_exactly_for_a_cvae():
    x, c = volumes(4), torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    by_hand = tiny_vae(cond_dim=2)
    opt = torch.optim.Adam(by_hand.parameters(), lr=1e-3)
    h1 = fit(partial(vae_step, model=by_hand, optimizer=opt, beta=0.5),
             Batches({"image": x, "condition": c}, 2, seed=0, augment=("image",)), max_steps=3)
    torch.manual_seed(0)
    recipe = tiny_vae(cond_dim=2)
    h2 = train_vae(recipe, x, c, steps=3, batch=2, lr=1e-3, beta=0.5)
    assert h1.values == h2.values and {"loss", "mse", "kl"} <= set(h2.values)
    with pytest.raises(ValueError, match="condition"):
        train_vae(tiny_vae(), x, c, steps=1, batch=2, lr=1e-3)
    with pytest.raises(ValueError, match="condition"):
        train_vae(tiny_vae(cond_dim=2), x, steps=1, batch=2, lr=1e-3)


def test_reconstruct_without_code_erases_the_ae_but_not_the_unets_skips():
    torch.manual_seed(0)
    ae, unet = tiny_ae(), UNetAutoencoder3D(AEConfig(size=S, channels=(8, 8), latent_dim=4, groups=4))
    x = volumes(2)
    erased = ae.reconstruct_without_code(x)
    assert erased.shape == x.shape and torch.equal(erased[0], erased[1])         # nothing of x is left
    assert torch.equal(erased, ae.decode(torch.zeros(2, 4)))
    skipped = unet.reconstruct_without_code(x)
    z, skips = unet.encode_with_skips(x)
    assert torch.allclose(skipped, unet.decode(torch.zeros_like(z), skips)) and not torch.equal(skipped[0], skipped[1])
    with pytest.raises(ValueError, match="x: expected"):
        ae.reconstruct_without_code(x[:, :, :8])


def test_vae_interpolate_decodes_the_line_between_two_posterior_means():
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    x = volumes(2)
    path = vae.interpolate(x, torch.tensor([0.0, 0.5, 1.0]))
    mu, _ = vae.encode(x)
    assert path.shape == (3, 1, S, S, S)
    assert torch.allclose(path[0], vae.reconstruct(x)[0], atol=1e-6) and torch.allclose(path[2], vae.reconstruct(x)[1], atol=1e-6)
    assert torch.allclose(path[1], vae.decode(0.5 * mu[:1] + 0.5 * mu[1:])[0], atol=1e-6)
    cvae = tiny_vae(cond_dim=2)
    assert cvae.interpolate(x, torch.tensor([0.0, 1.0]), torch.zeros(2, 2)).shape == (2, 1, S, S, S)
    with pytest.raises(ValueError, match="two end points"):
        vae.interpolate(volumes(3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="t: expected"):
        vae.interpolate(x, torch.zeros(2, 1))


def test_decode_at_ages_holds_the_code_and_moves_the_parents():
    scm = make_scm()
    z, ages = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([30.0, 70.0])
    grid = scm.decode_at_ages(z, ages)
    assert grid.shape == (2, 3, 1, S, S, S)
    v70 = scm.volume.predict([70.0], [0.0])                                       # the typical volume at 70
    expected = scm.image_model.decode(z, scm.condition([70.0] * 3, v70.repeat(3)))
    assert torch.allclose(grid[1], expected, atol=1e-6) and not torch.allclose(grid[0], grid[1])
    with pytest.raises(ValueError, match="z: expected"):
        scm.decode_at_ages(z[:, :2], ages)


def test_reconstruction_scores_average_ssim_and_psnr_over_the_batch():
    x = volumes(3)
    mask = x > 0.3
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    s = reconstruction_scores(noisy, x, mask, region="brain")
    assert list(s) == ["SSIM (brain)", "SSIM (volume)", "PSNR (brain, dB)"] and all(isinstance(v, float) for v in s.values())
    assert reconstruction_scores(x, x, mask)["SSIM (brain)"] == pytest.approx(1.0)
    assert 0 < s["SSIM (brain)"] < 1 and 20 < s["PSNR (brain, dB)"] < 30                  # σ = 0.05: about 26 dB
    table = reconstruction_table({"noisy": noisy, "same": x}, x, mask, region="mask")
    assert list(table.index) == ["noisy", "same"] and list(table.columns)[0] == "SSIM (mask)"
    assert table.loc["noisy", "PSNR (mask, dB)"] == s["PSNR (brain, dB)"]
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_scores(noisy[:2], x, mask)
    with pytest.raises(ValueError, match="outputs"):
        reconstruction_table({}, x, mask)


def _fake_encoder(size=S):
    """A YardstickEncoder around an untrained network: cheap, deterministic, the right interface."""
    torch.manual_seed(0)
    cfg = EncoderConfig(size=size, feature_dim=16)
    return Y.YardstickEncoder(model=Encoder3D(cfg).eval(), config=cfg, data={}, training={}, heldout={},
                              targets={"age_mean": 50.0, "age_std": 10.0, "vol_mean": [0.0] * 3, "vol_std": [1.0] * 3},
                              path=Path("unused.pt"))


def test_to_encoder_size_and_compare_samples():
    enc = _fake_encoder()
    small = volumes(2)[:, :, ::2, ::2, ::2]                                        # 8³
    assert Y.to_encoder_size(small, enc).shape == (2, 1, S, S, S)
    same = volumes(2)
    assert Y.to_encoder_size(same, enc) is same
    with pytest.raises(ValueError, match="volumes"):
        Y.to_encoder_size(same[:, 0], enc)
    train, heldout = volumes(6, seed=1), volumes(3, seed=2)
    rows = Y.compare_samples({"model": volumes(3, seed=3)[:, :, ::2, ::2, ::2]}, train, heldout, enc)
    assert list(rows) == ["held-out real", "mean + noise", "copy of training", "model"]
    direct = Y.evaluate_samples(Y.to_encoder_size(volumes(3, seed=3)[:, :, ::2, ::2, ::2], enc), reference=train,
                                train=train, heldout=heldout, encoder=enc)
    assert rows["model"] == direct
    with pytest.raises(ValueError, match="samples"):
        Y.compare_samples({}, train, heldout, enc)


def test_copy_test_scores_held_out_upside_down_and_erased():
    torch.manual_seed(0)
    ae = tiny_ae()
    x = volumes(2)
    mask = x > 0.2
    table, out = CF.copy_test({"AE": ae}, x, mask)
    assert list(table.index) == ["AE"] and list(table.columns) == ["held-out", "upside down", "bottleneck erased"]
    assert torch.equal(out["AE"]["upside down"], ae.reconstruct(x.flip(4)))
    assert table.loc["AE", "upside down"] == reconstruction_scores(out["AE"]["upside down"], x.flip(4), mask.flip(4))["SSIM (brain)"]
    assert torch.equal(out["AE"]["bottleneck erased"][0], out["AE"]["bottleneck erased"][1])
    with pytest.raises(ValueError, match="flip_dim"):
        CF.copy_test({"AE": ae}, x, mask, flip_dim=1)
    with pytest.raises(ValueError, match="x, mask"):
        CF.copy_test({"AE": ae}, x, mask[:1])


def test_judge_counterfactuals_scores_the_truth_perfectly_and_doing_nothing_at_zero():
    observed = volumes(2)
    truth = observed + 0.1 * volumes(2, seed=5)
    mask = torch.ones_like(observed, dtype=torch.bool)
    table = CF.judge_counterfactuals({"no change": observed, "truth": truth, "half": (observed + truth) / 2},
                                     observed, truth, mask, _fake_encoder())
    assert list(table.columns) == ["RMSE (brain)", "change correlation", "share of the change", "encoder's age"]
    assert table.loc["truth", "RMSE (brain)"] == 0 and table.loc["truth", "share of the change"] == pytest.approx(1.0)
    assert table.loc["truth", "change correlation"] == pytest.approx(1.0)
    assert table.loc["no change", "share of the change"] == 0 and np.isnan(table.loc["no change", "change correlation"])
    assert table.loc["half", "share of the change"] == pytest.approx(0.75)               # 1 - (1/2)²
    with pytest.raises(ValueError, match="half"):
        CF.judge_counterfactuals({"half": truth[:1]}, observed, truth, mask, _fake_encoder())


@pytest.fixture(scope="module")
def tiny_brains(tmp_path_factory):
    from gen3d_lessons.data.brain import make_brain_dataset
    return make_brain_dataset(tmp_path_factory.mktemp("ch04") / "brain", n=5, size=16, test_fraction=0.4, progress=False)


def test_load_cohort_and_its_subsets(tiny_brains):
    train, test = (CF.load_cohort(tiny_brains, split, size=S) for split in ("train", "test"))
    assert len(train) == 3 and len(test) == 2 and train.x.shape == (3, 1, S, S, S) and train.brain.dtype == torch.bool
    assert train.age.dtype == torch.float32 and train.site.dtype == torch.int64 and (train.ventricles >= 0).all()
    assert [r.attributes["age"] for r in train.records] == pytest.approx(train.age.tolist())
    first, old = train[:1], train[train.age > train.age.min()]
    assert len(first) == 1 and torch.equal(first.x, train.x[:1]) and first.records == train.records[:1]
    assert len(old) == 2 and old.records == [r for r, a in zip(train.records, train.age) if a > train.age.min()]
    assert train[torch.tensor([2, 0])].records == [train.records[2], train.records[0]]
    with pytest.raises(ValueError, match="keep"):
        train[torch.tensor([True])]


def test_phantom_at_age_re_renders_the_stored_brains_at_their_own_age(tiny_brains):
    test = CF.load_cohort(tiny_brains, "test", size=S)
    x, v = CF.phantom_at_age(tiny_brains, test.records, test.age, size=S)
    assert x.shape == test.x.shape and (x - test.x).abs().max() < 1e-3                  # stored as scaled int16
    assert torch.allclose(v, test.ventricles)
    older, _ = CF.phantom_at_age(tiny_brains, test.records, test.age.double() + 20, size=S)
    assert not torch.allclose(older, x)
    with pytest.raises(ValueError, match="one age per record"):
        CF.phantom_at_age(tiny_brains, test.records, test.age[:1], size=S)


def test_age_counterfactuals_judges_four_answers_and_the_truth(tiny_brains):
    train, test = (CF.load_cohort(tiny_brains, split, size=S) for split in ("train", "test"))
    test.ventricles = torch.tensor([20.0, 30.0])                  # positive volumes for the tiny brains' mechanism
    scm = make_scm()
    glm = VoxelwiseAgeModel().fit(train.x, train.age)
    table, answers, s = CF.age_counterfactuals(scm, glm, test, years=20, folder=tiny_brains, encoder=_fake_encoder())
    names = ["no change", "voxel-wise age model", "deep SCM, decoder mean only", "deep SCM", "phantom (truth)"]
    assert list(table.index) == names and list(answers) == names
    assert torch.equal(answers["phantom (truth)"], CF.phantom_at_age(tiny_brains, test.records, test.age.double() + 20, size=S)[0])
    assert s["share_lin"] == table.loc["voxel-wise age model", "share of the change"]
    assert s["rmse_none"] == table.loc["no change", "RMSE (brain)"] and s["shift_true"] == pytest.approx(
        table.loc["phantom (truth)", "encoder's age"] - table.loc["no change", "encoder's age"])
    assert set(s) == {"v_err", "v_err_none", "v_true", "shift_scm", "shift_true", "cos_scm", "cos_lin",
                      "share_scm", "share_lin", "rmse_scm", "rmse_mean", "rmse_none"}


def test_checks_record_each_comparison_and_glue_what_the_page_says(monkeypatch):
    glued = {}
    monkeypatch.setattr(book_results, "glue_values", lambda **kw: glued.update(kw))
    check = Checks(dict(gain=0.0, rises=True), dict(gain=-0.1), glue_prefix="chX_")
    assert check("gain", "network minus PCA", 0.25, says=("ahead of", "behind")) == 0.25
    check("rises", "PCA rises with k", False, says=("rises", "does not rise"))
    check("ratio", "a row that only describes", 1.5, higher_is_better=False)
    assert check[0] == dict(metric="network minus PCA", value=0.25, goal=0.0, gate=-0.1, higher_is_better=True)
    assert check[2]["goal"] is None and check[2]["gate"] is None and len(check) == 3
    assert glued["chX_gain"] == 0.25 and glued["chX_gain_goal"] == 0.0 and glued["chX_gain_says"] == "ahead of"
    assert glued["chX_rises_says"] == "does not rise" and glued["chX_ratio"] == 1.5 and "chX_ratio_goal" not in glued
    head = Checks(dict(gain=0.0), glue_prefix="chY_").headline("gain", "the headline", -0.5, says=("meets", "misses"))
    assert head["value"] == -0.5 and len(check) == 3 and glued["chY_gain_says"] == "misses"
    again = check("gain", "a second measurement against the same goal", -1.0)   # recorded, not glued again
    assert again == -1.0 and check[-1]["goal"] == 0.0 and glued["chX_gain"] == 0.25
    with pytest.raises(ValueError, match="its own key"):
        check("gain", "a second sentence on one glue name", 1.0, says=("a", "b"))
    with pytest.raises(ValueError, match="needs a goal"):
        check("ratio", "no goal to say anything about", 1.0, says=("a", "b"))
    with pytest.raises(ValueError, match="glue_prefix"):
        Checks(dict(gain=0.0))("gain", "no prefix", 1.0, says=("a", "b"))
    assert Checks(dict(gain=0.0))("gain", "no glue without a prefix", 1.0) == 1.0
