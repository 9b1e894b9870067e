"""Preprocessing against an independent numpy computation written here, slice by slice."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from ldmfast.data import (
    PreprocessOptions,
    compute_brain_mask,
    denormalize_mri,
    find_cases,
    load_case,
    make_phantom_dataset,
    preprocess_case,
    resample_frames,
)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_cases=1, shape=(32, 40, 6), seed=11, lesion_fraction=1.0, progress=False)
    case_dir = root / "phantom_000"
    # Make slice 0 unusable (DWI all zero there) and add negatives the DWI rule must zero.
    dwi = nib.load(case_dir / "dwi.nii.gz")
    data = dwi.get_fdata(dtype=np.float32)
    data[:, :, 0] = 0
    data[::7, ::5, 3] = -50
    nib.save(nib.Nifti1Image(data, dwi.affine, dwi.header), case_dir / "dwi.nii.gz")
    return load_case(find_cases(root)[0])


def _expected_ctp_slice(ctp_hu, mask):
    """PAPER.md: clip to [0, 200] HU, scale to [0, 1], multiply by the mask, map to [-1, 1]."""
    out = np.empty((ctp_hu.shape[-1],) + mask.shape, dtype=np.float64)
    for t in range(ctp_hu.shape[-1]):
        frame = np.minimum(np.maximum(ctp_hu[..., t].astype(np.float64), 0.0), 200.0) / 200.0
        out[t] = np.where(mask, frame, 0.0) * 2.0 - 1.0
    return out


def _expected_mri(volume, mask):
    """PAPER.md: negatives to 0, clip to the 0.5/99.5 in-mask percentiles, [0, 1], mask, [-1, 1]."""
    v = np.where(volume < 0, 0.0, volume.astype(np.float64))
    inside = np.sort(v[mask])
    # Percentile by linear interpolation between order statistics, written out by hand.
    def pct(q):
        pos = q / 100 * (inside.size - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, inside.size - 1)
        return inside[lo] + (inside[hi] - inside[lo]) * (pos - lo)

    low, high = pct(0.5), pct(99.5)
    unit = (np.minimum(np.maximum(v, low), high) - low) / (high - low)
    return np.where(mask, unit, 0.0) * 2.0 - 1.0, low, high


def test_matches_independent_computation(volumes):
    prepared = preprocess_case(volumes, require_target=True)
    mask = volumes.mask
    dwi, dwi_low, dwi_high = _expected_mri(volumes.dwi, mask)
    adc, adc_low, adc_high = _expected_mri(volumes.adc, mask)
    assert prepared.dwi_stats.low == pytest.approx(dwi_low, rel=1e-5)
    assert prepared.dwi_stats.high == pytest.approx(dwi_high, rel=1e-5)
    assert prepared.adc_stats.low == pytest.approx(adc_low, rel=1e-5)
    assert prepared.adc_stats.high == pytest.approx(adc_high, rel=1e-5)

    # Slice z is used iff DWI, ADC and CTP are each non-zero ([0, 1] scale) inside the mask.
    expected_slices = [
        z
        for z in range(mask.shape[2])
        if all(np.any((vol[:, :, z] > -1) & mask[:, :, z]) for vol in (dwi, adc))
        and np.any(_expected_ctp_slice(volumes.ctp[:, :, z], mask[:, :, z]) > -1)
    ]
    assert 0 not in expected_slices and len(expected_slices) == mask.shape[2] - 1
    assert prepared.slice_index.tolist() == expected_slices

    for i, z in enumerate(expected_slices):
        np.testing.assert_allclose(prepared.ctp[i], _expected_ctp_slice(volumes.ctp[:, :, z], mask[:, :, z]), atol=1e-6)
        np.testing.assert_allclose(prepared.target[i, 0], dwi[:, :, z], atol=1e-5)
        np.testing.assert_allclose(prepared.target[i, 1], adc[:, :, z], atol=1e-5)
        np.testing.assert_array_equal(prepared.mask[i], mask[:, :, z])
        np.testing.assert_array_equal(prepared.lesion[i], volumes.lesion[:, :, z])
    for array in (prepared.ctp, prepared.target):
        assert array.dtype == np.float32 and array.min() >= -1 and array.max() <= 1


def test_stats_map_back_to_the_original_scale(volumes):
    prepared = preprocess_case(volumes, require_target=True)
    for channel, (volume, stats) in enumerate(((volumes.dwi, prepared.dwi_stats), (volumes.adc, prepared.adc_stats))):
        back = denormalize_mri(prepared.target[:, channel], stats)
        original = np.moveaxis(volume[:, :, prepared.slice_index], -1, 0)
        clipped = np.clip(np.maximum(original, 0), stats.low, stats.high)
        np.testing.assert_allclose(back[prepared.mask], clipped[prepared.mask], rtol=1e-5, atol=1e-3)


def test_frames_resampled_by_linear_interpolation():
    rng = np.random.default_rng(0)
    ctp = rng.normal(40, 20, (3, 4, 2, 9)).astype(np.float32)
    out = resample_frames(ctp, 15)
    assert out.shape == (3, 4, 2, 15)
    old_times, new_times = np.linspace(0, 1, 9), np.linspace(0, 1, 15)
    for idx in np.ndindex(ctp.shape[:3]):
        np.testing.assert_allclose(out[idx], np.interp(new_times, old_times, ctp[idx]), rtol=1e-5, atol=1e-4)
    assert resample_frames(ctp, 9) is ctp


def test_synthesis_only_case_uses_ctp_for_slice_selection(volumes):
    ctp_only = dataclasses.replace(volumes, dwi=None, adc=None, lesion=None)
    prepared = preprocess_case(ctp_only)
    assert prepared.target is None and prepared.dwi_stats is None and not prepared.has_lesion
    assert prepared.slice_index.tolist() == list(range(volumes.mask.shape[2]))
    assert not prepared.lesion.any()


def test_options_are_validated():
    with pytest.raises(ValueError, match="frame_policy"):
        PreprocessOptions(frame_policy="guess")
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessOptions(percentiles=(99.0, 1.0))


def test_computed_brain_mask_ignores_padding_outside_the_field_of_view(volumes):
    """Zero padding (0 HU, inside the tissue range) larger than the brain touches the border
    and must not be taken for it."""
    pad = ((40, 40), (40, 40), (0, 0))
    ctp = np.pad(volumes.ctp, pad + ((0, 0),), constant_values=0.0)
    ctp[40:-40, 40:-40] = volumes.ctp
    truth = np.pad(volumes.mask, pad)
    assert (ctp == 0).sum() / ctp.shape[-1] > truth.sum()
    mask = compute_brain_mask(ctp)
    assert 2 * np.sum(mask & truth) / (mask.sum() + truth.sum()) > 0.95


def test_computed_brain_mask_of_a_skull_stripped_ctp(volumes):
    """Skull-stripped CTP with the background filled with 0 HU (inside the tissue range): the
    mask is the brain, not the whole field of view."""
    ctp = np.where(volumes.mask[..., None], volumes.ctp, 0.0).astype(volumes.ctp.dtype)
    mask = compute_brain_mask(ctp)
    truth = volumes.mask
    assert 2 * np.sum(mask & truth) / (mask.sum() + truth.sum()) > 0.95
