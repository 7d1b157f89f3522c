"""The motion VAE of chapter 7's hearts: shapes, the identity at zero velocity, clear errors, the
phantom cohort, seeded training, and the EF table with its goal. Small grids (16³ of 10 mm) keep it fast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gen3d_lessons.data.datasets import read_dataset
from gen3d_lessons.data.errors import DataError
from gen3d_lessons.data.heart import HEART_CLASSES, HeartConfig, make_heart_dataset, make_heart_subject
from gen3d_lessons.models.motion import MotionVAE3D, MotionVAEConfig
from gen3d_lessons.tasks import heart_motion as hm
from gen3d_lessons.training import load_model, save_model

SIZE, VOXEL = 16, 10.0                       # 16³ voxels of 10 mm: the whole heart, cheaply
PHANTOM = HeartConfig(size=32, frames=8)     # 5 x 5 x 10 mm voxels, pooled 2 x 2 x 1
CFG = MotionVAEConfig(size=SIZE, channels=(4, 8), flow_grid=8, integration_steps=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: grids this small gain nothing from more, and on a busy machine two threads make
    the first steps (oneDNN's set-up per shape) several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hearts() -> hm.HeartMotionData:
    """Ten phantom hearts, two of each class (~1 s)."""
    seeds, classes = hm.new_subjects(0, 10)
    return hm.phantom_cohort(PHANTOM, seeds, classes, voxel_mm=VOXEL, size=SIZE)


def _model(seed: int = 0) -> MotionVAE3D:
    torch.manual_seed(seed)
    return MotionVAE3D(CFG)


# 1. The model --------------------------------------------------------------------------------

def test_shapes(hearts):
    model = _model()
    ed, es, c = hearts.ed[:3], hearts.es[:3], hearts.cls[:3]
    mu, logvar = model.encode(ed, es, c)
    assert mu.shape == logvar.shape == (3, CFG.z_dim)
    z = model.reparameterize(mu, logvar)
    v = model.velocity(ed, c, z)
    assert v.shape == (3, 3, CFG.flow_grid, CFG.flow_grid, CFG.flow_grid)
    assert model.displacement(v, 0.5).shape == (3, 3, SIZE, SIZE, SIZE)
    es_hat, mu2, _, v2 = model(ed, es, c)
    assert es_hat.shape == ed.shape and v2.shape == v.shape and torch.equal(mu, mu2)
    sample = model.sample_es(ed, c, generator=torch.Generator().manual_seed(0))
    assert sample.shape == ed.shape
    frames = model.cycle(ed, c, z, hm.cycle_phases(5))
    assert frames.shape == (3, 5, SIZE, SIZE, SIZE) and frames.dtype == torch.int64
    assert model.prior_z(c, mean=True).shape == (3, CFG.z_dim)


def test_a_new_model_does_not_move_the_heart(hearts):
    """Zero velocity is the identity map: ED comes back unchanged, with an EF of 0 at every phase."""
    model = _model()
    ed, c = hearts.ed[:4], hearts.cls[:4]
    z = torch.randn(4, CFG.z_dim, generator=torch.Generator().manual_seed(1))
    assert model.velocity(ed, c, z).abs().max() == 0
    for phase in (0.0, 0.4, 1.0):
        warped = model.deform(ed, c, z, phase)
        assert torch.allclose(warped, ed, atol=1e-5)
        assert hm.ejection_error(ed, ed, warped).abs().max() < 1e-5          # EF(ED, warped) = EF(ED, ED) = 0
    labels = ed.argmax(1)                                                 # a hard label map: no ties to break
    onehot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    assert torch.equal(model.cycle(onehot, c, z, [0.0, 1.0])[:, 1], labels)


def test_a_scaled_velocity_moves_less():
    """DDM's scaling of the code: exp(0 v) is the identity, exp(s v) grows with s."""
    model = _model()
    v = 0.5 * torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    sizes = [model.displacement(v, s).abs().mean().item() for s in (0.0, 0.5, 1.0)]
    assert sizes[0] == 0 and 0 < sizes[1] < sizes[2]


def test_clear_errors_on_bad_input(hearts):
    model = _model()
    ed, es, c = hearts.ed[:2], hearts.es[:2], hearts.cls[:2]
    z = torch.zeros(2, CFG.z_dim)
    with pytest.raises(ValueError, match="label fractions of shape"):
        model.velocity(ed[:, :3], c, z)
    with pytest.raises(ValueError, match="float label fractions"):
        model.velocity(ed.long(), c, z)
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 5\)"):
        model.velocity(ed, torch.tensor([0, 7]), z)
    with pytest.raises(ValueError, match="class indices of shape"):
        model.encode(ed, es, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="z: expected shape"):
        model.velocity(ed, c, torch.zeros(2, CFG.z_dim + 1))
    with pytest.raises(ValueError, match="phase"):
        model.deform(ed, c, z, phase=-0.5)
    with pytest.raises(ValueError, match="phases"):
        model.cycle(ed, c, z, [])
    for bad, match in ((dict(size=18), "divisible"), (dict(flow_grid=5), "flow_grid"), (dict(norm="batch"), "norm"),
                       (dict(channels=(6, 8)), "groups"), (dict(z_dim=0), "z_dim"),
                       (dict(max_velocity=0), "max_velocity")):
        with pytest.raises(ValueError, match=match):
            MotionVAEConfig(**{**dict(size=SIZE, channels=(4, 8), flow_grid=8), **bad})


