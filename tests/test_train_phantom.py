"""The phantom set a training run generates in its folder (`data.phantom`): reused only when a
generation of the same settings finished there."""
import os

import nibabel as nib

from ldmfast.data import find_cases
from ldmfast.train.data import PHANTOM_RECORD, PhantomSource, ensure_phantom


def test_same_settings_reuse_the_files(tmp_path):
    source = PhantomSource(cases=3, shape=(16, 16, 2))
    ensure_phantom(source, tmp_path / "phantom")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "phantom").rglob("*.nii.gz")}
    ensure_phantom(source, tmp_path / "phantom")  # untouched: the slice cache keys on mtimes
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "phantom").rglob("*.nii.gz")} == before


def test_other_settings_regenerate(tmp_path):
    root = tmp_path / "phantom"
    ensure_phantom(PhantomSource(cases=4, shape=(16, 16, 2)), root)
    ensure_phantom(PhantomSource(cases=3, shape=(16, 16, 2)), root)  # fewer cases: the fourth goes
    assert [c.case_id for c in find_cases(root)] == ["phantom_000", "phantom_001", "phantom_002"]
    ensure_phantom(PhantomSource(cases=3, shape=(20, 16, 3), seed=1), root)
    assert nib.load(find_cases(root)[0].dwi).shape == (20, 16, 3)


def test_an_interrupted_generation_is_redone(tmp_path):
    root = tmp_path / "phantom"
    source = PhantomSource(cases=3, shape=(16, 16, 2))
    ensure_phantom(source, root)
    # A generation killed in its last case: the record (written last) is missing, a file too.
    os.remove(root / PHANTOM_RECORD)
    os.remove(root / "phantom_002" / "lesion.nii.gz")
    ensure_phantom(source, root)
    assert (root / "phantom_002" / "lesion.nii.gz").exists() and (root / PHANTOM_RECORD).exists()


def test_a_complete_set_of_an_earlier_version_is_adopted(tmp_path):
    # Run folders of the version before the record: their complete set is kept (regenerating it
    # would change its mtimes and rebuild the slice cache); an incomplete one is regenerated.
    root = tmp_path / "phantom"
    source = PhantomSource(cases=3, shape=(16, 16, 2))
    ensure_phantom(source, root)
    os.remove(root / PHANTOM_RECORD)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    ensure_phantom(source, root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == before
    assert (root / PHANTOM_RECORD).exists()
    os.remove(root / PHANTOM_RECORD)
    ensure_phantom(PhantomSource(cases=3, shape=(20, 16, 2)), root)  # another shape: regenerated
    assert nib.load(find_cases(root)[0].dwi).shape == (20, 16, 2)
