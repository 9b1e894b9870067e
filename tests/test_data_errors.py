"""Every kind of bad input is a DataError naming the case and the file; skip_bad goes on."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from ldmfast.data import (
    DataError,
    PreprocessOptions,
    SliceDataset,
    load_case,
    make_phantom_dataset,
    preprocess_case,
    release_cases,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_cases=3, shape=(32, 32, 4), seed=5, progress=False)
    return root


@pytest.fixture
def root(phantom, tmp_path):
    shutil.copytree(phantom, tmp_path / "data")
    return tmp_path / "data"


def _rewrite(path, data=None, affine=None):
    """Replace a NIfTI file's voxels and/or affine, keeping the rest of its header."""
    img = nib.load(path)
    data = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine, img.header), path)


def _load_error(root, case="phantom_001"):
    with pytest.raises(DataError) as info:
        load_case(next(c for c in release_cases(root) if c.case_id == case))
    return info.value


def _names(err, case, filename):
    assert err.case == case and err.path.endswith(filename)
    assert case in str(err) and filename in str(err)


def test_shape_disagreeing_with_ctp(root):
    _rewrite(root / "phantom_001" / "adc.nii.gz", np.zeros((32, 30, 4), np.float32))
    err = _load_error(root)
    _names(err, "phantom_001", "adc.nii.gz")
    assert "shape" in err.reason


def test_affine_disagreeing_with_ctp(root):
    path = root / "phantom_001" / "lesion.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 2.0
    _rewrite(path, affine=affine)
    err = _load_error(root)
    _names(err, "phantom_001", "lesion.nii.gz")
    assert "affine" in err.reason


def test_non_finite_voxels(root):
    path = root / "phantom_001" / "dwi.nii.gz"
    data = nib.load(path).get_fdata(dtype=np.float32)
    data[3, 4, 1] = np.nan
    data[5, 5, 2] = np.inf
    _rewrite(path, data)
    err = _load_error(root)
    _names(err, "phantom_001", "dwi.nii.gz")
    assert "2 non-finite" in err.reason


def test_empty_brain_mask(root):
    _rewrite(root / "phantom_001" / "mask.nii.gz", np.zeros((32, 32, 4), np.uint8))
    err = _load_error(root)
    _names(err, "phantom_001", "mask.nii.gz")
    assert "empty" in err.reason


def test_empty_computed_brain_mask_names_ctp(root):
    (root / "phantom_001" / "mask.nii.gz").unlink()
    _rewrite(root / "phantom_001" / "ctp.nii.gz", np.full((32, 32, 4, 15), -1000, np.int16))
    err = _load_error(root)
    _names(err, "phantom_001", "ctp.nii.gz")
    assert "computed" in err.reason


def test_3d_ctp(root):
    path = root / "phantom_001" / "ctp.nii.gz"
    _rewrite(path, np.asarray(nib.load(path).dataobj)[..., 0])
    err = _load_error(root)
    _names(err, "phantom_001", "ctp.nii.gz")
    assert "4D" in err.reason


def test_3d_volume_expected_for_other_modalities(root):
    _rewrite(root / "phantom_001" / "dwi.nii.gz", np.zeros((32, 32, 4, 2), np.float32))
    _names(_load_error(root), "phantom_001", "dwi.nii.gz")


def test_unreadable_file(root):
    (root / "phantom_001" / "adc.nii.gz").write_bytes(b"not a nifti file")
    _names(_load_error(root), "phantom_001", "adc.nii.gz")


def test_volumes_not_sliced_axially(root):
    # The head stored as X, Z, Y (a valid NIfTI whose third axis runs anterior-posterior): coronal
    # slices would pass for axial ones.
    affine = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 4.0, 0, 0], [0, 0, 0, 1]])
    for name in ("ctp", "dwi", "adc", "mask", "lesion"):
        _rewrite(root / "phantom_001" / f"{name}.nii.gz", affine=affine)
    err = _load_error(root)
    _names(err, "phantom_001", "ctp.nii.gz")
    assert "runs A by the affine" in err.reason


def test_header_nibabel_rejects(root):
    # An unknown data type code: nibabel raises HeaderDataError, which escaped as a traceback.
    path = root / "phantom_001" / "dwi.nii.gz"
    img = nib.load(path)
    raw = bytearray(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header).to_bytes())
    raw[70:72] = np.int16(9999).tobytes()  # the datatype field
    plain = root / "phantom_001" / "dwi.nii"
    plain.write_bytes(bytes(raw))
    path.unlink()
    _names(_load_error(root), "phantom_001", "dwi.nii")


def test_wrong_frame_count_refused_or_resampled(root):
    path = root / "phantom_001" / "ctp.nii.gz"
    _rewrite(path, np.asarray(nib.load(path).dataobj)[..., :12])
    volumes = load_case(release_cases(root)[1])
    with pytest.raises(DataError) as info:
        preprocess_case(volumes, PreprocessOptions(frame_policy="refuse"))
    _names(info.value, "phantom_001", "ctp.nii.gz")
    assert "12 time frames" in info.value.reason
    with pytest.warns(UserWarning, match="phantom_001.*ctp.nii.gz: CTP has 12 time frames, resampled"):
        assert preprocess_case(volumes, PreprocessOptions(frame_policy="resample")).ctp.shape[1] == 15


def test_constant_dwi_inside_mask(root):
    _rewrite(root / "phantom_001" / "dwi.nii.gz", np.full((32, 32, 4), 7.0, np.float32))
    with pytest.raises(DataError) as info:
        preprocess_case(load_case(release_cases(root)[1]))
    _names(info.value, "phantom_001", "dwi.nii.gz")


def test_dataset_skip_bad_goes_on_with_other_cases(root, tmp_path):
    _rewrite(root / "phantom_001" / "mask.nii.gz", np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(DataError, match="phantom_001"):
        SliceDataset(release_cases(root), tmp_path / "cache", progress=False)
    dataset = SliceDataset(release_cases(root), tmp_path / "cache", skip_bad=True, progress=False)
    assert [e.case_id for e in dataset.entries] == ["phantom_000", "phantom_002"]
    assert len(dataset.errors) == 1
    _names(dataset.errors[0], "phantom_001", "mask.nii.gz")