# 2. Data -------------------------------------------------------------------------------------

def test_phantom_cohort_has_the_dataset_hearts_ed_and_es():
    """Two frames (ED, ES) give the label maps of the full cycle's ED and ES, and volumes survive pooling."""
    seed = hm.new_subjects(0, 1)[0][0]
    full = make_heart_subject(seed, PHANTOM, pathology="DCM")
    labels, es = full["labels"], full["es_frame"]
    ed_f, es_f = hm.label_fractions(labels[..., 0], labels[..., es], PHANTOM.spacing, voxel_mm=VOXEL, size=SIZE)
    cohort = hm.phantom_cohort(PHANTOM, [seed], ["DCM"], voxel_mm=VOXEL, size=SIZE)
    assert torch.equal(cohort.ed[0], ed_f) and torch.equal(cohort.es[0], es_f)
    assert cohort.classes == ["DCM"]
    assert torch.allclose(ed_f.sum(0), torch.ones(SIZE, SIZE, SIZE))                 # fractions sum to 1
    lv = hm.structure_volumes_ml(torch.stack([ed_f, es_f]), cohort.voxel_ml)["LV"]
    assert abs(100 * (1 - lv[1] / lv[0]) - full["attributes"]["ef_lv"]) < 0.01


def test_sets_of_hearts_concatenate_on_one_grid(hearts):
    both = hm.HeartMotionData.cat([hearts, hearts])
    assert len(both) == 20 and torch.equal(both.ed[10:], hearts.ed) and both.ids[10:] == hearts.ids
    other = hm.HeartMotionData(hearts.ed, hearts.es, hearts.cls, hearts.ids, voxel_mm=5.0)
    with pytest.raises(ValueError, match="different grids"):
        hm.HeartMotionData.cat([hearts, other])
    with pytest.raises(ValueError, match="int64 class indices"):
        hm.HeartMotionData(hearts.ed, hearts.es, hearts.cls.float(), hearts.ids, VOXEL)


def test_load_heart_motion_reads_a_dataset(tmp_path):
    folder = make_heart_dataset(tmp_path / "heart", n=5, size=32, frames=2)
    data = hm.load_heart_motion(folder, "all", voxel_mm=VOXEL, size=SIZE)
    assert len(data) == 5 and data.ed.shape == (5, 4, SIZE, SIZE, SIZE)
    assert data.classes == list(HEART_CLASSES)
    ef = read_dataset(folder).attributes_table()["ef_lv"].to_numpy()
    vol_ed, vol_es = (hm.structure_volumes_ml(x, data.voxel_ml)["LV"] for x in (data.ed, data.es))
    assert np.allclose(100 * (1 - vol_es / vol_ed).numpy(), ef, atol=0.01)
    assert len(hm.load_heart_motion(folder, "test", voxel_mm=VOXEL, size=SIZE)) == 1
    cfg, seed = hm.heart_config_of(folder)
    assert (cfg.size, cfg.frames, seed) == (32, 2, 0)


def test_new_hearts_are_made_once_and_read_back(tmp_path, monkeypatch):
    import gen3d_lessons.data as data_pkg
    folder = make_heart_dataset(tmp_path / "heart", n=5, size=32, frames=2)
    monkeypatch.setattr(data_pkg, "data_root", lambda: tmp_path)
    made = hm.new_hearts(folder, "reference", 3, voxel_mm=VOXEL, size=SIZE)
    assert (tmp_path / "cohorts" / "hearts_heart_reference.pt").is_file() and len(made) == 3
    cfg, seed = hm.heart_config_of(folder)
    direct = hm.phantom_cohort(cfg, *hm.new_subjects(seed, 2, first=hm.COHORTS["reference"][0]), voxel_mm=VOXEL, size=SIZE)
    again = hm.new_hearts(folder, "reference", 2, voxel_mm=VOXEL, size=SIZE)        # the first two, from the file
    assert torch.equal(again.ed, direct.ed) and torch.equal(again.es, direct.es) and again.classes == direct.classes
    with pytest.raises(ValueError, match="which"):
        hm.new_hearts(folder, "validation", 2)


