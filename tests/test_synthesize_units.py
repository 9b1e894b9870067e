"""The pieces of ldmfast.synthesis in-process: seeds, the slice queue, case preparation, writing."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldmfast.data import DataError, find_cases, load_case, mri_to_unit, preprocess_case
from ldmfast.synthesis import (CaseJob, SliceBatcher, SynthesisConfig, case_complete, load_synthesis_config,
                               prepare_case, sample_paths, scatter, slice_seed, write_case)
from ldmfast.synthesis.runner import generate_options
from ldmfast.train.config import ConfigError
from synthesize_helpers import make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synth-units") / "data", 2, int(np.random.SeedSequence().entropy % 1000))


def test_slice_seeds_are_distinct_and_do_not_depend_on_the_interpreter():
    keys = [(seed, case, s, k) for seed in (0, 1) for case in ("a", "b", "a1") for s in range(12) for k in range(3)]
    seeds = [slice_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)
    # Python's str hash is salted per process; the seeds must not be. A fresh interpreter with
    # another salt, importing only the seeds module, agrees.
    path = Path(__file__).resolve().parents[1] / "ldmfast" / "synthesis" / "seeds.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('seeds', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.slice_seed(1, 'b', 7, 2))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(out.stdout) == slice_seed(1, "b", 7, 2)
    with pytest.raises(ValueError, match="sample"):
        slice_seed(0, "a", 0, -1)


def _fake_model(ctp: np.ndarray, seeds) -> np.ndarray:
    """A per-slice function of (ctp, seed), standing in for generate: N x 2 x H x W."""
    shift = np.array([(s % 1000) / 1000 for s in seeds], dtype=np.float64)[:, None, None]
    return np.stack([ctp.mean(axis=1) + shift, ctp.max(axis=1) - shift], axis=1).astype(np.float32)


def test_slice_queue_batches_across_cases_and_reassembles_each_case():
    rng = np.random.default_rng()
    batch_size = int(rng.integers(2, 7))
    shapes = [(8, 12), (8, 12), (4, 4), (8, 12), (4, 4)]
    jobs = []
    for i, shape in enumerate(shapes):
        slices, samples = int(rng.integers(1, 9)), int(rng.integers(1, 3))
        ctp = rng.standard_normal((slices, 3, *shape)).astype(np.float32)
        seeds = rng.integers(0, 2**40, size=(samples, slices))
        jobs.append(CaseJob(f"case{i}", ctp, seeds))
    batcher = SliceBatcher(batch_size)
    batches = [b for job in jobs for b in batcher.add(job)] + batcher.flush()
    assert batcher.queued == 0
    finished = []
    seen = []
    for batch in batches:
        assert batch.ctp.shape[0] == batch_size == len(batch.seeds)
        assert 1 <= batch.real <= batch_size
        assert len({job.ctp.shape[-2:] for job, _, _ in batch.entries}) == 1
        for row, (job, k, s) in enumerate(batch.entries):
            np.testing.assert_array_equal(batch.ctp[row], job.ctp[s])
            assert batch.seeds[row] == job.seeds[k, s]
        for row in range(batch.real, batch_size):  # padding repeats the last real entry
            np.testing.assert_array_equal(batch.ctp[row], batch.ctp[batch.real - 1])
        seen += [(job.case_id, k, s) for job, k, s in batch.entries]
        finished += scatter(batch, _fake_model(batch.ctp, batch.seeds))
    expected = [(job.case_id, k, s) for job in jobs for k in range(job.seeds.shape[0]) for s in range(len(job.ctp))]
    assert sorted(seen) == sorted(expected)  # every slice of every sample exactly once
    assert sorted(j.case_id for j in finished) == sorted(j.case_id for j in jobs)
    for job in jobs:
        for k in range(job.seeds.shape[0]):
            np.testing.assert_array_equal(job.images[k], _fake_model(job.ctp, job.seeds[k]))


def test_a_dropped_case_leaves_the_queue():
    batcher = SliceBatcher(4)
    gone = CaseJob("gone", np.ones((2, 2, 4, 4), np.float32), np.arange(2)[None])
    keep = CaseJob("keep", np.zeros((1, 2, 4, 4), np.float32), np.arange(1)[None])
    assert batcher.add(gone) == [] and batcher.add(keep) == []
    batcher.drop(gone)
    (last,) = batcher.flush()
    assert [(job.case_id, k, s) for job, k, s in last.entries] == [("keep", 0, 0)]
    assert (last.ctp == 0).all()  # the padding repeats keep's slice, not gone's
    with pytest.raises(ValueError, match="batch_size"):
        SliceBatcher(0)


def test_prepare_case_chooses_the_scale_and_fits_the_size(data):
    case = find_cases(data)[0]
    volumes = load_case(case)
    own = {name: mri_to_unit(getattr(volumes, name), volumes.mask)[1] for name in ("dwi", "adc")}
    volumes.dwi = volumes.adc = None
    ctp_slices = preprocess_case(volumes)

    prepared = prepare_case(case, frames=15, multiple=8)
    assert prepared.scale == "case" and prepared.stats == own
    np.testing.assert_array_equal(prepared.ctp, ctp_slices.ctp)
    np.testing.assert_array_equal(prepared.prepared.slice_index, ctp_slices.slice_index)

    assert prepare_case(case, frames=15, multiple=8, scale="unit").scale == "unit"
    ctp_only = type(case)(case_id=case.case_id, ctp=case.ctp)
    model_stats = prepare_case(ctp_only, frames=15, multiple=8, reference_stats={"dwi": (1.0, 5.0), "adc": (2.0, 9.0)})
    assert model_stats.scale == "model" and (model_stats.stats["adc"].low, model_stats.stats["adc"].high) == (2.0, 9.0)
    with pytest.raises(DataError, match="needs the case's DWI and ADC"):
        prepare_case(ctp_only, frames=15, multiple=8, scale="case")

    fitted = prepare_case(case, frames=15, multiple=8, size=(40, 24))
    assert fitted.ctp.shape[-2:] == (40, 24)
    np.testing.assert_array_equal(fitted.ctp[..., 4:36, :], ctp_slices.ctp[..., :, 4:28])
    assert (fitted.ctp[..., :4, :] == -1).all()
    with pytest.raises(DataError, match="not divisible by 64"):
        prepare_case(case, frames=15, multiple=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said in the run's log (add_case), not as a warning mid-bar
        resampled = prepare_case(case, frames=7, multiple=8)
    assert resampled.ctp.shape[1] == 7 and resampled.prepared.source_frames == 15  # frames resampled
    with pytest.raises(DataError, match="path separator"):
        prepare_case(type(case)(case_id="../escape", ctp=case.ctp), frames=15, multiple=8)


def test_write_case_maps_back_to_the_volume_and_marks_the_case_finished(data, tmp_path):
    case = find_cases(data)[1]
    prepared = prepare_case(case, frames=15, multiple=8, size=(24, 40))
    rng = np.random.default_rng()
    samples, slices = 2, len(prepared.prepared.slice_index)
    images = rng.uniform(-1.2, 1.2, (samples, slices, 2, 24, 40)).astype(np.float32)
    assert not case_complete(tmp_path, case.case_id, samples)
    stale = tmp_path / case.case_id / ".tmp-999-deadbeef-dwi.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    write_case(tmp_path, prepared, images, {"steps": 3})
    assert not stale.exists()
    assert case_complete(tmp_path, case.case_id, samples) and not case_complete(tmp_path, case.case_id, samples + 1)
    ctp_img = nib.load(case.ctp)
    x, y, z = prepared.prepared.spatial_shape
    for k in range(samples):
        for c, name in enumerate(("dwi", "adc")):
            low, high = prepared.stats[name].low, prepared.stats[name].high
            full = np.full((slices, x, y), np.nan)  # 24 x 40 back to 32 x 32: crop W, pad H
            full[:, 4:28, :] = images[k, :, c, :, 4:36]
            values = (np.clip(full, -1, 1) + 1) / 2 * (high - low) + low
            values[np.isnan(values)] = 0  # rows the model's slice did not cover: not synthesized
            expected = np.zeros((x, y, z))
            expected[:, :, prepared.prepared.slice_index] = np.moveaxis(values * prepared.prepared.mask, 0, -1)
            img = nib.load(sample_paths(tmp_path, case.case_id, k)[name])
            np.testing.assert_array_equal(img.affine, ctp_img.affine)
            np.testing.assert_allclose(np.asarray(img.dataobj), expected, rtol=1e-6, atol=1e-6 * high)
    record = json.loads((tmp_path / case.case_id / "synthesis.json").read_text())
    assert record["steps"] == 3 and record["scale"] == "case" and len(record["files"]) == 4
    with pytest.raises(ValueError, match="images"):  # a failed rewrite leaves the case unfinished
        write_case(tmp_path, prepared, images[:, :1], {})
    assert case_complete(tmp_path, case.case_id, samples)  # refused before anything was touched
    (tmp_path / case.case_id / "adc_s1.nii.gz").write_bytes(b"")
    assert not case_complete(tmp_path, case.case_id, samples)


def test_configuration_overrides_and_checks(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("model = 'm'\ninput = 'i'\noutput = 'o'\nsteps = 7\nsize = [64, 48]\n")
    config = load_synthesis_config(path, {"steps": None, "eta": 0.5, "samples": 3})
    assert (config.steps, config.eta, config.samples, config.size) == (7, 0.5, 3, (64, 48))
    assert load_synthesis_config(path, {"steps": 9}).steps == 9
    for overrides, key in (({"samples": 0}, "samples"), ({"size": [0, 8]}, "size"), ({"seed": -1}, "seed"),
                           ({"layout": "bids"}, "layout"), ({"prefetch": -2}, "prefetch")):
        with pytest.raises(ConfigError) as err:
            load_synthesis_config(path, overrides)
        assert err.value.key == key


def test_generate_options_map_dtype_and_graphs_onto_the_sampler():
    import inspect

    from ldmfast.models import ConditionalLDM

    config = SynthesisConfig(model="m", input="i", output="o", steps=4)
    cpu = generate_options(config, torch.device("cpu"))
    assert cpu == {"steps": 4, "eta": 0.0, "spacing": "uniform", "autocast": None, "channels_last": False,
                   "cuda_graph": False}
    gpu = generate_options(config, torch.device("cuda"))
    assert gpu["autocast"] is torch.bfloat16 and gpu["cuda_graph"] is True and gpu["channels_last"] is True
    fp16 = generate_options(SynthesisConfig(model="m", input="i", output="o", dtype="float16"), torch.device("cpu"))
    assert fp16["autocast"] is torch.float16
    assert set(cpu) <= set(inspect.signature(ConditionalLDM.generate).parameters)
    with pytest.raises(ConfigError, match="CUDA device"):
        generate_options(SynthesisConfig(model="m", input="i", output="o", cuda_graph=True), torch.device("cpu"))


@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_a_case_the_model_fails_on_is_reported_and_the_others_are_written(data, tmp_path, monkeypatch, failure):
    from ldmfast.models import ConditionalLDM
    from ldmfast.synthesis import synthesize
    from synthesize_helpers import make_model_dir

    cases = find_cases(data)
    victim = cases[0].case_id
    victim_seeds = {slice_seed(0, victim, s, 0) for s in range(64)}
    real_generate = ConditionalLDM.generate

    def flaky_generate(self, ctp, seeds, **kwargs):
        hit = [i for i, s in enumerate(seeds) if s in victim_seeds]
        if hit and failure == "raise":
            raise RuntimeError("device lost")
        out = real_generate(self, ctp, seeds, **kwargs)
        out[hit] = float("nan")
        return out

    monkeypatch.setattr(ConditionalLDM, "generate", flaky_generate)
    config = SynthesisConfig(model=str(make_model_dir(tmp_path / "model", 1)), input=str(data),
                             output=str(tmp_path / "out"), steps=1, batch_size=3, device="cpu")
    messages = []
    summary = synthesize(config, progress=False, log=messages.append)
    assert victim in summary.failed and any(victim in m for m in messages)
    assert sorted(summary.written + list(summary.failed)) == sorted(c.case_id for c in cases)
    if failure == "nan":
        assert summary.failed == {victim: "the model produced non-finite values"}
    else:
        assert "device lost" in summary.failed[victim]
    for case in cases:
        assert case_complete(config.output, case.case_id, 1) == (case.case_id in summary.written)


def test_a_rerun_resumes_only_what_the_same_settings_made(data, tmp_path):
    from ldmfast.synthesis import synthesize
    from synthesize_helpers import make_model_dir

    cases = sorted(c.case_id for c in find_cases(data))
    model = make_model_dir(tmp_path / "model", 1)
    out = tmp_path / "out"

    def run(**settings):
        config = SynthesisConfig(model=str(model), input=str(data), output=str(out), steps=1, batch_size=4,
                                 device="cpu", **settings)
        return synthesize(config, progress=False, log=lambda message: None)

    def files():
        return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}

    assert sorted(run(samples=2).written) == cases
    assert sorted(run(samples=2).skipped) == cases and sorted(run(samples=1).skipped) == cases  # a subset
    before = files()
    with pytest.raises(ConfigError, match="seed 0, now 1; size None, now") as err:  # not these settings' outputs
        run(samples=2, seed=1, size=(32, 24))
    assert err.value.key == "output" and "--overwrite" in str(err.value) and files() == before
    # Overwritten with fewer samples: the earlier run's second sample goes too.
    assert sorted(run(samples=1, seed=1, overwrite=True).written) == cases
    assert not list(out.glob("*/*_s1.nii.gz"))
    assert sorted(run(samples=2, seed=1).written) == cases  # more samples than were made: redone
    assert len(list(out.glob("*/dwi_s1.nii.gz"))) == len(cases)
    make_model_dir(model, 1)  # the same weights exported again (a finished training resumed): still this model
    assert sorted(run(samples=2, seed=1).skipped) == cases
    moved = tmp_path / "moved_model"
    shutil.copytree(model, moved)  # the model folder moved or copied elsewhere: still this model
    model, original = moved, model
    assert sorted(run(samples=2, seed=1).skipped) == cases
    model = original
    make_model_dir(model, 2)  # retrained in the same folder
    with pytest.raises(ConfigError, match="model_files"):
        run(samples=2, seed=1)


def test_a_damaged_model_folder_is_a_refused_setting(data, tmp_path):
    from ldmfast.synthesis import synthesize
    from synthesize_helpers import make_model_dir

    model = make_model_dir(tmp_path / "model", 1)
    config = SynthesisConfig(model=str(model), input=str(data), output=str(tmp_path / "out"), steps=1, device="cpu")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    with pytest.raises(ConfigError, match="cannot load the model") as err:
        synthesize(config, progress=False)
    assert err.value.key == "model" and not (tmp_path / "out").exists()
    make_model_dir(model, 1)
    settings = json.loads((model / "config.json").read_text())
    del settings["diffusion"]
    (model / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="'diffusion'") as err:
        synthesize(config, progress=False)
    assert err.value.key == "model"


def test_a_crop_to_the_model_size_is_reported_and_written_as_zero(data, tmp_path, monkeypatch):
    from ldmfast.synthesis import runner, synthesize
    from synthesize_helpers import make_model_dir

    case = find_cases(data)[0]
    prepared = prepare_case(case, frames=15, multiple=8, size=(16, 16))
    mask = prepared.prepared.mask
    inside = np.zeros(mask.shape[-2:], dtype=bool)
    inside[8:24, 8:24] = True
    assert prepared.cropped_brain == np.count_nonzero(mask & ~inside) > 0

    totals = []  # (n, total) after each update of the progress bar

    class Bar(runner.tqdm):
        def update(self, n=1):
            super().update(n)
            totals.append((self.n, self.total))

    monkeypatch.setattr(runner, "tqdm", Bar)
    config = SynthesisConfig(model=str(make_model_dir(tmp_path / "model", 1)), input=str(data),
                             output=str(tmp_path / "out"), steps=1, batch_size=4, device="cpu", size=(16, 16))
    messages = []
    summary = synthesize(config, progress=True, log=messages.append)
    assert any(f"crops {prepared.cropped_brain} brain voxels" in m for m in messages)
    assert not any("resampled" in m for m in messages)  # the model's 15 frames: nothing to say
    dwi = np.asarray(nib.load(tmp_path / "out" / case.case_id / "dwi.nii.gz").dataobj)
    assert not dwi[~inside].any() and dwi[inside].any()
    # The bar's total is the whole run's from the start (the headers' slices, less the unusable ones
    # once read) and the bar ends full.
    headers = sum(nib.load(c.ctp).shape[2] for c in find_cases(data))
    assert totals[0][1] in range(summary.slices, headers + 1) and totals[-1] == (summary.slices, summary.slices)


def test_a_ctp_resampled_in_time_is_said_in_the_log(data, tmp_path):
    # A model of 7 frames on 15-frame CTPs: one line per case in the run's log (a Python warning
    # printed in the middle of the progress bar before).
    from ldmfast.models import VQGAN, ConditionalLDM, UNetConfig, VQGANConfig
    from ldmfast.synthesis import synthesize

    torch.manual_seed(0)
    unet = UNetConfig(in_channels=10, out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), head_channels=16, norm_groups=8)
    vqgan = VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8, num_codes=64))
    ConditionalLDM(unet, frames=7, autoencoder=vqgan).save_pretrained(tmp_path / "model")
    config = SynthesisConfig(model=str(tmp_path / "model"), input=str(data), output=str(tmp_path / "out"), steps=1,
                             device="cpu")
    messages = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synthesize(config, progress=False, log=messages.append)
    said = [m for m in messages if "resampled in time" in m]
    assert len(said) == len(find_cases(data)) and "has 15 time frames" in said[0] and "model's 7" in said[0]
