"""Chapter 4's library: AE / DAE, PCA, VAE / CVAE, their step functions, and the deep SCM."""

import math

import numpy as np
import pytest
import torch

from gen3d_lessons.blocks import check_volumes
from gen3d_lessons.losses import gaussian_nll, kl_per_voxel, kl_to_standard_normal
from gen3d_lessons.models.autoencoder import AEConfig, Autoencoder3D, PCA3D, UNetAutoencoder3D
from gen3d_lessons.models.scm import DeepSCM, VolumeMechanism, VoxelwiseAgeModel, ventricle_volume_ml
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
