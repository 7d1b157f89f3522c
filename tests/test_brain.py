"""The synthetic brain cohort: anatomy, ageing, lesions, contrasts, seeding, the written dataset, the CLI."""

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from gen3d_lessons import spatial
from gen3d_lessons.data.brain import (BRAIN_CHANNELS, BRAIN_LABELS, BrainConfig, brain_template,
                                      make_brain_dataset, make_brain_subject, subject_seed)
from gen3d_lessons.data.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CFG = BrainConfig(size=32)
T1, T2, FLAIR, PD = range(4)
CSF, GM, WM, LESION = 1, 2, 3, 4


def _tissue_intensities(subject: dict) -> np.ndarray:
    """Per-tissue intensity (5 labels x 4 channels) fitted from the partial-volume fractions.

    Label means at 32³ mix tissues (a "GM" voxel is also part CSF); a least-squares fit of
    image ≈ Σ_k P_k μ_k over the brain recovers what each pure tissue looks like.
    """
    p, image = subject["probabilities"], subject["image"]
    inside = p[..., 0] < 0.5
    present = p[inside].sum(0) > 0.5
    mu = np.full((5, 4), np.nan)
    mu[present] = np.linalg.lstsq(p[inside][:, present], image[inside], rcond=None)[0]
    return mu


@pytest.fixture(scope="module")
def old_with_lesion():
    return make_brain_subject(3, CFG, age=88.0, has_lesion=True, site=0)


def test_shapes_dtypes_and_label_set(old_with_lesion):
    s = old_with_lesion
    assert s["image"].shape == (32, 32, 32, 4) and s["image"].dtype == np.float32
    assert s["lowdose"].shape == (32, 32, 32, 4) and s["lowdose"].dtype == np.float32
    assert s["label"].shape == (32, 32, 32) and s["label"].dtype == np.uint8
    assert s["displacement"].shape == (3, 32, 32, 32)
    assert s["probabilities"].shape == (32, 32, 32, 5)
    assert set(np.unique(s["label"]).tolist()) <= {0, 1, 2, 3, 4}
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0 and s["image"].max() > 0.99
    assert len(BRAIN_CHANNELS) == 4 and BRAIN_LABELS[4] == "lesion"
    a = s["attributes"]
    assert {"age", "site", "has_lesion", "lesion_ml", "csf_ml", "gm_ml", "wm_ml"} <= set(a)
    voxel_ml = abs(np.linalg.det(s["affine"][:3, :3])) / 1000
    assert a["gm_ml"] == pytest.approx((s["label"] == GM).sum() * voxel_ml, abs=0.01)


def test_deformations_are_diffeomorphic():
    for seed in range(3):
        for age in (20.0, 90.0):                     # 90: the ventricle flow at its strongest
            u = torch.from_numpy(make_brain_subject(seed, CFG, age=age)["displacement"])[None]
            det = spatial.jacobian_determinant(u)
            assert det.min() > 0.0, f"seed {seed}, age {age}: folding (min det J {det.min():.3f})"
            assert u.abs().max() > 0.5               # and it really deforms


def test_atrophy_is_monotone_in_age_at_a_fixed_seed():
    for seed in (0, 1):
        csf, gm = [], []
        for age in (20, 40, 60, 75, 90):
            label = make_brain_subject(seed, CFG, age=age)["label"]
            csf.append(int((label == CSF).sum()))
            gm.append(int((label == GM).sum()))
        assert np.all(np.diff(csf) > 0), f"seed {seed}: CSF voxels {csf} should grow with age"
        assert np.all(np.diff(gm) < 0), f"seed {seed}: GM voxels {gm} should shrink with age"
        assert csf[-1] > 2 * csf[0]                  # a visible effect, not noise


def test_lesion_label_present_iff_has_lesion():
    small = replace(CFG, size=24)
    for seed in range(4):
        with_lesion = make_brain_subject(seed, small, has_lesion=True)
        without = make_brain_subject(seed, small, has_lesion=False)
        assert (with_lesion["label"] == LESION).any() and with_lesion["attributes"]["lesion_ml"] > 0
        assert 1 <= with_lesion["attributes"]["n_lesions"] <= 3
        assert not (without["label"] == LESION).any() and without["attributes"]["lesion_ml"] == 0
        # lesions replace white matter: they sit where the lesion-free brain is WM
        lesion = with_lesion["label"] == LESION
        assert np.mean(without["label"][lesion] == WM) > 0.6


