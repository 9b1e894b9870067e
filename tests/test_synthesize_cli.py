"""`ldmfast synthesize` run as a user would: outputs, scales, reruns, bad cases, configuration."""
import csv
import json
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from ldmfast.cli import main
from synthesize_helpers import (ENV, cases_of, make_data, make_model_dir, output_files, read_volume, reference_case,
                                run_cli, start_cli, tiny_model)

STEPS, BATCH, SAMPLES, CASES = 6, 4, 2, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-cli")
    seed = int(np.random.SeedSequence().entropy % 10_000)  # fresh model and data each run
    return {"model": make_model_dir(root / "model", seed), "data": make_data(root / "data", CASES, seed),
            "root": root, "seed": seed}


def synth_args(setup, out, *extra):
    return ("--model", setup["model"], "--input", setup["data"], "--output", out, "--steps", STEPS,
            "--batch-size", BATCH, "--samples", SAMPLES, "--seed", setup["seed"], "--device", "cpu", *extra)


@pytest.fixture(scope="module")
def reference_run(setup):
    """One uninterrupted single-process run, which the other runs must reproduce."""
    out = setup["root"] / "reference"
    result = run_cli(*synth_args(setup, out))
    assert result.returncode == 0, result.stderr
    return out, result


def assert_same_outputs(out, reference):
    """The same files per case (no temporary, no duplicate), the same voxels, affines and records."""
    assert output_files(out) == output_files(reference)
    for path in reference.rglob("*.nii.gz"):
        mine = nib.load(out / path.relative_to(reference))
        theirs = nib.load(path)
        np.testing.assert_array_equal(mine.affine, theirs.affine)
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    for path in reference.rglob("synthesis.json"):
        assert json.loads((out / path.relative_to(reference)).read_text()) == json.loads(path.read_text())


def test_writes_every_case_with_the_input_geometry_and_the_reference_values(setup, reference_run):
    out, result = reference_run
    cases = cases_of(setup["data"])
    assert f"written {CASES} cases" in result.stdout and "failed 0" in result.stdout
    model = tiny_model(setup["seed"])
    for case in cases[:3]:  # the reference computation is the slow part
        folder = out / case.case_id
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["dwi.nii.gz", "adc.nii.gz", "dwi_s1.nii.gz", "adc_s1.nii.gz", "synthesis.json"])
        ctp = nib.load(case.ctp)
        record = json.loads((folder / "synthesis.json").read_text())
        assert record["scale"] == "case" and record["steps"] == STEPS and record["samples"] == SAMPLES
        for sample, suffix in ((0, ""), (1, "_s1")):
            expected = reference_case(model, case, steps=STEPS, batch_size=BATCH, seed=setup["seed"], sample=sample)
            for name in ("dwi", "adc"):
                img = nib.load(folder / f"{name}{suffix}.nii.gz")
                assert img.shape == ctp.shape[:3]
                np.testing.assert_array_equal(img.affine, ctp.affine)
                assert img.header["pixdim"][1:4].tolist() == ctp.header["pixdim"][1:4].tolist()
                assert img.header.get_qform(coded=True)[1] == ctp.header.get_qform(coded=True)[1]
                got = read_volume(folder / f"{name}{suffix}.nii.gz")
                np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5 * expected[name].max())
        assert not np.array_equal(read_volume(folder / "dwi.nii.gz"), read_volume(folder / "dwi_s1.nii.gz"))


