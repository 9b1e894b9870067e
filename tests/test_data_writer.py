"""The output writer: values, affine and header preserved; atomic; rerun detection."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import ldmfast.data.writer as writer_module
from ldmfast.data import (
    PreprocessOptions,
    VolumeStats,
    assemble_volume,
    fit_to_size,
    load_case,
    output_paths,
    outputs_complete,
    preprocess_case,
    release_cases,
    save_nifti_atomic,
    write_synthesis,
)

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
# Fields that follow from the written data, not from the reference header.
DATA_FIELDS = {"dim", "datatype", "bitpix", "scl_slope", "scl_inter", "vox_offset"}


# header fields that describe the input's values, cleared in a synthesized image's (derived_header)
INPUT_VALUE_FIELDS = {"cal_min", "cal_max", "descrip", "aux_file", "intent_code", "intent_name", "intent_p1",
                      "intent_p2", "intent_p3"}


def _header_fields_equal(written, reference, skip=()):
    for key in reference.keys():
        if key in DATA_FIELDS or key in skip:
            continue
        a, b = np.asarray(reference[key]), np.asarray(written[key])
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), key


def test_real_nifti_round_trips_through_the_writer(tmp_path):
    """nibabel's big-endian int16 anatomical: the writer keeps affine, header and values."""
    source = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    data = np.asanyarray(source.dataobj)
    out = save_nifti_atomic(data, source.affine, source.header, tmp_path / "copy.nii.gz", dtype=None)
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, source.affine)
    assert back.header.endianness == source.header.endianness and back.get_data_dtype() == data.dtype
    _header_fields_equal(back.header, source.header)
    assert back.header["datatype"] == source.header["datatype"]
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    assert os.listdir(tmp_path) == ["copy.nii.gz"]

    two = nib.load(os.path.join(NIBABEL_DATA, "example_nifti2.nii.gz"))
    out = save_nifti_atomic(np.asanyarray(two.dataobj), two.affine, two.header, tmp_path / "two.nii")
    assert isinstance(nib.load(out), nib.Nifti2Image)


@pytest.fixture
def oblique_case(tmp_path):
    """A case built from nibabel's example4d.nii.gz (oblique affine, 2 frames, FSL header):
    CTP is the file itself, DWI and ADC its two frames with the same header."""
    source_path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    source = nib.load(source_path)
    frames = np.asanyarray(source.dataobj).astype(np.float32)
    case = tmp_path / "data" / "fmri"
    case.mkdir(parents=True)
    shutil.copy(source_path, case / "ctp.nii.gz")
    header3d = source.header.copy()
    header3d.set_data_shape(frames.shape[:3])
    for name, volume in (("dwi", frames[..., 0]), ("adc", frames[..., 1])):
        nib.save(nib.Nifti1Image(volume, source.affine, header3d), case / f"{name}.nii.gz")
    mask = (frames[..., 0] > np.percentile(frames[..., 0], 60)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, source.affine, header3d), case / "mask.nii.gz")
    return release_cases(tmp_path / "data")[0], source


