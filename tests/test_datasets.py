"""read_dataset / load_case / VolumeDataset on tiny datasets in our, real-MSD and ACDC layouts."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gen3d_lessons.data.datasets import (ACDC_LABELS, CaseRecord, DatasetIndex, VolumeDataset, load_case,
                                         read_dataset)
from gen3d_lessons.data.errors import DataError
from gen3d_lessons.data.nifti import save_nifti

N, FRAMES = 12, 5  # the size and cine length the fixtures in conftest.py write
SHAPE = (N, N, N)


def _assert_names(err: pytest.ExceptionInfo, path, *words: str) -> None:
    message = str(err.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, message


# ------------------------------------------------------------------------------ our layout

def test_our_brain_layout(brain_msd):
    index = read_dataset(brain_msd, verify="sha256")
    assert isinstance(index, DatasetIndex)
    assert (index.layout, index.name, len(index)) == ("msd", "brain", 4)
    assert [c.id for c in index.split("train")] == ["brain_000", "brain_001", "brain_002"]
    assert [c.id for c in index.split("test")] == ["brain_003"]
    assert index.modality == {0: "T1", 1: "T2", 2: "FLAIR", 3: "PD"}
    assert index.labels[3] == "white matter"
    case = index.case("brain_001")
    assert set(case.files) == {"image", "label", "lowdose"} and case.label_keys == ("label",)
    assert case.files["lowdose"] == brain_msd / "imagesTr" / "brain_001_lowdose.nii.gz"
    assert case.attributes == {"age": 61.5, "sex": "F", "lesion": False, "grade": 1}
    assert isinstance(case.attributes["grade"], int) and isinstance(case.attributes["lesion"], bool)
    # the test split has labels too (labelsTs is ours)
    assert index.case("brain_003").files["label"] == brain_msd / "labelsTs" / "brain_003.nii.gz"


def test_attributes_table(brain_msd):
    table = read_dataset(brain_msd).attributes_table()
    assert list(table.index) == ["brain_000", "brain_001", "brain_002", "brain_003"]
    assert list(table.columns) == ["split", "age", "sex", "lesion", "grade"]
    assert table.loc["brain_002", "age"] == 62.5 and table["age"].dtype == np.float64
    assert table["split"].tolist() == ["train", "train", "train", "test"]


def test_load_case_shapes_and_dtypes(brain_msd):
    case = read_dataset(brain_msd).case("brain_000")
    volumes = load_case(case)
    assert volumes["image"].shape == (*SHAPE, 4) and volumes["image"].data.dtype == np.float32
    assert volumes["label"].shape == SHAPE and volumes["label"].data.dtype == np.int64
    assert set(np.unique(volumes["label"].data)) <= {0, 1, 2, 3}
    assert volumes["image"].spacing == pytest.approx((1.0, 1.0, 1.5))
    assert list(load_case(case, ["label"])) == ["label"]
    with pytest.raises(DataError, match="case brain_000 .* has no 'es' volume; it has image, label, lowdose"):
        load_case(case, ["es"])


def test_our_heart_layout_extra_label(heart_msd):
    index = read_dataset(heart_msd, verify="sha256")
    case = index.case("heart_001")
    assert case.label_keys == ("label", "es")
    assert case.attributes == {"pathology": "NOR", "ef_lv": pytest.approx(56.0), "ed_frame": 0, "es_frame": 3}
    volumes = load_case(case)
    assert volumes["image"].shape == (*SHAPE, FRAMES)
    assert volumes["es"].shape == SHAPE and volumes["es"].data.dtype == np.int64


# ---------------------------------------------------------------------------- real MSD

def test_real_msd_task01(task01):
    index = read_dataset(task01, verify="sha256")  # no manifest: nothing to checksum
    assert (index.layout, index.name) == ("msd", "BRATS")
    assert index.modality == {0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"}
    assert [c.id for c in index.split("train")] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    test = index.split("test")
    assert [c.id for c in test] == ["BRATS_004", "BRATS_005"]
    assert test[0].files == {"image": task01 / "imagesTs" / "BRATS_004.nii.gz"} and test[0].attributes == {}
    assert all(not p.name.startswith("._") for c in index.cases for p in c.files.values())
    assert load_case(index.cases[0])["image"].shape == (*SHAPE, 4)
    assert index.attributes_table().shape == (5, 1)


def test_real_msd_task02(task02):
    index = read_dataset(task02)
    assert (index.name, index.labels, len(index)) == ("LeftAtrium", {0: "background", 1: "left atrium"}, 3)
    volumes = load_case(index.split("train")[1])
    assert volumes["image"].shape == SHAPE and set(np.unique(volumes["label"].data)) <= {0, 1}


def test_macos_junk_entry_in_dataset_json_is_skipped(task02):
    meta = json.loads((task02 / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/._la_001.nii.gz", "label": "./labelsTr/._la_001.nii.gz"})
    (task02 / "dataset.json").write_text(json.dumps(meta))
    assert len(read_dataset(task02).split("train")) == 2


# -------------------------------------------------------------------------------- ACDC

def test_acdc_layout(acdc):
    index = read_dataset(acdc)
    assert (index.layout, index.name, index.labels) == ("acdc", "ACDC", ACDC_LABELS)
    assert [c.id for c in index.split("train")] == ["patient001", "patient002"]
    assert [c.id for c in index.split("test")] == ["patient101"]
    case = index.case("patient002")
    folder = acdc / "training" / "patient002"
    assert case.files == {"image": folder / "patient002_4d.nii.gz",
                          "ed_image": folder / "patient002_frame02.nii.gz",
                          "es_image": folder / "patient002_frame05.nii.gz",
                          "ed_label": folder / "patient002_frame02_gt.nii.gz",
                          "es_label": folder / "patient002_frame05_gt.nii.gz"}
    assert case.attributes == {"ed_frame": 1, "es_frame": 4, "pathology": "NOR", "height": 184.0,
                               "n_frames": FRAMES, "weight": 95.0}
    volumes = load_case(case)
    assert volumes["image"].shape == (*SHAPE, FRAMES)
    # the ED frame file is the cine at the (0-based) ed_frame
    np.testing.assert_array_equal(volumes["ed_image"].data, volumes["image"].data[..., case.attributes["ed_frame"]])
    assert volumes["es_label"].data.dtype == np.int64


def test_acdc_patients_directly_under_root(acdc, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(acdc / "training", flat)
    index = read_dataset(flat)
    assert [c.split for c in index.cases] == ["train", "train"]


def test_acdc_without_ground_truth(acdc):
    for gt in (acdc / "testing" / "patient101").glob("*_gt.nii.gz"):
        gt.unlink()
    case = read_dataset(acdc).case("patient101")
    assert set(case.files) == {"image", "ed_image", "es_image"}


# ------------------------------------------------------------------------ bad folders

def test_missing_root(tmp_path):
    root = tmp_path / "not_there"
    with pytest.raises(DataError) as err:
        read_dataset(root)
    _assert_names(err, root, "dataset folder not found")


def test_root_is_a_file(tmp_path):
    root = tmp_path / "data.zip"
    root.write_bytes(b"PK")
    with pytest.raises(DataError) as err:
        read_dataset(root)
    _assert_names(err, root, "is a file")


def test_wrong_layout_says_what_was_expected_and_found(tmp_path):
    root = tmp_path / "downloads"
    (root / "scans").mkdir(parents=True)
    (root / "readme.txt").write_text("hi")
    (root / "._readme.txt").write_text("junk")
    with pytest.raises(DataError) as err:
        read_dataset(root)
    _assert_names(err, root, "MSD", "dataset.json", "ACDC", "Info.cfg", "found readme.txt, scans/")
    assert "._readme" not in str(err.value)


def test_empty_folder_and_images_without_dataset_json(tmp_path, task02):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found an empty folder"):
        read_dataset(tmp_path / "empty")
    (task02 / "dataset.json").unlink()
    with pytest.raises(DataError) as err:
        read_dataset(task02)
    _assert_names(err, task02, "imagesTr/ folder but no dataset.json")


def test_dataset_one_level_down_gets_a_hint(task01):
    with pytest.raises(DataError) as err:
        read_dataset(task01.parent)
    _assert_names(err, task01.parent, f"one level down: pass {task01}")


def test_dataset_json_lists_a_missing_file(task01):
    missing = task01 / "labelsTr" / "BRATS_002.nii.gz"
    missing.unlink()
    with pytest.raises(DataError) as err:
        read_dataset(task01)
    _assert_names(err, missing, "file not found", "dataset.json", "'label' of case BRATS_002")
    assert len(read_dataset(task01, verify="none")) == 5


def test_invalid_dataset_json(task02):
    path = task02 / "dataset.json"
    path.write_text('{"name": "LeftAtrium", "training": [')
    with pytest.raises(DataError) as err:
        read_dataset(task02)
    _assert_names(err, path, "not valid JSON")
    path.write_text('{"name": "LeftAtrium"}')
    with pytest.raises(DataError) as err:
        read_dataset(task02)
    _assert_names(err, path, "no 'training' list")


def test_empty_file_listed(task02):
    path = task02 / "imagesTs" / "la_003.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        read_dataset(task02)
    _assert_names(err, path, "empty file (0 bytes)")


def test_checksum_mismatch(brain_msd):
    path = brain_msd / "imagesTr" / "brain_001_lowdose.nii.gz"
    save_nifti(np.zeros((*SHAPE, 4), np.float32), path)  # a valid volume, but not the one written
    read_dataset(brain_msd, verify="size")  # sizes cannot see it
    with pytest.raises(DataError) as err:
        read_dataset(brain_msd, verify="sha256")
    _assert_names(err, path, "checksum mismatch: manifest says", "file has")


def test_one_flipped_byte_is_caught_on_first_use_and_checked_once(brain_msd, monkeypatch):
    from gen3d_lessons.data import datasets

    monkeypatch.setattr(datasets, "_verified", {})
    read_dataset(brain_msd)                                       # the first read hashes every file
    hashed = []
    real = datasets.sha256
    monkeypatch.setattr(datasets, "sha256", lambda p: hashed.append(p) or real(p))
    read_dataset(brain_msd)
    assert hashed == []                                           # unchanged files: not hashed again
    path = brain_msd / "imagesTr" / "brain_001.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        read_dataset(brain_msd)                                   # the default reader, no option needed
    _assert_names(err, path, "checksum mismatch")
    assert hashed == [path]


def test_manifest_file_missing(brain_msd):
    with open(brain_msd / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append({**rows[0], "key": "mask", "path": "labelsTr/brain_000_mask.nii.gz"})
    with open(brain_msd / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError) as err:
        read_dataset(brain_msd)
    _assert_names(err, brain_msd / "labelsTr" / "brain_000_mask.nii.gz", "file not found; manifest.csv lists it")


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)), ["not gzip-compressed"]),
    (lambda p: p.write_bytes(p.read_bytes()[:300]), ["truncated"]),
    (lambda p: p.write_text("<html>404 Not Found</html>"), ["not gzip-compressed", "starts with text '<html>"]),
])
def test_corrupt_volume_in_a_dataset(task01, damage, words):
    path = task01 / "imagesTr" / "BRATS_002.nii.gz"
    damage(path)
    case = read_dataset(task01).case("BRATS_002")  # the index only checks sizes
    with pytest.raises(DataError) as err:
        load_case(case)
    _assert_names(err, path, *words)


def test_image_with_wrong_dimensionality(task02):
    path = task02 / "imagesTr" / "la_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((N, N), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_001"))
    _assert_names(err, path, "expected a 3D or 4D volume", f"got shape {(N, N)}")


def test_label_must_be_3d(task02):
    path = task02 / "labelsTr" / "la_001.nii.gz"
    save_nifti(np.zeros((*SHAPE, 2), np.uint8), path)
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_001"))
    _assert_names(err, path, "expected a 3D volume")


def test_nan_voxels_in_a_dataset(task02):
    path = task02 / "imagesTr" / "la_002.nii.gz"
    image = np.ones(SHAPE, np.float32)
    image[:2, 0, 0] = np.nan
    save_nifti(image, path)
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_002"))
    _assert_names(err, path, "contains 2 NaN voxels")


def test_label_with_unexpected_values(task02):
    path = task02 / "labelsTr" / "la_002.nii.gz"
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, :3] = 7
    label[1, 1, 1] = 1
    label[2, 2, 2] = 4
    save_nifti(label, path, dtype=np.uint8)
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_002"))
    _assert_names(err, path, "unexpected label values [4, 7] in 4 voxels", "left atrium")


def test_label_with_fractional_values(task02):
    path = task02 / "labelsTr" / "la_002.nii.gz"
    save_nifti(np.full(SHAPE, 0.25, np.float32), path)
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_002"))
    _assert_names(err, path, "non-integer values")


def test_label_with_another_grid(task02):
    path = task02 / "labelsTr" / "la_002.nii.gz"
    save_nifti(np.zeros((N, N, N - 2), np.uint8), path, dtype=np.uint8)
    with pytest.raises(DataError) as err:
        load_case(read_dataset(task02).case("la_002"))
    _assert_names(err, path, f"spatial shape {(N, N, N - 2)} differs from {SHAPE}")


@pytest.mark.parametrize("content, words", [
    ("ED: 1\nGroup: DCM\n", ["missing ES"]),
    ("Group: DCM\nHeight: 170\n", ["missing ED and ES", "found keys ['Group', 'Height']"]),
    ("ED: one\nES: 4\n", ["ED must be a frame number"]),
])
def test_acdc_bad_info_cfg(acdc, content, words):
    path = acdc / "training" / "patient002" / "Info.cfg"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_dataset(acdc)
    _assert_names(err, path, *words)


def test_acdc_missing_info_cfg_and_frame(acdc):
    path = acdc / "testing" / "patient101" / "patient101_frame03.nii.gz"
    path.unlink()
    with pytest.raises(DataError) as err:
        read_dataset(acdc)
    _assert_names(err, path, "file not found", "Info.cfg", "'es_image' of case patient101")
    info = acdc / "training" / "patient001" / "Info.cfg"
    info.unlink()
    with pytest.raises(DataError) as err:
        read_dataset(acdc)
    _assert_names(err, info, "missing")


def test_unknown_split_and_verify(brain_msd):
    index = read_dataset(brain_msd)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        index.split("val")
    with pytest.raises(ValueError, match="verify must be"):
        read_dataset(brain_msd, verify="md5")


# ------------------------------------------------------------------------- VolumeDataset

def test_volume_dataset_items(brain_msd):
    ds = VolumeDataset(brain_msd)
    assert len(ds) == 3
    item = ds[1]
    assert item["id"] == "brain_001"
    assert item["image"].shape == (4, N, N, N) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, N, N, N) and item["label"].dtype == torch.int64
    assert item["age"].dtype == torch.float32 and item["age"].item() == pytest.approx(61.5)
    assert item["grade"].dtype == torch.int64 and item["lesion"].dtype == torch.bool and item["sex"] == "F"
    volumes = load_case(ds.records[1])
    # channels-last NIfTI -> channels-first tensor
    np.testing.assert_array_equal(item["image"][2].numpy(), volumes["image"].data[..., 2])
    np.testing.assert_array_equal(item["label"][0].numpy(), volumes["label"].data)
    assert ds[1]["image"] is item["image"]  # cached
    assert VolumeDataset(brain_msd, cache=False)[1]["image"] is not VolumeDataset(brain_msd)[1]["image"]
    assert ds[-1]["id"] == "brain_002"
    with pytest.raises(IndexError):
        ds[3]


def test_volume_dataset_channels_by_name_and_index(brain_msd):
    full = VolumeDataset(brain_msd, keys=("image", "lowdose"))[0]
    by_name = VolumeDataset(brain_msd, keys=("image", "lowdose"), channels=("flair", "T1"))[0]
    assert by_name["image"].shape == (2, N, N, N) and by_name["lowdose"].shape == (2, N, N, N)
    torch.testing.assert_close(by_name["image"], full["image"][[2, 0]])
    one = VolumeDataset(brain_msd, channels=3)[0]
    torch.testing.assert_close(one["image"], full["image"][[3]])
    with pytest.raises(ValueError, match="unknown channel 'T1ce'"):
        VolumeDataset(brain_msd, channels="T1ce")
    with pytest.raises(DataError, match="channel\\(s\\) \\[4\\] out of range: the volume has 4 channel"):
        VolumeDataset(brain_msd, channels=4)[0]


def test_volume_dataset_frames(heart_msd):
    cine = VolumeDataset(heart_msd, keys=("image", "label", "es"))[0]
    assert cine["image"].shape == (FRAMES, N, N, N) and cine["es"].shape == (1, N, N, N)
    second = VolumeDataset(heart_msd, frame=2)[0]
    assert second["image"].shape == (1, N, N, N)
    torch.testing.assert_close(second["image"][0], cine["image"][2])
    es = VolumeDataset(heart_msd, frame="es")[0]
    torch.testing.assert_close(es["image"][0], cine["image"][3])
    with pytest.raises(DataError, match=f"frame 9 is out of range: the volume has {FRAMES} frames"):
        VolumeDataset(heart_msd, frame=9)[0]
    with pytest.raises(ValueError, match="not both"):
        VolumeDataset(heart_msd, frame=0, channels=0)


def test_volume_dataset_acdc(acdc):
    ds = VolumeDataset(acdc, keys=("image", "ed_image", "ed_label"), frame="ed")
    item = ds[1]
    assert item["image"].shape == (1, N, N, N) and item["ed_image"].shape == (1, N, N, N)
    torch.testing.assert_close(item["image"], item["ed_image"])
    assert item["ed_label"].dtype == torch.int64 and item["pathology"] == "NOR"


def test_volume_dataset_resize(brain_msd, task02):
    item = VolumeDataset(brain_msd, size=8)[0]
    assert item["image"].shape == (4, 8, 8, 8) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 8, 8, 8) and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3}
    item = VolumeDataset(task02, size=(16, 8, 4))[0]
    assert item["image"].shape == (1, 16, 8, 4) and item["label"].shape == (1, 16, 8, 4)
    # nearest neighbour on an exact 2x upsampling copies each label voxel into a 2x2x2 block
    up = VolumeDataset(task02, size=2 * N, keys=("label",))[0]["label"][0]
    ref = VolumeDataset(task02, keys=("label",))[0]["label"][0]
    torch.testing.assert_close(up[::2, ::2, ::2], ref)


def test_volume_dataset_batches(heart_msd):
    loader = DataLoader(VolumeDataset(heart_msd, frame="ed"), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, N, N, N) and batch["label"].shape == (2, 1, N, N, N)
    assert batch["id"] == ["heart_000", "heart_001"] and batch["pathology"] == ["NOR", "NOR"]
    assert batch["ef_lv"].shape == (2,) and batch["ef_lv"].dtype == torch.float32


def test_volume_dataset_bad_requests(task01, brain_msd):
    with pytest.raises(DataError) as err:
        VolumeDataset(task01, split="test")
    _assert_names(err, task01, "test case BRATS_004 has no 'label' volume (it has image)")
    assert VolumeDataset(task01, split="test", keys=("image",))[0]["image"].shape == (4, N, N, N)
    index = read_dataset(brain_msd)
    index.cases = index.split("test")
    with pytest.raises(DataError, match="no 'train' cases \\(train: 0, test: 1\\)"):
        VolumeDataset(index)


def test_case_record_by_hand(task02):
    """A CaseRecord made without read_dataset still loads (no label set: no value check)."""
    record = CaseRecord(id="x", split="train", files={"image": task02 / "imagesTr" / "la_001.nii.gz",
                                                      "label": task02 / "labelsTr" / "la_001.nii.gz"})
    assert load_case(record)["label"].data.dtype == np.int64