def test_a_rerun_skips_finished_cases(setup, reference_run):
    out, _ = reference_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_cli(*synth_args(setup, out))
    assert again.returncode == 0, again.stderr
    assert "written 0 cases" in again.stdout and f"skipped {CASES}" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_a_rerun_asking_fewer_samples_keeps_the_first_of_each_finished_case(setup, reference_run, tmp_path):
    # Sample k does not depend on how many were asked: a rerun with fewer keeps the first ones, and
    # the folder becomes what a run of that count writes (records included), so that evaluation,
    # which measures the samples a record lists, sees one count in every case.
    import shutil

    out, _ = reference_run
    shutil.copytree(out, tmp_path / "kept")
    def one_sample(out):
        args = list(synth_args(setup, out))
        args[args.index("--samples") + 1] = 1
        return args

    again = run_cli(*one_sample(tmp_path / "kept"))
    assert again.returncode == 0, again.stderr
    assert "written 0 cases" in again.stdout and f"skipped {CASES}" in again.stdout
    fresh = run_cli(*one_sample(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr
    assert_same_outputs(tmp_path / "kept", tmp_path / "fresh")


def _kill_after_a_new_record(args, out, sig) -> tuple[int, str]:
    """Start a run, send `sig` once a case record appears that was not there before; the exit status
    and what the run wrote to stderr."""
    before = set(out.glob("*/synthesis.json")) if out.exists() else set()
    proc = start_cli(*args)
    deadline = time.monotonic() + 180
    while not (set(out.glob("*/synthesis.json")) - before) if out.exists() else True:
        assert proc.poll() is None, f"the run ended before writing a case: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted: give it more work"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_finished_cases_valid(out):
    """Every visible file is whole: each record's files load completely."""
    for record in out.glob("*/synthesis.json"):
        for name in json.loads(record.read_text())["files"]:
            assert np.isfinite(read_volume(record.parent / name)).all()
    for path in out.glob("*/*.nii.gz"):
        if not path.name.startswith("."):
            read_volume(path)  # raises on a truncated file


def test_interrupted_runs_leave_whole_files_and_a_rerun_completes_them(setup, reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "out"
    args = synth_args(setup, out)
    # SIGTERM (what torchrun and schedulers send): the run stops cleanly, no temporary file is left.
    code, err = _kill_after_a_new_record(args, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "run the same command again" in err and "Traceback" not in err
    assert not list(out.glob("*/.tmp-*"))
    assert_finished_cases_valid(out)
    done = len(list(out.glob("*/synthesis.json")))
    assert 1 <= done < CASES
    # SIGKILL: nothing runs on the way out; what is visible must still be whole.
    _kill_after_a_new_record(args, out, signal.SIGKILL)
    assert_finished_cases_valid(out)
    finished = len(list(out.glob("*/synthesis.json")))
    assert done < finished < CASES
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"written {CASES - finished} cases" in result.stdout and f"skipped {finished}" in result.stdout
    assert_same_outputs(out, reference)  # bit for bit, whatever batches the interruptions made


@pytest.mark.slow  # three interpreters starting torch: about 15 s on a shared 2-core machine
def test_torchrun_with_two_gloo_processes_writes_the_same_files(setup, reference_run, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ldmfast", "synthesize", *map(str, synth_args(setup, out)), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("written ") == 1  # one summary, by rank 0, of both processes' work
    assert f"written {CASES} cases" in result.stdout
    assert_same_outputs(out, reference)


def test_a_corrupt_case_is_reported_and_ctp_only_cases_are_written_in_the_unit_scale(setup, tmp_path):
    cases = cases_of(setup["data"])[:3]
    bad = tmp_path / "bad_ctp.nii.gz"
    raw = cases[2].ctp.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # a truncated download
    manifest = tmp_path / "cases.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "ctp", "mask"])
        for case in cases[:2]:
            writer.writerow([f"only_{case.case_id}", case.ctp, case.mask])
        writer.writerow(["broken", bad, cases[2].mask])
    out = tmp_path / "out"
    result = run_cli("--model", setup["model"], "--input", manifest, "--output", out, "--steps", 3,
                     "--batch-size", 5, "--seed", 11, "--device", "cpu")
    assert result.returncode == 1, result.stderr
    assert "written 2 cases" in result.stdout and "failed 1" in result.stdout
    assert "failed: broken" in result.stdout and str(bad) in result.stdout
    assert "'broken' failed" in result.stderr  # reported when it happened, too
    assert not (out / "broken" / "synthesis.json").exists()
    model = tiny_model(setup["seed"])
    for case in cases[:2]:
        folder = out / f"only_{case.case_id}"
        assert json.loads((folder / "synthesis.json").read_text())["scale"] == "unit"
        renamed = type(case)(case_id=f"only_{case.case_id}", ctp=case.ctp, mask=case.mask)
        expected = reference_case(model, renamed, steps=3, batch_size=5, seed=11, scale="unit")
        for name in ("dwi", "adc"):
            got = read_volume(folder / f"{name}.nii.gz")
            assert 0.0 <= got.min() and got.max() <= 1.0
            np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synthesize", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for expected in ("examples:", "torchrun --nproc_per_node", "--batch-size", "--samples", "synthesis.json"):
        assert expected in out


@pytest.mark.parametrize("toml, flags, key", [
    ("stepz = 3\n", [], "stepz: unknown key"),
    ("steps = 0\n", [], "steps: must be >= 1"),
    ("steps = 'many'\n", [], "steps: expected an integer"),
    ("steps = 20\n", ["--steps", "5000"], "steps: must be <= the model's 1000"),
    ("scale = 'hu'\n", [], "scale: must be one of"),
    ("size = [30, 32]\n", [], "size: height and width must be divisible by 8"),
    ("eta = -1.0\n", [], "eta: must be a finite number >= 0"),
    ("", ["--device", "tpu"], "device: must be auto, cpu, cuda"),
])
def test_a_refused_configuration_names_the_key(setup, tmp_path, capsys, toml, flags, key):
    config = tmp_path / "synth.toml"
    config.write_text(f"model = '{setup['model']}'\ninput = '{setup['data']}'\noutput = '{tmp_path / 'out'}'\n"
                      "device = 'cpu'\n" + toml)
    assert main(["synthesize", "--config", str(config), "--quiet", *flags]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flags_override_the_configuration_file(setup, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "synth.toml"
    config.write_text(f"model = '{setup['model']}'\ninput = '{setup['data']}'\noutput = '{setup['data']}'\n"
                      "device = 'cpu'\nsteps = 0\n")
    assert main(["synthesize", "--config", str(config), "--quiet", "--steps", "1", "--output", str(out)]) == 0
    assert json.loads(next(out.glob("*/synthesis.json")).read_text())["steps"] == 1
    assert main(["synthesize", "--config", str(config), "--quiet", "--steps", "1"]) == 2
    assert "output:" in capsys.readouterr().err  # the file's output is the input folder
    assert main(["synthesize", "--config", str(config), "--quiet", "--steps", "1",
                 "--output", str(setup["data"] / "synth")]) == 2
    assert "output:" in capsys.readouterr().err
    assert main(["synthesize", "--input", str(setup["data"]), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "model: required" in capsys.readouterr().err
