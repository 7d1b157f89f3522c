"""Fixtures that write tiny datasets (12³ voxels) in the real layouts into tmp_path.

    brain_msd   ours: write_msd_dataset, 4-channel image + label + extra image "lowdose" + attributes
    heart_msd   ours: 4D cine image + ED label + extra label "es" + attributes with ed/es frames
    task01      a real-MSD Task01_BrainTumour look-alike: 4D image, test entries as strings,
                no labelsTs, no manifest, macOS "._" junk files beside the volumes
    task02      a real-MSD Task02_Heart look-alike: 3D image
    acdc        ACDC: training/ and testing/ patientNNN folders with Info.cfg, 4d, frames, gt
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gen3d_lessons.data.msd import Case, write_msd_dataset
from gen3d_lessons.data.nifti import save_nifti, spacing_affine

N = 12                      # voxels per side
SHAPE = (N, N, N)
FRAMES = 5                  # cine frames


def _image(rng: np.random.Generator, *extra: int) -> np.ndarray:
    return rng.normal(size=(*SHAPE, *extra)).astype(np.float32)


def _label(rng: np.random.Generator, n_labels: int) -> np.ndarray:
    return rng.integers(0, n_labels, size=SHAPE).astype(np.uint8)


@pytest.fixture
def brain_msd(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    affine = spacing_affine((1.0, 1.0, 1.5), SHAPE)
    cases = [Case(id=f"brain_{i:03d}", split="train" if i < 3 else "test", image=_image(rng, 4), affine=affine,
                  label=_label(rng, 4), extra_images={"lowdose": _image(rng, 4)},
                  attributes={"age": 60.5 + i, "sex": "F" if i % 2 else "M", "lesion": i % 2 == 0, "grade": i})
             for i in range(4)]
    return write_msd_dataset(tmp_path / "brain", cases, name="brain", description="test brains",
                             modality={"0": "T1", "1": "T2", "2": "FLAIR", "3": "PD"},
                             labels={"0": "background", "1": "csf", "2": "grey matter", "3": "white matter"})


@pytest.fixture
def heart_msd(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    affine = spacing_affine((1.5, 1.5, 8.0), SHAPE)
    cases = [Case(id=f"heart_{i:03d}", split="train" if i < 2 else "test", image=_image(rng, FRAMES),
                  affine=affine, label=_label(rng, 4), extra_labels={"es": _label(rng, 4)},
                  attributes={"pathology": "NOR", "ef_lv": 55.0 + i, "ed_frame": 0, "es_frame": 3})
             for i in range(3)]
    return write_msd_dataset(tmp_path / "heart", cases, name="heart", description="test hearts",
                             modality={"0": "cine-MRI"},
                             labels={"0": "background", "1": "RV", "2": "myocardium", "3": "LV"})


def _junk(path: Path) -> None:
    """A macOS resource fork: AppleDouble bytes, not a volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))


def _write_real_msd(root: Path, prefix: str, meta: dict, channels: int | None, n_labels: int,
                    n_train: int, n_test: int, seed: int) -> Path:
    """Volumes + dataset.json as the MSD archives ship them (test entries are plain strings)."""
    rng = np.random.default_rng(seed)
    extra = () if channels is None else (channels,)
    training, test = [], []
    for i in range(n_train):
        name = f"{prefix}_{i + 1:03d}.nii.gz"
        save_nifti(_image(rng, *extra), root / "imagesTr" / name)
        save_nifti(_label(rng, n_labels), root / "labelsTr" / name, dtype=np.uint8)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        _junk(root / "imagesTr" / f"._{name}")
        _junk(root / "labelsTr" / f"._{name}")
    for i in range(n_train, n_train + n_test):
        name = f"{prefix}_{i + 1:03d}.nii.gz"
        save_nifti(_image(rng, *extra), root / "imagesTs" / name)
        test.append(f"./imagesTs/{name}")
        _junk(root / "imagesTs" / f"._{name}")
    _junk(root / "._dataset.json")
    meta = {**meta, "numTraining": n_train, "numTest": n_test, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


@pytest.fixture
def task01(tmp_path: Path) -> Path:
    meta = {"name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
            "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    return _write_real_msd(tmp_path / "Task01_BrainTumour", "BRATS", meta, channels=4, n_labels=4,
                           n_train=3, n_test=2, seed=2)


@pytest.fixture
def task02(tmp_path: Path) -> Path:
    meta = {"name": "LeftAtrium", "description": "Left atrium segmentation", "tensorImageSize": "3D",
            "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"}}
    return _write_real_msd(tmp_path / "Task02_Heart", "la", meta, channels=None, n_labels=2,
                           n_train=2, n_test=1, seed=3)


ACDC_PATIENTS = {  # folder -> (ED, ES, Group), frames counted from 1 as in ACDC
    "training/patient001": (1, 4, "DCM"),
    "training/patient002": (2, 5, "NOR"),
    "testing/patient101": (1, 3, "MINF"),
}


@pytest.fixture
def acdc(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    root = tmp_path / "ACDC"
    affine = spacing_affine((1.4, 1.4, 10.0), SHAPE)
    for rel, (ed, es, group) in ACDC_PATIENTS.items():
        folder = root / rel
        pid = folder.name
        cine = _image(rng, FRAMES)
        save_nifti(cine, folder / f"{pid}_4d.nii.gz", affine)
        for frame in (ed, es):
            save_nifti(cine[..., frame - 1], folder / f"{pid}_frame{frame:02d}.nii.gz", affine)
            save_nifti(_label(rng, 4), folder / f"{pid}_frame{frame:02d}_gt.nii.gz", affine, dtype=np.uint8)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 184.0\n"
                                         f"NbFrame: {FRAMES}\nWeight: 95.0\n")
    _junk(root / "training" / "._patient001")
    return root
