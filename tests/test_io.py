"""load_nifti and check_volume: good volumes read back, every kind of bad input names itself."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from gen3d_lessons.data.errors import DataError
from gen3d_lessons.data.io import Volume, check_volume, load_nifti
from gen3d_lessons.data.nifti import save_nifti, spacing_affine


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _raw_nifti(array: np.ndarray, path, affine=None):
    """Write with nibabel directly (save_nifti refuses 2D / 5D arrays, which we want to test)."""
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _assert_names(err: pytest.ExceptionInfo, path, *words: str) -> None:
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert err.value.path == path
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------------------------- good

def test_reads_3d_volume_with_spacing_and_dtype(tmp_path, rng):
    array = rng.normal(size=(12, 10, 8)).astype(np.float32)
    path = save_nifti(array, tmp_path / "a.nii.gz", spacing=(1.0, 2.0, 3.5))
    vol = load_nifti(path, ndim=3)
    assert isinstance(vol, Volume) and vol.path == path
    assert vol.data.dtype == np.float32 and vol.shape == (12, 10, 8)
    np.testing.assert_array_equal(vol.data, array)
    assert vol.spacing == pytest.approx((1.0, 2.0, 3.5))
    np.testing.assert_allclose(vol.affine, spacing_affine((1.0, 2.0, 3.5), array.shape))


def test_reads_4d_and_uncompressed_and_keeps_dtype_when_asked(tmp_path, rng):
    array = rng.normal(size=(6, 6, 6, 4)).astype(np.float32)
    assert load_nifti(save_nifti(array, tmp_path / "a.nii"), ndim=(3, 4)).shape == (6, 6, 6, 4)
    labels = rng.integers(0, 3, size=(6, 6, 6)).astype(np.uint8)
    path = save_nifti(labels, tmp_path / "l.nii.gz", dtype=np.uint8)
    assert load_nifti(path, dtype=None).data.dtype == np.uint8
    assert load_nifti(path, dtype=np.int64).data.dtype == np.int64


# ----------------------------------------------------------------------------------------- bad

def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "file not found")


def test_folder_and_wrong_extension(tmp_path):
    with pytest.raises(DataError) as err:
        load_nifti(tmp_path)
    _assert_names(err, tmp_path, "is a folder")
    path = tmp_path / "volume.mha"
    path.write_bytes(b"ObjectType = Image\n")
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, ".nii or .nii.gz")


def test_random_bytes_named_nii_gz(tmp_path, rng):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(b"\x00" + rng.bytes(999))
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "not gzip-compressed")


def test_text_file_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("hello, this is not a volume\n")
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "not gzip-compressed", "starts with text 'hello")


def test_text_file_named_nii(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("hello " * 100)
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "not a readable NIfTI")


def test_gzip_of_something_else(tmp_path):
    path = tmp_path / "other.nii.gz"
    path.write_bytes(gzip.compress(b"x" * 1000))
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "not a readable NIfTI")


def test_truncated_gzip(tmp_path, rng):
    path = save_nifti(rng.normal(size=(12, 12, 12)).astype(np.float32), tmp_path / "cut.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "truncated")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "empty file")


@pytest.mark.parametrize("shape", [(12, 12), (4, 4, 4, 2, 2)])
def test_wrong_dimensionality_says_expected_and_got(tmp_path, shape):
    path = _raw_nifti(np.zeros(shape, np.float32), tmp_path / "v.nii.gz")
    with pytest.raises(DataError) as err:
        load_nifti(path, ndim=(3, 4))
    _assert_names(err, path, "expected a 3D or 4D volume", f"got shape {shape}")


def test_4d_where_3d_expected(tmp_path):
    path = save_nifti(np.zeros((4, 4, 4, 2), np.float32), tmp_path / "v.nii.gz")
    with pytest.raises(DataError) as err:
        load_nifti(path, ndim=3)
    _assert_names(err, path, "expected a 3D volume", "(4, 4, 4, 2)")


def test_nan_and_inf_voxels_are_counted(tmp_path, rng):
    array = rng.normal(size=(8, 8, 8)).astype(np.float32)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    path = save_nifti(array, tmp_path / "nan.nii.gz")
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "3 NaN and 1 inf voxels")
    assert np.isnan(load_nifti(path, allow_nan=True).data).sum() == 3


def test_non_invertible_affine(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    flat = np.eye(4)
    flat[2, 2] = 0.0  # every slice at the same z
    img.header.set_sform(flat, code=1)
    img.header.set_qform(None, code=0)
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(img.dataobj, None, header=img.header), str(path))
    with pytest.raises(DataError) as err:
        load_nifti(path)
    _assert_names(err, path, "affine is not invertible")


# ----------------------------------------------------------------------------- check_volume

def test_check_volume_passes_good_arrays_through():
    x = np.zeros((2, 1, 4, 4, 4), np.float32)
    assert check_volume(x, "x", ndim=5, shape=(None, 1, None, None, None)) is x
    t = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bfloat16)
    assert check_volume(t, "t", ndim=(4, 5)) is t
    assert check_volume(np.arange(8).reshape(2, 2, 2), "labels", ndim=3) is not None


@pytest.mark.parametrize("value, kwargs, words", [
    (np.zeros((4, 4)), dict(ndim=3), ["expected a 3D array", "got shape (4, 4)"]),
    (torch.zeros(2, 3, 4, 4, 4), dict(shape=(None, 1, None, None, None)), ["expected shape (*, 1, *, *, *)"]),
    (np.array([["a", "b"]]), {}, ["dtype <U1 is not a real number type"]),
    (np.zeros((2, 2), bool), {}, ["dtype bool"]),
    (torch.zeros(2, 2, dtype=torch.bool), {}, ["dtype torch.bool"]),
    ([[1.0, 2.0]], {}, ["expected an array or tensor, got list"]),
])
def test_check_volume_rejects_with_the_name(value, kwargs, words):
    with pytest.raises(ValueError) as err:
        check_volume(value, "x_start", **kwargs)
    assert isinstance(err.value, DataError)
    message = str(err.value)
    assert message.startswith("x_start: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("make", [np.zeros, torch.zeros])
def test_check_volume_counts_nans(make):
    x = make((4, 4, 4))
    x[0, 0, 0] = float("nan")
    x[1, 1, 1] = float("nan")
    with pytest.raises(DataError, match=r"^image: contains 2 NaN values \(of 64\)"):
        check_volume(x, "image")
    assert check_volume(x, "image", allow_nan=True) is x
