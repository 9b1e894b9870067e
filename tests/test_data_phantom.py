"""The phantom data set: a visible lesion, lesion-free cases, determinism, the CLI hook."""

import argparse
import filecmp
from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from ldmfast.data import find_cases, load_case, make_phantom_dataset
from ldmfast.data.cli import add_phantom_parser


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    folders = make_phantom_dataset(root, progress=False)  # the defaults: 8 cases of 64 x 64 x 8
    return root, folders


def test_layout_sizes_and_geometry(phantom):
    root, folders = phantom
    assert [f.name for f in folders] == [f"phantom_{i:03d}" for i in range(8)]
    cases = find_cases(root)
    ctp = nib.load(cases[0].ctp)
    assert ctp.shape == (64, 64, 8, 15)
    assert ctp.header.get_zooms() == (1.0, 1.0, 4.0, 3.0)
    np.testing.assert_array_equal(np.diag(ctp.affine), [1.0, 1.0, 4.0, 1.0])
    for name in ("dwi", "adc", "mask", "lesion"):
        img = nib.load(getattr(cases[0], name))
        assert img.shape == (64, 64, 8) and np.array_equal(img.affine, ctp.affine)


def test_lesion_is_visible_in_every_modality(phantom):
    root, _ = phantom
    lesion_cases = 0
    for case in find_cases(root):
        v = load_case(case)
        if not v.lesion.any():
            continue
        lesion_cases += 1
        normal = v.mask & ~v.lesion
        assert v.dwi[v.lesion].mean() > 1.3 * v.dwi[v.mask].mean()
        assert v.adc[v.lesion].mean() < 0.8 * v.adc[v.mask].mean()
        enhancement = v.ctp.max(axis=-1) - v.ctp[..., :2].mean(axis=-1)  # peak over baseline, HU
        assert enhancement[normal].mean() > 15  # tens of HU in normal tissue
        assert enhancement[v.lesion].mean() < 0.5 * enhancement[normal].mean()
        baseline = v.ctp[..., 0][v.mask].mean()
        assert 25 < baseline < 45
    assert lesion_cases == 6  # round(8 * 0.75)


def test_hypoperfusion_outside_the_core_leaves_diffusion_normal(phantom):
    """Tissue with delayed arrival but no lesion has normal DWI/ADC (the core alone is bright)."""
    root, _ = phantom
    for case in find_cases(root):
        v = load_case(case)
        if not v.lesion.any():
            continue
        peak_frame = np.argmax(v.ctp, axis=-1)
        normal_peak = np.median(peak_frame[v.mask & ~v.lesion])
        delayed = v.mask & ~v.lesion & (peak_frame >= normal_peak + 2)
        assert delayed.sum() > v.lesion.sum()  # a territory larger than the core
        ratio = v.dwi[delayed].mean() / v.dwi[v.mask & ~v.lesion & ~delayed].mean()
        assert 0.85 < ratio < 1.15


def test_lesion_free_cases_exist(phantom):
    root, _ = phantom
    free = [c.case_id for c in find_cases(root) if not load_case(c).lesion.any()]
    assert len(free) == 2


def test_same_seed_same_files(tmp_path):
    kwargs = dict(n_cases=2, shape=(32, 32, 4), n_frames=10, seed=4, progress=False)
    a = make_phantom_dataset(tmp_path / "a", **kwargs)
    b = make_phantom_dataset(tmp_path / "b", **kwargs)
    c = make_phantom_dataset(tmp_path / "c", **{**kwargs, "seed": 5})
    for fa, fb, fc in zip(a, b, c):
        for name in ("ctp", "dwi", "adc", "mask", "lesion"):
            assert filecmp.cmp(fa / f"{name}.nii.gz", fb / f"{name}.nii.gz", shallow=False)
        assert not filecmp.cmp(fa / "dwi.nii.gz", fc / "dwi.nii.gz", shallow=False)
    assert nib.load(a[0] / "ctp.nii.gz").shape == (32, 32, 4, 10)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="lesion_fraction"):
        make_phantom_dataset("unused", lesion_fraction=1.5)
    with pytest.raises(ValueError, match="shape"):
        make_phantom_dataset("unused", shape=(64, 64))
    with pytest.raises(ValueError, match="seed: must be >= 0"):
        make_phantom_dataset("unused", seed=-1)


def _parser():
    parser = argparse.ArgumentParser(prog="ldmfast")
    add_phantom_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_hook(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(
        ["phantom", str(tmp_path / "p"), "--cases", "3", "--shape", "32", "32", "4", "--frames", "9",
         "--seed", "2", "--lesion-fraction", "0.34", "--quiet"]
    )
    assert args.func(args) == 0
    cases = find_cases(tmp_path / "p")
    assert len(cases) == 3 and nib.load(cases[0].ctp).shape == (32, 32, 4, 9)
    assert sum(load_case(c).lesion.any() for c in cases) == 1

    bad = parser.parse_args(["phantom", str(tmp_path / "q"), "--cases", "0"])
    assert bad.func(bad) == 2
    assert "n_cases" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file", tmp_path / "file" / "below"):  # a file, and a folder under one
        bad = parser.parse_args(["phantom", str(where), "--cases", "1", "--quiet"])
        assert bad.func(bad) == 2
        assert "out_dir:" in capsys.readouterr().err

    interrupted = parser.parse_args(["phantom", str(tmp_path / "r"), "--cases", "2", "--quiet"])
    with mock.patch("ldmfast.data.cli.make_phantom_dataset", side_effect=KeyboardInterrupt):
        assert interrupted.func(interrupted) == 130  # one line, no traceback
    assert "ldmfast phantom: interrupted: " in capsys.readouterr().err

    with pytest.raises(SystemExit):
        parser.parse_args(["phantom", "--help"])
    help_text = capsys.readouterr().out
    assert "example" in help_text and "--lesion-fraction" in help_text