def test_synthesis_written_on_the_inputs_grid_and_scale(oblique_case, tmp_path):
    case, source = oblique_case
    volumes = load_case(case)
    prepared = preprocess_case(volumes, PreprocessOptions(frame_policy="resample"), require_target=True)
    assert prepared.ctp.shape[1] == 15 and 0 < len(prepared.slice_index) <= 24

    out_dir = tmp_path / "out"
    assert not outputs_complete(out_dir, "fmri")
    # Hand the writer the targets as a model would: a torch tensor, cropped to a training size.
    cropped = torch.from_numpy(fit_to_size(prepared.target, (120, 96), fill=-1.0))
    paths = write_synthesis(out_dir, prepared, cropped)
    assert paths == output_paths(out_dir, "fmri") and outputs_complete(out_dir, "fmri")

    kept = np.zeros(volumes.spatial_shape, dtype=bool)
    kept[4:124, :, prepared.slice_index] = True  # rows cropped away are lost, as documented
    kept &= volumes.mask
    for name, original, stats in (("dwi", volumes.dwi, prepared.dwi_stats), ("adc", volumes.adc, prepared.adc_stats)):
        written = nib.load(paths[name])
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.shape == source.shape[:3] and written.get_data_dtype() == np.float32
        _header_fields_equal(written.header, source.header, skip={"pixdim", *INPUT_VALUE_FIELDS})
        np.testing.assert_array_equal(written.header["pixdim"][:4], source.header["pixdim"][:4])
        # the CTP's display window, description and intent are not the synthesized image's
        assert source.header["cal_max"] > 0 and source.header["descrip"]
        assert written.header["cal_min"] == written.header["cal_max"] == 0 and not written.header["descrip"]
        assert written.header["intent_code"] == 0 and not written.header["aux_file"]
        values = written.get_fdata()
        expected = np.clip(original, stats.low, stats.high)
        np.testing.assert_allclose(values[kept], expected[kept], rtol=1e-5, atol=1e-2)
        assert not values[~kept].any()  # outside the mask, the slices and the model's (cropped) plane


def test_synthesis_needs_stats_when_the_case_has_none(oblique_case, tmp_path):
    case, _ = oblique_case
    volumes = load_case(case)
    volumes.dwi = volumes.adc = None
    prepared = preprocess_case(volumes)
    slices = np.zeros((len(prepared.slice_index), 2, 128, 96), np.float32)
    with pytest.raises(ValueError, match="stats"):
        write_synthesis(tmp_path, prepared, slices)
    stats = {"dwi": VolumeStats(0.0, 100.0), "adc": VolumeStats(0.0, 3000.0)}
    paths = write_synthesis(tmp_path, prepared, slices, stats=stats)
    written = nib.load(paths["adc"]).get_fdata()
    # Model value 0 is the middle of the given range, inside the mask of synthesized slices.
    inside = volumes.mask.copy()
    inside[:, :, np.setdiff1d(np.arange(24), prepared.slice_index)] = False
    np.testing.assert_allclose(written[inside], 1500.0)
    with pytest.raises(ValueError, match="synthesized"):
        write_synthesis(tmp_path, prepared, slices[:, :1], stats=stats)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.nib, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_nifti_atomic(np.zeros((4, 4, 4)), np.eye(4), nib.Nifti1Header(), tmp_path / "case" / "dwi.nii.gz")
    assert os.listdir(tmp_path / "case") == []
    assert not outputs_complete(tmp_path, "case")


def test_outputs_complete_needs_every_readable_file(tmp_path):
    paths = output_paths(tmp_path, "c1")
    save_nifti_atomic(np.zeros((4, 4, 4)), np.eye(4), nib.Nifti1Header(), paths["dwi"])
    assert not outputs_complete(tmp_path, "c1")
    paths["adc"].write_bytes(b"garbage")
    assert not outputs_complete(tmp_path, "c1")
    save_nifti_atomic(np.zeros((4, 4, 4)), np.eye(4), nib.Nifti1Header(), paths["adc"])
    assert outputs_complete(tmp_path, "c1")


def test_assemble_and_fit_are_inverse():
    rng = np.random.default_rng(1)
    slices = rng.random((3, 10, 7)).astype(np.float32)
    volume = assemble_volume(slices, np.array([0, 2, 5]), (10, 7, 6), fill=-5)
    np.testing.assert_array_equal(volume[:, :, [0, 2, 5]], np.moveaxis(slices, 0, -1))
    assert (volume[:, :, [1, 3, 4]] == -5).all()
    for size in ((8, 9), (13, 7), (11, 4)):
        there = fit_to_size(slices, size, fill=0)
        back = fit_to_size(there, (10, 7), fill=0)
        h, w = min(size[0], 10), min(size[1], 7)
        r, c = (10 - h) // 2, (7 - w) // 2
        np.testing.assert_array_equal(back[:, r : r + h, c : c + w], slices[:, r : r + h, c : c + w])
    with pytest.raises(ValueError, match="slices"):
        assemble_volume(slices, np.array([0, 1]), (10, 7, 6))
