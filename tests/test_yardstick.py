"""The yardstick for generated volumes: its reference rows and the cached encoder (its metrics: test_metrics.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen3d_lessons.tasks import yardstick as Y
from gen3d_lessons.data.msd import Case, write_msd_dataset
from gen3d_lessons.data.nifti import spacing_affine
from gen3d_lessons.models.encoder import Encoder3D, EncoderConfig

S = 16  # voxels per side of the test volumes


def smooth_volumes(n, seed, size=S):
    """n smooth random volumes (n, 1, size, size, size) in about [0, 1]."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    v = np.stack([gaussian_filter(rng.random((size,) * 3), 1.5) for _ in range(n)])
    v = (v - v.min()) / (v.max() - v.min())
    return torch.from_numpy(v[:, None].astype(np.float32))


# The reference rows -----------------------------------------------------------------------------

def test_mean_noise_baseline_matches_voxelwise_moments():
    train = smooth_volumes(6, seed=14)
    x = Y.mean_noise_baseline(train, 2000, rng=0)
    assert x.shape == (2000, 1, S, S, S)
    assert torch.allclose(x.mean(0), train.mean(0), atol=0.02)
    assert torch.allclose(x.std(0), train.std(0), atol=0.02)


# The encoder: train, cache, reload ----------------------------------------------------------------

