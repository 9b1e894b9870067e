"""Listing cases in the three layouts, and clear errors for missing files."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from ldmfast.data import (
    TRAINING_MODALITIES,
    DataError,
    detect_layout,
    find_cases,
    isles24_cases,
    load_case,
    make_phantom_dataset,
    manifest_cases,
    release_cases,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_cases=3, shape=(32, 32, 4), seed=3, lesion_fraction=0.7, progress=False)
    return root


@pytest.fixture
def release_root(phantom, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(phantom, root)
    return root


def test_release_layout_lists_every_case_and_file(release_root):
    cases = find_cases(release_root)
    assert detect_layout(release_root) == "release"
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_001", "phantom_002"]
    for case in cases:
        assert set(case.files()) == {"ctp", "mask", "dwi", "adc", "lesion"}
        assert case.ctp == release_root / case.case_id / "ctp.nii.gz"
    assert cases.errors == []


def test_release_layout_accepts_uncompressed_nifti(release_root):
    case_dir = release_root / "phantom_001"
    nib.save(nib.load(case_dir / "dwi.nii.gz"), case_dir / "dwi.nii")
    (case_dir / "dwi.nii.gz").unlink()
    case = release_cases(release_root)[1]
    assert case.dwi == case_dir / "dwi.nii"
    assert load_case(case).dwi.shape == (32, 32, 4)


def test_release_layout_refuses_two_versions_of_a_file(release_root):
    case_dir = release_root / "phantom_000"
    nib.save(nib.load(case_dir / "adc.nii.gz"), case_dir / "adc.nii")
    with pytest.raises(DataError, match="phantom_000.*adc.nii"):
        release_cases(release_root)


def test_only_ctp_is_required_unless_asked(release_root):
    for name in ("dwi", "adc", "lesion", "mask"):
        (release_root / "phantom_002" / f"{name}.nii.gz").unlink()
    case = release_cases(release_root)[2]
    assert case.files() == {"ctp": release_root / "phantom_002" / "ctp.nii.gz"}
    volumes = load_case(case)
    assert volumes.mask_computed and volumes.mask.any() and volumes.dwi is None


@pytest.mark.parametrize("modality", ["ctp", "dwi", "adc"])
def test_missing_modality_names_case_and_file(release_root, modality):
    (release_root / "phantom_001" / f"{modality}.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        release_cases(release_root, require=TRAINING_MODALITIES)
    assert info.value.case == "phantom_001"
    assert info.value.path == str(release_root / "phantom_001" / f"{modality}.nii.gz")
    assert "phantom_001" in str(info.value) and f"{modality}.nii.gz" in str(info.value)


def test_skip_bad_keeps_the_other_cases(release_root):
    (release_root / "phantom_001" / "dwi.nii.gz").unlink()
    cases = release_cases(release_root, require=["dwi"], skip_bad=True)
    assert [c.case_id for c in cases] == ["phantom_000", "phantom_002"]
    assert len(cases.errors) == 1 and cases.errors[0].case == "phantom_001"


def test_unknown_required_modality_is_an_argument_error(release_root):
    with pytest.raises(ValueError, match="require"):
        release_cases(release_root, require=["flair"])


def _isles_tree(phantom, root, acute="ses-01", followup="ses-02"):
    """The phantom rewritten as ISLES'24 derivatives, without brain masks."""
    for i, case_dir in enumerate(sorted(phantom.iterdir()), start=1):
        sub = f"sub-stroke{i:04d}"
        files = {
            acute: {"ctp": f"{sub}_{acute}_space-ncct_ctp.nii.gz"},
            followup: {
                "dwi": f"{sub}_{followup}_space-ncct_dwi.nii.gz",
                "adc": f"{sub}_{followup}_space-ncct_adc.nii.gz",
                "lesion": f"{sub}_{followup}_space-ncct_lesion-msk.nii.gz",
            },
        }
        for session, names in files.items():
            folder = root / "derivatives" / sub / session
            folder.mkdir(parents=True)
            for modality, name in names.items():
                shutil.copy(case_dir / f"{modality}.nii.gz", folder / name)
        # Perfusion maps live in a sub-folder and must not be taken for CTP.
        (root / "derivatives" / sub / acute / "perfusion-maps").mkdir()
    return root