def test_data_errors_say_what_is_wrong(tmp_path, heart_msd, brain_msd):
    with pytest.raises(DataError, match="not found"):
        hm.load_heart_motion(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        hm.load_heart_motion(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        hm.load_heart_motion(heart_msd, "validation")
    with pytest.raises(ValueError, match="do not tile"):                  # 1.5 x 1.5 x 8 mm voxels
        hm.load_heart_motion(heart_msd, voxel_mm=5.0)
    with pytest.raises(DataError, match="ES 'es' label maps"):
        hm.load_heart_motion(brain_msd)
    with pytest.raises(DataError, match="phantom heart dataset"):
        hm.heart_config_of(heart_msd)
    with pytest.raises(ValueError, match="one non-zero length"):
        hm.phantom_cohort(PHANTOM, [1, 2], ["NOR"])
    ed = np.zeros((8, 8, 8), np.int64)
    with pytest.raises(ValueError, match="no heart"):
        hm.label_fractions(ed, ed, (1, 1, 1), voxel_mm=1.0, size=8)
    ed[1:7, 1:7, 1:7] = 3
    with pytest.raises(ValueError, match="more than size=4"):
        hm.label_fractions(ed, ed, (1, 1, 1), voxel_mm=1.0, size=4)
    with pytest.raises(ValueError, match="labels must be"):
        hm.label_fractions(ed + 2, ed, (1, 1, 1), voxel_mm=1.0, size=8)


# 3. Training ---------------------------------------------------------------------------------

def test_seeded_training_is_deterministic(hearts):
    def run(seed: int):
        model = _model(0)
        history = hm.train_motion_vae(model, hearts, max_steps=3, batch=4, seed=seed)
        return model.state_dict(), history.values

    (a, ha), (b, hb), (c, _) = run(0), run(0), run(1)
    assert ha == hb and set(ha) == {"loss", "dice", "ef_error", "kl"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # the data-dependent steps around training: the encoder's statistics and the fitted prior
    assert not torch.equal(a["change_mean"], torch.zeros_like(a["change_mean"]))
    assert not torch.equal(a["prior_std"], torch.ones_like(a["prior_std"]))


def test_a_trained_model_saves_with_its_config_and_prior(hearts, tmp_path):
    model = _model()
    hm.train_motion_vae(model, hearts, max_steps=2, batch=4, seed=0)
    path = save_model(tmp_path / "motion.pt", model, model.cfg)
    again = load_model(path, lambda c: MotionVAE3D(MotionVAEConfig(**c)))
    assert again.cfg == model.cfg
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(model.sample_es(hearts.ed[:2], hearts.cls[:2], gen[0]),
                       again.sample_es(hearts.ed[:2], hearts.cls[:2], gen[1]))


def test_training_refuses_data_of_another_grid(hearts):
    model = MotionVAE3D(MotionVAEConfig(size=32, channels=(4, 8), flow_grid=16))
    with pytest.raises(ValueError, match="size=32"):
        hm.train_motion_vae(model, hearts, max_steps=1)
    with pytest.raises(TypeError, match="HeartMotionData"):
        hm.train_motion_vae(_model(), {"ed": hearts.ed}, max_steps=1)


def test_warmup_cosine():
    factors = [hm.warmup_cosine(i, 100) for i in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


# 4. Evaluation -------------------------------------------------------------------------------

def test_ef_table_columns_and_goal(hearts):
    measures = hm.motion_measures(_model(), hearts, draws=2, seed=0)
    assert list(measures.columns) == ["id", "class", "source", "draw", "EDV", "ESV", "EF", "RV EF"]
    assert len(measures) == len(hearts) * 4                               # real, mean motion, 2 draws
    assert (measures.loc[measures["source"] != "real", "EF"].abs() < 1e-3).all()   # a new model does not move
    table = hm.ef_table(measures)
    assert list(table.columns) == ["n", "EF", "EF sd", "EDV", "ESV", "RV EF", "W1", "split-half W1", "KS p"]
    assert table.index.names == ["class", "source"]
    assert list(table.index.get_level_values("class").unique()) == list(HEART_CLASSES)
    assert table["split-half W1"].isna().all()                            # two real hearts a class: no bar
    assert not hm.goal_met(table).any()                                   # ... and no verdict either


def test_goal_met_compares_with_the_split_half_distance():
    rng = np.random.default_rng(0)
    real = rng.uniform(55, 70, 40)
    rows = [{"class": "NOR", "source": "real", "EF": x} for x in real]
    rows += [{"class": "NOR", "source": "generated", "EF": x} for x in rng.uniform(55, 70, 160)]
    rows += [{"class": "NOR", "source": "mean motion", "EF": x} for x in rng.uniform(75, 80, 40)]
    measures = pd.DataFrame(rows).assign(EDV=100.0, ESV=40.0, **{"RV EF": 50.0})
    table = hm.ef_table(measures, splits=10, seed=0)
    assert table.loc[("NOR", "real"), "W1"] == 0 and table.loc[("NOR", "real"), "KS p"] == 1
    assert hm.goal_met(table).to_dict() == {"NOR": True}
    assert hm.goal_met(table, "mean motion").to_dict() == {"NOR": False}
    with pytest.raises(ValueError, match="source"):
        hm.goal_met(table, "GAN")
    with pytest.raises(ValueError, match="missing the columns"):
        hm.ef_table(measures.drop(columns=["EF"]))
    with pytest.raises(ValueError, match="at least 4"):
        hm.split_half_w1(np.arange(3.0))


def test_cycle_phases_follow_the_phantom():
    s = hm.cycle_phases(16)
    assert s.shape == (16,) and s[0] == 0 and s.argmax() == HeartConfig(frames=16).es_frame and s.max() == 1