def _tiny_brains(root: Path, bump_age: float = 0.0) -> Path:
    """8 cases of 16³ with the brain phantoms' attributes; intensity grows with age."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(8):
        age = 20.0 + 8 * i
        img = smooth_volumes(1, seed=100 + i)[0, 0].numpy() * (1 + age / 100)
        img = np.stack([img, img, img, img], axis=-1)                   # T1, T2, FLAIR, PD
        cases.append(Case(id=f"brain_{i:03d}", split="train" if i < 6 else "test", image=img.astype(np.float32),
                          affine=spacing_affine((2.0, 2.0, 2.0), (S, S, S)),
                          label=rng.integers(0, 4, (S, S, S)).astype(np.uint8),
                          attributes={"age": age + (bump_age if i == 0 else 0.0), "site": i % 3,
                                      "has_lesion": i % 2 == 0, "csf_ml": 50.0 + i, "gm_ml": 600.0 - 5 * i,
                                      "wm_ml": 500.0 + 2 * i}))
    return write_msd_dataset(root, cases, name="tiny", description="test brains",
                             modality={"0": "T1", "1": "T2", "2": "FLAIR", "3": "PD"},
                             labels={"0": "background", "1": "CSF", "2": "GM", "3": "WM"})


def test_encoder_shapes_and_config_checks():
    m = Encoder3D(EncoderConfig(size=S, feature_dim=16))
    out = m(torch.zeros(2, 1, S, S, S))
    assert m.features(torch.zeros(2, 1, S, S, S)).shape == (2, 16)
    assert out["age"].shape == (2,) and out["site"].shape == (2, 3) and out["volumes"].shape == (2, 3)
    with pytest.raises(ValueError, match="groups"):
        EncoderConfig(feature_dim=12)
    both = Encoder3D(EncoderConfig(size=S, feature_dim=16, pool="mean+max", n_volumes=5))
    x = torch.rand(2, 1, S, S, S)
    f = both.features(x)
    assert f.shape == (2, 16) and both(x)["volumes"].shape == (2, 5)
    assert (f[:, 8:] >= f[:, :8] - 1e-6).all()                 # the maxima are at least the means
    with pytest.raises(ValueError, match="pool"):
        EncoderConfig(pool="max")
    with pytest.raises(ValueError, match=r"x: expected \(B, 1"):
        m.features(torch.zeros(2, 2, S, S, S))


def test_encoder_trains_caches_reloads_and_evaluates(tmp_path):
    folder = _tiny_brains(tmp_path / "tiny")
    kw = dict(size=S, channels=("T1",), budget_s=None, max_steps=3, batch_size=4, cache_dir=tmp_path / "models",
              config=EncoderConfig(size=S, feature_dim=16, n_sites=3), cohort=0)
    enc = Y.load_or_train_encoder(folder, **kw)
    assert not enc.cached and enc.path.is_file() and enc.training["steps"] == 3
    assert {"age_mae", "site_acc", "lesion_acc", "age_mae_baseline"} <= set(enc.heldout)

    volumes = Y.load_volumes(folder, "test", size=S)
    again = Y.load_or_train_encoder(folder, **kw)                  # a cache hit: same file, same features
    assert again.cached and again.path == enc.path and again.heldout == enc.heldout
    np.testing.assert_allclose(again.features(volumes), enc.features(volumes), rtol=1e-6, atol=1e-6)

    # a changed manifest is a new data version: a new file, trained afresh
    changed = _tiny_brains(tmp_path / "changed" / "tiny", bump_age=1.0)
    v1, v2 = Y.data_version(folder, S, ("T1",)), Y.data_version(changed, S, ("T1",))
    assert v1["dataset"] == v2["dataset"] and v1["manifest_sha256"] != v2["manifest_sha256"]
    assert Y.data_version(folder, 32, ("T1",)) != v1
    other = Y.load_or_train_encoder(changed, **kw)
    assert not other.cached and other.path != enc.path

    # the entry point and the reference rows, on the tiny cohort
    train = Y.load_volumes(folder, "train", size=S)
    rows = Y.reference_rows(train, volumes, enc, rng=0)
    assert list(rows) == ["held-out real", "mean + noise", "copy of training"]
    assert rows["copy of training"]["mem_frac"] == 1.0 and rows["held-out real"]["mem_frac"] == 0.0
    assert set(Y.COLUMNS) <= set(rows["mean + noise"])
    assert list(Y.table(rows).columns) == list(Y.COLUMNS)
    one = Y.evaluate_samples(volumes, reference=train, train=train, heldout=volumes, encoder=enc)
    two = Y.evaluate_samples(torch.cat([volumes, volumes]), reference=train, train=train, heldout=volumes,
                             encoder=enc, set_size=len(volumes))
    assert two["n"] == len(volumes) and two["fd_sets"] == 2 and two["fd"] == pytest.approx(one["fd"])
    with pytest.raises(ValueError, match="set_size"):
        Y.evaluate_samples(volumes, reference=train, train=train, heldout=volumes, encoder=enc, set_size=1)
    with pytest.raises(ValueError, match="samples: expected shape"):
        Y.evaluate_samples(train[:, :, :8], reference=train, train=train, heldout=volumes, encoder=enc)
    bad = train.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="samples: contains"):
        Y.evaluate_samples(bad, reference=train, train=train, heldout=volumes, encoder=enc)


def test_encoder_training_is_deterministic_and_probe_follows_a_generator(tmp_path):
    folder = _tiny_brains(tmp_path / "tiny")
    kw = dict(size=S, channels=("T1",), budget_s=None, max_steps=4, batch_size=4,
              config=EncoderConfig(size=S, feature_dim=16, n_sites=3), cohort=0)
    a = Y.load_or_train_encoder(folder, cache_dir=tmp_path / "a", **kw)
    b = Y.load_or_train_encoder(folder, cache_dir=tmp_path / "b", **kw)      # trained again, elsewhere
    assert a.path.name == b.path.name and a.training["stopped_by"] == "max_steps"
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name

    class Fixed(torch.nn.Module):                    # a "generator" that returns training volumes
        def __init__(self, volumes):
            super().__init__()
            self.volumes, self.w = volumes, torch.nn.Parameter(torch.zeros(()))

        def sample(self, n, c=None, generator=None):
            return self.volumes[torch.randperm(len(self.volumes), generator=generator)[:n]]

    train = Y.load_volumes(folder, "train", size=S)
    probe = Y.fd_probe(a, train, n=4, seed=0)
    assert probe(Fixed(train))["fd"] == probe(Fixed(train))["fd"] >= 0      # the same codes every call
    assert probe(Fixed(train * 0 + 0.5))["fd"] > probe(Fixed(train))["fd"]


# The encoder learns from new brains of the dataset's population --------------------------------

@pytest.fixture(scope="module")
def phantom_brains(tmp_path_factory):
    from gen3d_lessons.data.brain import make_brain_dataset
    return make_brain_dataset(tmp_path_factory.mktemp("yard") / "brain", n=5, size=16, test_fraction=0.4,
                              progress=False)


def test_encoder_from_a_generated_cohort_with_a_check_cohort(phantom_brains, tmp_path):
    kw = dict(size=16, budget_s=None, max_steps=2, batch_size=4, cache_dir=tmp_path, cohort=6, check=5,
              config=EncoderConfig(size=16, feature_dim=16, n_volumes=len(Y.VOLUMES)))
    enc = Y.load_or_train_encoder(phantom_brains, **kw)
    assert enc.training["cohort"] == 6 and enc.targets["volume_names"] == list(Y.VOLUMES)
    assert enc.check["n_test"] == 5 and enc.heldout["n_test"] == 2
    assert {"age_r2", "ventricle_ml_r2", "lesion_ml_r2", "volumes_r2"} <= set(enc.check)
    images, attrs = enc.check_cohort()
    assert images.shape == (5, 1, 16, 16, 16) and list(attrs.columns[:3]) == ["age", "site", "has_lesion"]
    table = Y.heads_table(enc)
    assert list(table.columns) == ["test split (n=2)", "check cohort (n=5)", "trivial guess"]
    again = Y.load_or_train_encoder(phantom_brains, **kw)                  # cached, check cohort and all
    assert again.cached and again.check == enc.check
    # the cohort's brains are new: none is a brain of the dataset
    train = Y.load_volumes(phantom_brains, "train", size=16)
    assert torch.cdist(images.flatten(1), train.flatten(1)).min() > 1e-3
    # the control: the same shape, untrained, seeded
    r1, r2 = Y.random_encoder(enc, seed=1), Y.random_encoder(enc, seed=1)
    np.testing.assert_array_equal(r1.features(images), r2.features(images))
    assert not np.allclose(r1.features(images), enc.features(images))
    with pytest.raises(ValueError, match="cohort, check"):
        Y.load_or_train_encoder(phantom_brains, **{**kw, "check": 0})
    # the check cohort's subjects can be made again from their seeds, and in another mode
    from gen3d_lessons.data.brain import brain_cohort, brain_config_of
    from gen3d_lessons.tasks.sensitivity import mode_versions
    seeds = Y.cohort_seeds(phantom_brains, "check", 2)
    remade, _ = brain_cohort(brain_config_of(phantom_brains), seeds, size=16)
    torch.testing.assert_close(remade, images[:2])
    modes = mode_versions(phantom_brains, seeds, size=16)
    assert set(modes) == {"one site", "young only", "no lesions"} and modes["one site"].shape == (2, 1, 16, 16, 16)
    for i, lesion in enumerate(attrs["has_lesion"][:2]):
        assert torch.equal(modes["no lesions"][i], images[i]) == (not lesion)    # only a brain with lesions changes
    quick = mode_versions(phantom_brains, seeds, size=16, base=images[:2], attrs=attrs.iloc[:2])   # copies what it can
    for name in modes:
        torch.testing.assert_close(quick[name], modes[name], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="base, attrs"):
        mode_versions(phantom_brains, seeds, size=16, base=images[:1], attrs=attrs.iloc[:2])
    from gen3d_lessons.tasks.sensitivity import check_modes                 # made once, kept beside the encoder
    kept = check_modes(enc, phantom_brains, 3)
    assert enc.path.with_name(enc.path.stem + "_modes.pt").is_file()
    for name in modes:                                                      # the first ones, from the file
        torch.testing.assert_close(check_modes(enc, phantom_brains, 2)[name], modes[name], atol=1e-6, rtol=0)
        assert kept[name].shape == (3, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="n: expected"):
        check_modes(enc, phantom_brains, 6)
    with pytest.raises(ValueError, match="which"):
        Y.cohort_seeds(phantom_brains, "train", 2)


def test_cohort_brains_are_served_as_the_dataset_serves_its_own(phantom_brains):
    from gen3d_lessons.data.brain import brain_cohort, brain_config_of
    from gen3d_lessons.data.datasets import VolumeDataset
    from gen3d_lessons.data.errors import DataError

    cfg = brain_config_of(phantom_brains)
    assert cfg.size == 16 and cfg.lesion_probability == 0.3
    ds = VolumeDataset(phantom_brains, "train", keys=("image",), channels=["T1"], size=8)
    item = ds[0]
    images, attrs = brain_cohort(cfg, [int(item["seed"])], size=8)
    torch.testing.assert_close(images[0], item["image"], atol=1e-5, rtol=0)
    assert attrs[0]["age"] == pytest.approx(float(item["age"])) and attrs[0]["ventricle_ml"] >= 0
    older, _ = brain_cohort(cfg, [int(item["seed"])], size=8, overrides=[{"age": 89.0}])
    assert not torch.equal(older, images)
    with pytest.raises(ValueError, match="overrides"):
        brain_cohort(cfg, [1, 2], overrides=[{}])
    with pytest.raises(DataError, match="dataset.json"):
        brain_config_of(phantom_brains / "imagesTr")


def test_deformation_table_sets_the_generator_beside_the_phantom(phantom_brains):
    from gen3d_lessons.models.shapetexture import ShapeTextureConfig, ShapeTextureGenerator3D
    from gen3d_lessons.tasks.synthesis import deformation_table, true_deformations

    fields, spacing, mask = true_deformations(phantom_brains, 2)
    assert fields.shape == (2, 3, 16, 16, 16) and spacing > 0 and mask.shape == (16, 16, 16) and mask.any()
    g = ShapeTextureGenerator3D(ShapeTextureConfig(size=8, flow_grid=8, z_shape=4, z_texture=4))
    t = deformation_table(g, 2, phantom_brains, mask=torch.ones(8, 8, 8, dtype=torch.bool))
    assert list(t.columns) == ["median_mm", "p95_mm", "log_jac_std", "folding"] and len(t) == 2
    assert t.iloc[0]["median_mm"] > 0 and (t["folding"] < 0.01).all()
    with pytest.raises(ValueError, match="mask"):
        deformation_table(g, 2, phantom_brains, mask=torch.ones(4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n: expected"):
        true_deformations(phantom_brains, 10)


def test_cost_table_of_generators():
    from gen3d_lessons.models.gan import Generator3D, GeneratorConfig
    from gen3d_lessons.tasks.synthesis import cost_table
    from gen3d_lessons.training.fit import History

    small, big = (Generator3D(GeneratorConfig(z_dim=8, size=16, channels=c)) for c in ((8, 4, 4), (32, 16, 8)))
    t = cost_table({"small": small, "big": big}, {"small": History(steps=10, seconds=2.0), "big": History(steps=4, seconds=4.0)})
    assert list(t.columns) == ["generator parameters (M)", "activations per sample (MB)", "seconds per step"]
    assert t.loc["big", "generator parameters (M)"] > t.loc["small", "generator parameters (M)"] > 0
    frozen = cost_table({"small": small.requires_grad_(False)}, {"small": History(steps=1, seconds=1.0)})
    assert frozen.loc["small", "generator parameters (M)"] == t.loc["small", "generator parameters (M)"]
    assert t.loc["big", "activations per sample (MB)"] > t.loc["small", "activations per sample (MB)"] > 0
    assert t.loc["small", "seconds per step"] == 0.2 and t.loc["big", "seconds per step"] == 1.0
    with pytest.raises(ValueError, match="histories"):
        cost_table({"small": small}, {})


def test_saved_samples_come_back_only_for_the_same_data(phantom_brains, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Y, "data_root", lambda: tmp_path)
    x = torch.rand(3, 1, 8, 8, 8)
    path = Y.save_samples("ch03_gan", x, model="a GAN", folder=phantom_brains, suffix="_smoke")
    assert path == tmp_path / "samples" / "ch03_gan_smoke.pt"
    got = Y.load_samples("ch03_gan", phantom_brains, size=8, suffix="_smoke")
    assert torch.equal(got["samples"], x) and got["model"] == "a GAN"
    assert Y.load_samples("ch03_gan", phantom_brains, size=16, suffix="_smoke")["samples"].shape == (3, 1, 16, 16, 16)
    assert Y.load_samples("ch03_gan", phantom_brains, size=8) is None and "not found" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.csv").write_text("another dataset\n")
    assert Y.load_samples("ch03_gan", other, size=8, suffix="_smoke") is None and "another version" in capsys.readouterr().out
    with pytest.raises(ValueError, match="NaN"):
        Y.save_samples("bad", x * float("nan"), model="m", folder=phantom_brains)
    (tmp_path / "samples" / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt: cannot be read"):
        Y.load_samples("broken", phantom_brains, size=8)


def test_moment_affine_undoes_a_shift_and_a_stretch():
    from scipy import ndimage

    from gen3d_lessons.tasks.synthesis import moment_affine

    target = np.zeros((24, 24, 24), bool)
    target[6:18, 8:16, 5:19] = True
    moved = np.zeros_like(target)
    moved[9:21, 6:22, 5:19] = True                                # shifted along x, stretched twice along y
    m = moment_affine(moved, target)
    back = ndimage.affine_transform(moved.astype(np.uint8), m[:3, :3], offset=m[:3, 3], output_shape=target.shape, order=0)
    assert (back.astype(bool) == target).mean() > 0.98
    with pytest.raises(ValueError, match="too few"):
        moment_affine(np.zeros_like(target), target)


def test_atlas_score_ranks_brains_above_noise():
    from gen3d_lessons.data.brain import brain_template
    from gen3d_lessons.tasks.synthesis import atlas_score

    t = brain_template(32)
    t1 = torch.from_numpy(t["image"][..., 0])[None, None]                  # the template itself, T1
    noise = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    own, random = atlas_score(t1, t["label"]), atlas_score(noise, t["label"])
    assert own.shape == (1,) and random.shape == (2,)
    assert own[0] > 0.5 > random.max()
    with pytest.raises(ValueError, match="volumes"):
        atlas_score(noise[:, :, :16], t["label"])