def test_contrast_orderings(old_with_lesion):
    for s in (old_with_lesion, make_brain_subject(5, CFG, site=2, has_lesion=True)):
        mu = _tissue_intensities(s)
        assert mu[WM, T1] > mu[GM, T1] > mu[CSF, T1]
        assert mu[CSF, T2] > mu[GM, T2] > mu[WM, T2]
        assert mu[CSF, FLAIR] < mu[WM, FLAIR] < mu[GM, FLAIR]
        assert mu[LESION, FLAIR] > mu[GM, FLAIR] and mu[LESION, T2] > mu[WM, T2]
        assert mu[LESION, T1] < mu[WM, T1]
        # the plain label means keep the strong orderings too
        label, image = s["label"], s["image"]
        mean = {k: image[label == k].mean(0) for k in (CSF, GM, WM)}
        assert mean[WM][T1] > mean[GM][T1] > mean[CSF][T1]
        assert mean[CSF][FLAIR] < min(mean[GM][FLAIR], mean[WM][FLAIR])
    # PD's contrast is small, so check it without a strong bias field (site 0)
    mu = _tissue_intensities(old_with_lesion)
    assert mu[CSF, PD] > mu[GM, PD] > mu[WM, PD]
    assert mu[CSF, T2] - mu[WM, T2] > mu[CSF, PD] - mu[WM, PD]


def test_sites_and_lowdose_change_the_image_not_the_anatomy(old_with_lesion):
    other_site = make_brain_subject(3, CFG, age=88.0, has_lesion=True, site=2)
    assert np.array_equal(other_site["label"], old_with_lesion["label"])
    assert np.abs(other_site["image"] - old_with_lesion["image"]).mean() > 0.01
    # the low-dose copy: same scene, blurrier and noisier
    image, lowdose = old_with_lesion["image"], old_with_lesion["lowdose"]
    far = ~ndimage.binary_dilation(old_with_lesion["label"] > 0, iterations=3)   # pure noise there
    assert lowdose[far].std() > 2 * image[far].std()
    assert np.corrcoef(image[..., T1].ravel(), lowdose[..., T1].ravel())[0, 1] > 0.7


def test_determinism_by_seed():
    a, b = make_brain_subject(11, CFG), make_brain_subject(11, CFG)
    for key in ("image", "lowdose", "label", "displacement", "probabilities"):
        assert np.array_equal(a[key], b[key]), key
    assert a["attributes"] == b["attributes"]
    c = make_brain_subject(12, CFG)
    assert not np.allclose(a["image"], c["image"]) and not np.allclose(a["displacement"], c["displacement"])
    # overriding the age keeps the other drawn attributes
    d = make_brain_subject(11, CFG, age=33.0)
    assert d["attributes"]["site"] == a["attributes"]["site"]
    assert d["attributes"]["has_lesion"] == a["attributes"]["has_lesion"]
    assert subject_seed(0, 5) == subject_seed(0, 5) != subject_seed(1, 5)