@pytest.mark.parametrize("acute,followup", [("ses-01", "ses-02"), ("ses-0001", "ses-0002")])
def test_isles24_layout_with_computed_brain_mask(phantom, tmp_path, acute, followup):
    root = _isles_tree(phantom, tmp_path / "isles", acute, followup)
    assert detect_layout(root) == "isles24"
    cases = find_cases(root, require=TRAINING_MODALITIES)
    assert [c.case_id for c in cases] == ["sub-stroke0001", "sub-stroke0002", "sub-stroke0003"]
    case = cases[0]
    assert case.mask is None and case.ctp.name == "sub-stroke0001_" + acute + "_space-ncct_ctp.nii.gz"
    assert case.lesion.name.endswith("lesion-msk.nii.gz")
    # The derivatives folder itself is accepted too.
    assert isles24_cases(root / "derivatives")[0] == case

    volumes = load_case(case)
    truth = nib.load(phantom / "phantom_000" / "mask.nii.gz").get_fdata() > 0
    dice = 2 * np.sum(volumes.mask & truth) / (volumes.mask.sum() + truth.sum())
    assert volumes.mask_computed and dice > 0.95


def test_isles24_missing_followup_names_case(phantom, tmp_path):
    root = _isles_tree(phantom, tmp_path / "isles")
    shutil.rmtree(root / "derivatives" / "sub-stroke0002" / "ses-02")
    with pytest.raises(DataError, match="sub-stroke0002.*ses-02.*dwi"):
        isles24_cases(root, require=TRAINING_MODALITIES)
    cases = isles24_cases(root)  # synthesis needs only CTP
    assert len(cases) == 3 and cases[1].dwi is None


def test_manifest_layout(phantom, tmp_path):
    manifest = tmp_path / "cases.csv"
    a, b = phantom / "phantom_000", phantom / "phantom_001"
    rows = [
        "case_id,ctp,dwi,adc,lesion",
        f"first,{a}/ctp.nii.gz,{a}/dwi.nii.gz,{a}/adc.nii.gz,",
        f"second,{b}/ctp.nii.gz,{b}/dwi.nii.gz,{b}/adc.nii.gz,{b}/lesion.nii.gz",
    ]
    manifest.write_text("\n".join(rows) + "\n")
    assert detect_layout(manifest) == "manifest"
    cases = find_cases(manifest, require=TRAINING_MODALITIES)
    assert [c.case_id for c in cases] == ["first", "second"]
    assert cases[0].lesion is None and cases[0].mask is None
    assert cases[1].lesion == b / "lesion.nii.gz"

    # Relative paths are relative to the manifest's folder.
    local = tmp_path / "local"
    shutil.copytree(a, local / "a")
    (local / "m.csv").write_text("case_id,ctp,mask\nrel,a/ctp.nii.gz,a/mask.nii.gz\n")
    case = manifest_cases(local / "m.csv")[0]
    assert case.ctp == local / "a" / "ctp.nii.gz" and case.mask == local / "a" / "mask.nii.gz"
    # Spreadsheets' "CSV UTF-8" starts the file with a byte-order mark: not part of the first column's name.
    (local / "m.csv").write_bytes("case_id,ctp\nrel,a/ctp.nii.gz\n".encode("utf-8-sig"))
    assert [c.case_id for c in manifest_cases(local / "m.csv")] == ["rel"]


def test_manifest_errors_name_case_and_file(phantom, tmp_path):
    a = phantom / "phantom_000"
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,ctp,dwi\nok,{a}/ctp.nii.gz,{a}/dwi.nii.gz\nbad,{a}/ctp.nii.gz,{a}/nothere.nii.gz\n")
    with pytest.raises(DataError, match="'bad'.*nothere.nii.gz"):
        manifest_cases(manifest)
    cases = manifest_cases(manifest, skip_bad=True)
    assert [c.case_id for c in cases] == ["ok"] and cases.errors[0].case == "bad"

    manifest.write_text(f"case_id,ctp,dwi\nok,{a}/ctp.nii.gz,{a}/dwi.nii.gz\nbad,{a}/ctp.nii.gz,{a}/dwi.nii.gz,\n")
    with pytest.raises(DataError, match="line 3: 4 cells, but the header has 3 columns"):
        manifest_cases(manifest)  # a trailing comma: an AttributeError before
    assert [c.case_id for c in manifest_cases(manifest, skip_bad=True)] == ["ok"]
    manifest.write_text(f"case_id,ctp,dwi,dwi\nx,{a}/ctp.nii.gz,{a}/dwi.nii.gz,\n")
    with pytest.raises(DataError, match="dwi more than once"):
        manifest_cases(manifest)  # the last dwi column silently won
    manifest.write_text(f"case_id,ctp,flair\nx,{a}/ctp.nii.gz,\n")
    with pytest.raises(DataError, match="flair"):
        manifest_cases(manifest)
    manifest.write_text(f"case_id,ctp\nx,{a}/ctp.nii.gz\nx,{a}/ctp.nii.gz\n")
    with pytest.raises(DataError, match="unique"):
        manifest_cases(manifest)
