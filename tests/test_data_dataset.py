"""The slice dataset: cache reuse and invalidation, sample layout, DataLoader workers."""

import dataclasses
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import ldmfast.data.cache as cache_module
from ldmfast.data import (
    AugmentConfig,
    PreprocessOptions,
    SliceDataset,
    TRAINING_MODALITIES,
    find_cases,
    load_case,
    make_phantom_dataset,
    preprocess_case,
)

SHAPE = (32, 40, 4)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    make_phantom_dataset(root, n_cases=4, shape=SHAPE, seed=7, progress=False)
    return root


@pytest.fixture
def root(phantom, tmp_path):
    shutil.copytree(phantom, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def count_loads(monkeypatch):
    """Counts the cases the cache reads from NIfTI."""
    loaded = []

    def counting_load_case(case):
        loaded.append(case.case_id)
        return load_case(case)

    monkeypatch.setattr(cache_module, "load_case", counting_load_case)
    return loaded


def _cases(root):
    return find_cases(root, require=TRAINING_MODALITIES)


def test_second_construction_reuses_the_cache(root, tmp_path, count_loads):
    first = SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    assert (first.n_built, first.n_reused) == (4, 0) and len(count_loads) == 4
    listing = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(listing) == 4 and not any(name.startswith(".") for name in listing)  # no temporary left

    count_loads.clear()
    second = SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    assert (second.n_built, second.n_reused) == (0, 4) and count_loads == []
    assert len(second) == len(first) == 4 * SHAPE[2]
    for i in (0, 5, len(second) - 1):
        a, b = first[i], second[i]
        assert all(torch.equal(a[k], b[k]) for k in ("ctp", "target", "mask", "lesion"))


def test_changed_input_or_options_rebuild(root, tmp_path, count_loads):
    SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    count_loads.clear()
    dwi = root / "phantom_002" / "dwi.nii.gz"
    st = os.stat(dwi)
    os.utime(dwi, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    dataset = SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    assert count_loads == ["phantom_002"] and (dataset.n_built, dataset.n_reused) == (1, 3)
    # The stale folder of the changed case is gone; the others are kept.
    assert len(list((tmp_path / "cache").iterdir())) == 4

    count_loads.clear()
    SliceDataset(_cases(root), tmp_path / "cache", options=PreprocessOptions(percentiles=(1.0, 99.0)), progress=False)
    assert len(count_loads) == 4


def test_ids_sharing_a_folder_stem_keep_their_own_caches(root, tmp_path):
    # "case 1" and "case_1" (or "Müller" and "Möller") both become the stem "case_1": building
    # one must not delete the other's folder as a stale version of itself.
    (root / "phantom_000").rename(root / "case 1")
    (root / "phantom_001").rename(root / "case_1")
    cases = [c for c in _cases(root) if c.case_id.startswith("case")]
    for case in cases:  # one at a time, as a training set and a validation set are built
        SliceDataset([case], tmp_path / "cache", progress=False)
    dataset = SliceDataset(cases, tmp_path / "cache", progress=False)
    assert (dataset.n_built, dataset.n_reused) == (0, 2)
    assert {dataset[i]["case_id"] for i in range(len(dataset))} == {"case 1", "case_1"}


def test_samples_match_preprocessing(root, tmp_path):
    cases = _cases(root)
    dataset = SliceDataset(cases, tmp_path / "cache", progress=False)
    prepared = preprocess_case(load_case(cases[1]), require_target=True)
    start = dataset.entries[0].n_slices
    assert dataset.stats("phantom_001") == (prepared.dwi_stats, prepared.adc_stats)
    for local, z in enumerate(prepared.slice_index):
        sample = dataset[start + local]
        assert sample["case_id"] == "phantom_001" and sample["slice_index"] == z
        assert sample["ctp"].shape == (15, 32, 40) and sample["ctp"].dtype == torch.float32
        assert sample["target"].shape == (2, 32, 40) and sample["target"].dtype == torch.float32
        assert sample["mask"].shape == sample["lesion"].shape == (1, 32, 40)
        np.testing.assert_array_equal(sample["ctp"].numpy(), prepared.ctp[local])
        np.testing.assert_array_equal(sample["target"].numpy(), prepared.target[local])
        np.testing.assert_array_equal(sample["mask"][0].numpy(), prepared.mask[local])
        np.testing.assert_array_equal(sample["lesion"][0].numpy(), prepared.lesion[local])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_crop_and_pad_to_size(root, tmp_path):
    dataset = SliceDataset(_cases(root), tmp_path / "cache", size=(24, 48), progress=False)
    full = SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    sample, whole = dataset[3], full[3]
    assert sample["ctp"].shape == (15, 24, 48) and sample["mask"].shape == (1, 24, 48)
    # Rows are centre-cropped (32 -> 24), columns centre-padded (40 -> 48) with background.
    assert torch.equal(sample["ctp"][:, :, 4:44], whole["ctp"][:, 4:28, :])
    assert (sample["ctp"][:, :, :4] == -1).all() and (sample["mask"][:, :, :4] == 0).all()


def test_dataloader_with_two_workers(root, tmp_path):
    dataset = SliceDataset(_cases(root), tmp_path / "cache", augment=AugmentConfig(), size=(32, 40), progress=False)
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["ctp"].shape[1:] == (15, 32, 40) and batch["target"].shape[1:] == (2, 32, 40)
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        seen += list(zip(batch["case_id"], batch["slice_index"].tolist()))
    assert len(seen) == len(set(seen)) == len(dataset)

    def epoch(seed):
        torch.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=len(dataset), num_workers=2)
        return next(iter(loader))["target"]

    # Seeded per worker from torch's seed: reproducible, and different under another seed.
    assert torch.equal(epoch(1), epoch(1)) and not torch.equal(epoch(1), epoch(2))


def test_a_crop_that_cuts_brain_is_reported(root, tmp_path):
    # The phantom's 32 x 40 slices cropped to 16 x 40: most of the brain is cut away, which a
    # training on finer-than-1-mm data would otherwise do without a word.
    with pytest.warns(UserWarning, match=r"crop to 16 x 40 cuts away brain in 4 of 4 cases"):
        SliceDataset(_cases(root), tmp_path / "cache", size=(16, 40), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SliceDataset(_cases(root), tmp_path / "cache", size=(32, 48), progress=False)  # padding only
    entry = SliceDataset(_cases(root), tmp_path / "cache", progress=False).entries[0]
    lost, total = entry.brain_cut_by((16, 40))
    mask = np.load(entry.array_path("mask")).astype(bool)
    assert total == mask.sum() and lost == total - mask[:, 8:24, :].sum()


def test_cases_with_computed_masks_are_rebuilt_when_the_mask_algorithm_changes(root, monkeypatch):
    with_mask, = [c for c in _cases(root) if c.case_id == "phantom_000"]
    computed = dataclasses.replace(with_mask, mask=None)
    before = [cache_module.case_key(c, PreprocessOptions()) for c in (with_mask, computed)]
    monkeypatch.setattr(cache_module, "BRAIN_MASK_VERSION", cache_module.BRAIN_MASK_VERSION + 1)
    after = [cache_module.case_key(c, PreprocessOptions()) for c in (with_mask, computed)]
    assert before[0] == after[0] and before[1] != after[1]


def test_folders_of_an_earlier_version_get_their_brain_counts(root, tmp_path):
    # meta.json of folders built before the counts existed: counted from mask.npy, written back.
    SliceDataset(_cases(root), tmp_path / "cache", progress=False)
    for meta_path in (tmp_path / "cache").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["brain_rows"], meta["brain_cols"]
        meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="cuts away brain in 4 of 4 cases"):
        dataset = SliceDataset(_cases(root), tmp_path / "cache", size=(16, 40), progress=False)
    assert dataset.n_reused == 4
    assert all("brain_rows" in json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json"))