def test_template_probabilities_labels_and_affine():
    t = brain_template(32)
    p, label = t["probabilities"], t["label"]
    assert p.shape == (32, 32, 32, 4) and t["image"].shape == (32, 32, 32, 4)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-4)
    inside = label > 0
    assert np.mean(p[inside][:, 1:].argmax(-1) + 1 == label[inside]) > 0.999
    assert np.all(p[~inside][:, 0] >= 0.5)
    spacing = t["affine"][0, 0]
    assert np.allclose(t["affine"][:3, :3], np.eye(3) * spacing)
    assert nib.aff2axcodes(t["affine"]) == ("R", "A", "S")
    # the whole brain fits in the cube and fills it (MNI brain: ~140 x 175 x 120 mm)
    assert 175 / 31 < spacing < 200 / 31
    assert not label[0].any() and not label[-1].any() and not label[:, 0].any() and not label[:, -1].any()
    mm = nib.affines.apply_affine(t["affine"], np.argwhere(label == CSF)).mean(0)
    assert np.all(np.abs(mm) < 40)                  # CSF centred on the MNI origin, roughly


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="site"):
        make_brain_subject(0, CFG, site=7)
    with pytest.raises(ValueError, match="age"):
        make_brain_subject(0, CFG, age=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        make_brain_subject(-1, CFG)
    with pytest.raises(ValueError, match="size"):
        BrainConfig(size=8)
    with pytest.raises(ValueError, match="intensities"):
        BrainConfig(intensities={"T1": (1, 2, 3, 4)})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile"):
        make_brain_dataset(tmp_path / "afile", n=1, size=24, progress=False)


# ---------------------------------------------------------------------------------------------
# The written dataset, made by the command-line script
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("brain") / "brain24"
    run = subprocess.run([sys.executable, "data_scripts/make_brain.py", "--out", str(out), "--n", "3",
                          "--size", "24", "--seed", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert str(out.resolve()) in run.stdout and " s" in run.stdout   # prints the folder and the time
    return out


def test_cli_writes_the_msd_layout(cli_dataset):
    root = cli_dataset
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T1", "1": "T2", "2": "FLAIR", "3": "PD"}
    assert meta["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM", "4": "lesion"}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        assert (root / sub).is_dir()
    for entry in meta["training"] + meta["test"]:
        assert set(entry) == {"image", "label", "lowdose"}
        assert all((root / path).is_file() for path in entry.values())
    with open(root / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {"age", "site", "has_lesion", "lesion_ml", "sha256"} <= set(rows[0])


def test_written_volumes_match_the_generator(cli_dataset):
    meta = json.loads((cli_dataset / "dataset.json").read_text())
    entries = {Path(e["image"]).name.split(".")[0]: e for e in meta["training"] + meta["test"]}
    entry = entries["brain_001"]
    image = nib.load(cli_dataset / entry["image"])
    label = nib.load(cli_dataset / entry["label"])
    assert image.shape == (24, 24, 24, 4) and label.shape == (24, 24, 24)
    assert np.asarray(label.dataobj).dtype == np.uint8
    spacing = meta["spacing_mm"][0]
    assert np.allclose(image.header.get_zooms()[:3], spacing) and np.allclose(label.header.get_zooms(), spacing)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), spacing) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    # subject 1 is subject_seed(0, 1) whatever the dataset size
    expected = make_brain_subject(subject_seed(0, 1), replace(CFG, size=24, lesion_probability=0.3))
    assert np.array_equal(np.asarray(label.dataobj), expected["label"])
    # images are stored as scaled int16 (precision 1/65535 of the range [0, 1])
    assert np.allclose(image.get_fdata(dtype=np.float32), expected["image"], atol=2e-5)
    lowdose = nib.load(cli_dataset / entry["lowdose"]).get_fdata(dtype=np.float32)
    assert np.allclose(lowdose, expected["lowdose"], atol=2e-5)


def test_cli_reports_bad_arguments_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "data_scripts/make_brain.py", "--out", str(tmp_path / "x"),
                          "--n", "2", "--size", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "size" in run.stderr and "Traceback" not in run.stderr


def test_a_cohort_made_in_worker_processes_is_the_one_made_here(monkeypatch):
    """Each subject depends on its seed alone: made by two workers, a cohort is bit-identical to
    the one made one by one in this process, in the same order, and torch keeps its threads."""
    from gen3d_lessons.data import workers
    from gen3d_lessons.data.brain import brain_cohort

    cfg = BrainConfig(size=32)
    seeds, overrides = [11, 12, 13, 14], [{}, {"age": 80.0}, {"has_lesion": True}, {"site": 2}]
    threads = torch.get_num_threads()
    monkeypatch.setenv("GEN3D_THREADS", "1")
    here = brain_cohort(cfg, seeds, channels=(0, 2), size=16, overrides=overrides)
    monkeypatch.setenv("GEN3D_THREADS", "2")
    monkeypatch.setattr(workers, "POOL_MIN_WORK", 0.0)
    assert workers.worker_count(len(seeds)) == 2
    pooled = brain_cohort(cfg, seeds, channels=(0, 2), size=16, overrides=overrides)
    assert torch.equal(here[0], pooled[0]) and here[1] == pooled[1]
    assert torch.get_num_threads() == threads


def test_worker_count_is_one_for_small_jobs_and_capped_by_gen3d_threads(monkeypatch):
    from gen3d_lessons.data.workers import POOL_MIN_WORK, worker_count

    monkeypatch.setenv("GEN3D_THREADS", "3")
    assert worker_count(2, work=POOL_MIN_WORK / 4) == 1
    assert worker_count(100) == 3 and worker_count(2, work=POOL_MIN_WORK) == 2
    monkeypatch.setenv("GEN3D_THREADS", "1")
    assert worker_count(600) == 1
