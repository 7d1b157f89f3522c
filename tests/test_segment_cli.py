"""`gen3d segment`, predict()'s brain mask and head check, and the classical tissue classifier
that chapter 10 holds its network against on real scans."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gen3d_lessons import cli
from gen3d_lessons.baselines.segmentation import classical_tissue_classifier, correct_bias
from gen3d_lessons.data.errors import DataError
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.tasks.segment import NotASegmenter, SegmenterConfig, load_segmenter, predict, save_segmenter
from gen3d_lessons.training import save_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = SegmenterConfig(unet=UNetConfig(in_channels=1, out_channels=4, features=(4, 8)), spacing_mm=3.0,
                          data={"dataset": "test"})
    return save_segmenter(UNet3D(cfg.unet), cfg, tmp_path / "seg.pt")


def three_tissues(shape=(40, 44, 36), seed=0):
    """A box of 'brain' whose CSF, GM and WM interleave as smooth random blobs (no shell that a
    smooth bias model could mistake for a bias), with T1-like means and noise; background around it."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    cuts = np.quantile(field, [0.3, 0.65])
    labels = 1 + np.digitize(field, cuts)                                # 1 CSF, 2 GM, 3 WM
    border = tuple(slice(max(2, s // 8), s - max(2, s // 8)) for s in shape)
    inside = np.zeros(shape, bool)
    inside[border] = True
    labels = np.where(inside, labels, 0)
    image = np.array([0.05, 0.3, 0.6, 0.9])[labels] + 0.04 * rng.standard_normal(shape)
    return np.abs(image).astype(np.float32), labels


def _write(tmp_path, name, data, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_classical_classifier_finds_three_tissues_under_a_bias_field():
    image, labels = three_tissues()
    x = np.linspace(-1, 1, image.shape[0])[:, None, None]
    biased = image * np.exp(0.3 * x)                                   # a smooth gain of +-35 %
    mask = labels > 0
    out = classical_tissue_classifier(biased, mask)
    assert set(np.unique(out)) == {0, 1, 2, 3} and (out[~mask] == 0).all()
    for k in (1, 2, 3):
        a, b = out == k, labels == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, k
    flat = correct_bias(biased, mask)
    wm = labels == 3
    left, right = wm & (x < -0.2), wm & (x > 0.2)
    assert abs(np.log(flat[left].mean() / flat[right].mean())) < 0.5 * abs(np.log(biased[left].mean() / biased[right].mean()))


def test_classical_classifier_clear_errors():
    image, labels = three_tissues((16, 16, 16))
    with pytest.raises(ValueError, match="mask"):
        classical_tissue_classifier(image, np.zeros_like(labels, bool))
    with pytest.raises(ValueError, match="mask"):
        classical_tissue_classifier(image, labels[:-1] > 0)
    with pytest.raises(ValueError, match="beta"):
        classical_tissue_classifier(image, labels > 0, beta=-1)
    with pytest.raises(ValueError, match="positive"):
        classical_tissue_classifier(-image, labels > 0)


def test_predict_with_a_mask_labels_only_the_brain(tmp_path, model):
    image, labels = three_tissues((24, 24, 24))
    path = _write(tmp_path, "t1.nii.gz", image, np.diag([2.0, 2, 2, 1]))
    mask_path = _write(tmp_path, "mask.nii.gz", (labels > 1).astype(np.uint8), np.diag([2.0, 2, 2, 1]))
    out = np.asarray(predict(path, model_path=model, mask=mask_path).dataobj)
    assert (out[labels <= 1] == 0).all()
    with pytest.raises(DataError, match="scan's own grid"):
        predict(path, model_path=model, mask=_write(tmp_path, "m2.nii.gz", np.ones((8, 8, 8), np.uint8)))
    with pytest.raises(DataError, match="affine differs"):
        predict(path, model_path=model, mask=_write(tmp_path, "m3.nii.gz", np.ones_like(labels, np.uint8)))
    with pytest.raises(DataError, match="empty"):
        predict(path, model_path=model, mask=np.zeros_like(labels))
    with pytest.raises(DataError, match="NaN"):
        predict(path, model_path=model, mask=np.where(labels > 1, 1.0, np.nan))


def test_predict_refuses_a_head_without_a_mask(tmp_path, model):
    image, labels = three_tissues((40, 40, 40))
    head = _write(tmp_path, "head.nii.gz", image, np.diag([7.0, 7, 7, 1]))     # 280 mm across: a head, not a brain
    with pytest.raises(DataError, match="whole head.*--mask"):
        predict(head, model_path=model)
    assert predict(head, model_path=model, check_head=False).shape == image.shape
    assert predict(head, model_path=model, mask=labels > 0).shape == image.shape


def test_load_segmenter_refuses_another_model(tmp_path, model):
    other = save_model(tmp_path / "vae.pt", UNet3D(UNetConfig(1, 2, (4, 8))), {"latent_dim": 8, "channels": [4]})
    with pytest.raises(NotASegmenter, match=r"vae\.pt: not a brain segmenter"):
        load_segmenter(other)
    _, cfg = load_segmenter(model)
    assert cfg.data == {"dataset": "test"} and cfg.kind == "brain tissue segmenter"


def test_cli_segment_writes_labels_and_a_table(tmp_path, model, capsys):
    image, labels = three_tissues((24, 24, 24))
    affine = np.array([[0, 0, -2.0, 30], [2.0, 0, 0, -20], [0, 3.0, 0, -10], [0, 0, 0, 1]])    # another orientation
    src = _write(tmp_path, "t1.nii.gz", image, affine)
    out = tmp_path / "labels.nii.gz"
    assert cli.main(["segment", str(src), str(out), "--model", str(model)]) == 0
    written = nib.load(out)
    assert written.shape == image.shape and np.allclose(written.affine, affine)
    rows = (tmp_path / "labels.tsv").read_text().splitlines()
    assert rows[0] == "index\tname\tvolume_ml" and [r.split("\t")[1] for r in rows[1:]] == ["CSF", "GM", "WM"]
    counts = np.bincount(np.asarray(written.dataobj).ravel(), minlength=4)
    assert float(rows[3].split("\t")[2]) == pytest.approx(counts[3] * 12 / 1000, abs=0.06)
    assert "mL" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("exists", "exists; choose another output or pass --force"),
    ("not_nifti_out", "must be a NIfTI file"),
    ("missing", "file not found"),
    ("corrupt", "broken.nii"),
    ("two_d", "2D"),
    ("same", "overwrite an input"),
    ("no_folder", "no such folder"),
    ("foreign_model", "not a brain segmenter"),
])
def test_cli_segment_bad_input_is_one_line(tmp_path, model, capsys, case, message):
    image, _ = three_tissues((16, 16, 16))
    src = _write(tmp_path, "t1.nii.gz", image)
    out = tmp_path / "out.nii.gz"
    args = [str(src), str(out), "--model", str(model)]
    if case == "exists":
        out.write_bytes(b"someone else's file")
    elif case == "not_nifti_out":
        args[1] = str(tmp_path / "out.png")
    elif case == "missing":
        args[0] = str(tmp_path / "none.nii.gz")
    elif case == "corrupt":
        (tmp_path / "broken.nii").write_bytes(b"garbage")
        args[0] = str(tmp_path / "broken.nii")
    elif case == "two_d":
        args[0] = str(_write(tmp_path, "flat.nii.gz", np.ones((16, 16), np.float32)))
    elif case == "same":
        args[1] = str(src)
    elif case == "no_folder":
        args[1] = str(tmp_path / "nowhere" / "out.nii.gz")
    elif case == "foreign_model":
        args[3] = str(save_model(tmp_path / "other.pt", UNet3D(UNetConfig(1, 2, (4, 8))), {"latent_dim": 8}))
    assert cli.main(["segment", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen3d: ") and "\n" not in err and message in err
    if case == "exists":
        assert out.read_bytes() == b"someone else's file"               # never overwritten without --force


def test_agreement_table_dice_volumes_and_gaps():
    from gen3d_lessons.tasks.segment import agreement_table

    ref = np.zeros((10, 10, 10), int)
    ref[:5] = 1
    ref[5:] = 2
    lab = ref.copy()
    lab[4] = 2                                                          # one slab of class 1 called class 2
    t = agreement_table(ref, lab, voxel_ml=0.008, classes={"A": 1, "B": 2})
    assert t.loc["A", "Dice"] == pytest.approx(2 * 400 / 900)
    assert t.loc["A", "reference (mL)"] == pytest.approx(4.0) and t.loc["B", "network (mL)"] == pytest.approx(4.8)
    assert t.loc["A", "volume gap"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="shape"):
        agreement_table(ref, lab[:-1], 1.0)
    with pytest.raises(ValueError, match="voxel_ml"):
        agreement_table(ref, lab, 0.0)
