"""The procedural cardiac cine phantom: anatomy, motion, pathology classes, contrast, dataset, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gen3d_lessons.data.heart import (HEART_CLASSES, HEART_LABELS, HeartConfig, heart_volumes_ml,
                                      make_heart_dataset, make_heart_subject, sample_anatomy,
                                      solve_cardiac_cycle, subject_seed)

REPO = Path(__file__).resolve().parents[1]
CFG = HeartConfig(size=32, frames=10)
SEEDS = (0, 1, 2)
# Clinical ranges of the LV EF (%) per class, as the phantom promises them (ACDC-like).
LV_EF = {"NOR": (55, 70), "HCM": (60, 80), "DCM": (10, 35), "MINF": (25, 45), "ARV": (55, 70)}


@pytest.fixture(scope="module")
def subjects():
    """Three subjects of every class at 32^3 x 10 frames (~1 s in all)."""
    return {(p, s): make_heart_subject(100 * s + k, CFG, pathology=p)
            for k, p in enumerate(HEART_CLASSES) for s in SEEDS}


def test_shapes_dtypes_and_acdc_labels(subjects):
    for subject in subjects.values():
        cine, labels = subject["cine"], subject["labels"]
        assert cine.shape == labels.shape == (32, 32, 32, 10)
        assert cine.dtype == np.float32 and labels.dtype == np.uint8
        assert 0.0 <= cine.min() and cine.max() <= 1.0
        levels = cine * (2 ** CFG.bits - 1)                   # stored on 12-bit levels, like a scanner
        assert np.abs(levels - np.round(levels)).max() < 1e-3
        assert set(np.unique(labels)) <= set(HEART_LABELS)
        for t in range(10):            # every structure at every frame
            assert set(np.unique(labels[..., t])) == {0, 1, 2, 3}
        # the heart fits in the field of view: no label on the faces of the grid
        for axis in range(3):
            assert not labels.take([0, -1], axis=axis).any()


def test_myocardial_volume_is_conserved_over_the_cycle(subjects):
    for key, subject in subjects.items():
        myo = heart_volumes_ml(subject["labels"], subject["affine"])["MYO"]
        assert np.abs(myo / myo[0] - 1).max() < 0.05, (key, myo)


def test_the_wall_thickens_in_systole():
    cfg = HeartConfig(size=32, frames=10)
    for k, pathology in enumerate(HEART_CLASSES):
        anat = sample_anatomy(np.random.default_rng(k), cfg, pathology)
        cycle = solve_cardiac_cycle(anat, cfg)
        assert cycle.w[cfg.es_frame] > 1.2 * cycle.w[0], pathology
        assert cycle.rho[cfg.es_frame] < cycle.rho[0], pathology


def test_infarct_segment_is_akinetic_and_thin():
    cfg = HeartConfig(size=32, frames=10)
    anat = sample_anatomy(np.random.default_rng(3), cfg, "MINF")
    assert anat.motion_weight(np.array([anat.infarct_theta])) == pytest.approx(0.0)
    assert anat.motion_weight(np.array([anat.infarct_theta + np.pi])) == pytest.approx(1.0)
    assert 0 < anat.w_scar < 0.6 * anat.w0


def test_ed_is_the_largest_and_es_the_smallest_cavity(subjects):
    for key, subject in subjects.items():
        lv = heart_volumes_ml(subject["labels"], subject["affine"])["LV"]
        assert subject["ed_frame"] == 0 and subject["es_frame"] == round(0.35 * 10)
        assert lv[0] == lv.max() and lv[subject["es_frame"]] == lv.min(), (key, lv)


@pytest.mark.parametrize("pathology", HEART_CLASSES)
def test_ejection_fraction_is_in_the_class_range(subjects, pathology):
    lo, hi = LV_EF[pathology]
    for seed in SEEDS:
        subject = subjects[(pathology, seed)]
        vol = heart_volumes_ml(subject["labels"], subject["affine"])
        es = subject["es_frame"]
        ef_lv = 100 * (vol["LV"][0] - vol["LV"][es]) / vol["LV"][0]
        ef_rv = 100 * (vol["RV"][0] - vol["RV"][es]) / vol["RV"][0]
        assert lo <= ef_lv <= hi, (pathology, seed, ef_lv)
        assert subject["attributes"]["ef_lv"] == pytest.approx(ef_lv, abs=0.01)
        assert subject["attributes"]["pathology"] == pathology
        if pathology == "ARV":
            assert ef_rv < 40, (seed, ef_rv)
        else:
            assert ef_rv >= 40, (pathology, seed, ef_rv)


def test_class_signatures():
    """HCM has the thickest wall, DCM the largest cavity, ARV the largest RV (same seeds)."""
    cfg = HeartConfig(size=32, frames=6)
    attrs = {p: [make_heart_subject(s, cfg, pathology=p)["attributes"] for s in (5, 6)] for p in HEART_CLASSES}
    mean = {p: {k: np.mean([a[k] for a in v]) for k in ("wall_mm", "edv_ml", "rv_edv_ml")} for p, v in attrs.items()}
    assert max(mean, key=lambda p: mean[p]["wall_mm"]) == "HCM"
    assert max(mean, key=lambda p: mean[p]["edv_ml"]) == "DCM"
    assert max(mean, key=lambda p: mean[p]["rv_edv_ml"]) == "ARV"


def test_bssfp_contrast_blood_bright_myocardium_dark(subjects):
    for key, subject in subjects.items():
        for t in (subject["ed_frame"], subject["es_frame"]):
            image, labels = subject["cine"][..., t], subject["labels"][..., t]
            lv, rv, myo = (image[labels == k].mean() for k in (3, 1, 2))
            assert lv > 1.5 * myo and rv > 1.5 * myo, (key, t, lv, rv, myo)


def test_short_axis_spacing_is_anisotropic(subjects):
    affine = subjects[("NOR", 0)]["affine"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert spacing[0] == pytest.approx(spacing[1])
    assert spacing[2] == pytest.approx(2 * spacing[0])
    assert 1.5 <= HeartConfig(size=64).spacing[0] <= 2.5


def test_determinism_by_seed():
    cfg = HeartConfig(size=24, frames=4)
    a, b = make_heart_subject(7, cfg), make_heart_subject(7, cfg)
    c = make_heart_subject(8, cfg, pathology=a["attributes"]["pathology"])
    np.testing.assert_array_equal(a["cine"], b["cine"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["attributes"] == b["attributes"]
    assert not np.array_equal(a["labels"], c["labels"])


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="pathology"):
        make_heart_subject(0, CFG, pathology="HEALTHY")
    with pytest.raises(ValueError, match="seed"):
        make_heart_subject(-1, CFG)
    with pytest.raises(ValueError, match="size"):
        HeartConfig(size=8)
    with pytest.raises(ValueError, match="frames"):
        HeartConfig(frames=1)
    with pytest.raises(TypeError, match="cfg"):
        make_heart_subject(0, {"size": 32})
    with pytest.raises(ValueError, match="test_fraction"):
        make_heart_dataset("unused", n=2, test_fraction=1.5)
    with pytest.raises(ValueError, match="n must"):
        make_heart_dataset("unused", n=0)


def test_dataset_layout(tmp_path):
    root = make_heart_dataset(tmp_path / "heart", n=5, size=24, frames=6, seed=3, test_fraction=0.2)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "cine-bSSFP"}
    assert meta["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    assert (meta["numTraining"], meta["numTest"]) == (4, 1)
    assert meta["training"][0] == {"image": "./imagesTr/heart_000.nii.gz", "label": "./labelsTr/heart_000.nii.gz",
                                   "es": "./labelsTr/heart_000_es.nii.gz"}
    assert (root / "imagesTs" / "heart_004.nii.gz").exists() and (root / "labelsTs" / "heart_004_es.nii.gz").exists()

    with open(root / "manifest.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["key"] == "image"]
    assert [r["pathology"] for r in rows] == list(HEART_CLASSES)         # round-robin
    for row in rows:
        assert row["es_frame"] == str(round(0.35 * 6)) and row["ed_frame"] == "0"
        lo, hi = LV_EF[row["pathology"]]
        assert lo <= float(row["ef_lv"]) <= hi and float(row["ef_rv"]) > 0

    image = nib.load(root / "imagesTr" / "heart_001.nii.gz")
    ed = np.asarray(nib.load(root / "labelsTr" / "heart_001.nii.gz").dataobj)
    es = np.asarray(nib.load(root / "labelsTr" / "heart_001_es.nii.gz").dataobj)
    assert image.shape == (24, 24, 24, 6) and ed.shape == es.shape == (24, 24, 24)
    assert np.allclose(image.header.get_zooms()[:3], HeartConfig(size=24).spacing)
    assert (ed == 3).sum() > (es == 3).sum()              # the cavity is smaller at ES


def test_subject_does_not_depend_on_dataset_size(tmp_path):
    small = make_heart_dataset(tmp_path / "a", n=2, size=16, frames=3, seed=4, test_fraction=0)
    large = make_heart_dataset(tmp_path / "b", n=3, size=16, frames=3, seed=4, test_fraction=0)
    for sub in ("imagesTr/heart_001.nii.gz", "labelsTr/heart_001_es.nii.gz"):
        a, b = (np.asarray(nib.load(root / sub).dataobj) for root in (small, large))
        np.testing.assert_array_equal(a, b)
    assert subject_seed(4, 1) != subject_seed(4, 2) and subject_seed(4, 1) != subject_seed(5, 1)


def test_cli_writes_a_tiny_dataset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "cli_heart"
    result = subprocess.run([sys.executable, "data_scripts/make_heart.py", "--out", str(out), "--n", "2",
                             "--size", "16", "--frames", "3", "--seed", "0", "--test-fraction", "0.5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["numTraining"], meta["numTest"]) == (1, 1)
