"""`ldmfast demo` end to end at a toy size: every stage runs, both models synthesize the held-out
cases, the evaluation compares them, and a rerun keeps what was finished."""
import json

import pytest

from ldmfast.cli import main
from ldmfast.demo import DemoSettings, format_table, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(output_dir=out, device="cpu", cases=4, shape=(32, 32, 3),
                            steps={"vqgan": 2, "ldm": 2, "posttrain": 2}, sample_steps=1, samples=2, progress=False,
                            overrides={stage: ["train.batch_size=2"] for stage in ("vqgan", "ldm", "posttrain")})
    return settings, run_demo(settings)


def test_demo_writes_models_syntheses_and_a_report(demo_run):
    settings, summary = demo_run
    out = settings.output_dir
    for model in ("vqgan/vqgan", "ldm/ldm", "posttrain/ldm"):
        assert (out / model / "config.json").is_file(), model
    held_out = summary["held_out_cases"]
    assert held_out and set(held_out) <= {f"phantom_{i:03d}" for i in range(4)}
    for label in ("base", "post-trained"):
        for case in held_out:
            assert (out / "synthesis" / label / case / "dwi.nii.gz").is_file()
            assert (out / "synthesis" / label / case / "adc_s1.nii.gz").is_file()  # the second draw
    assert (out / "report" / "report.html").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["metrics"]) == {"MAE", "PSNR (dB)", "MS-SSIM", "lesion MAE"}
    for values in on_disk["metrics"].values():
        assert set(values) == {"base", "post-trained"}
    assert "lesion MAE" in (out / "summary.txt").read_text()
    assert on_disk["samples"] == 2
    evaluation = json.loads((out / "report" / "summary.json").read_text())["settings"]
    assert evaluation["draws_per_case"] == {label: {"2": len(held_out)} for label in ("base", "post-trained")}


def test_a_rerun_keeps_finished_stages(demo_run):
    settings, summary = demo_run
    kept = sorted(settings.output_dir.glob("*/checkpoints/*.safetensors"))
    kept += sorted(settings.output_dir.glob("synthesis/*/*/*.nii.gz"))
    before = {p: p.stat().st_mtime_ns for p in kept}
    again = run_demo(settings)
    assert {p: p.stat().st_mtime_ns for p in kept} == before, "finished stages and cases are not redone"
    assert again["metrics"] == summary["metrics"]
    assert again["training"] == summary["training"], "a finished stage still reports its last validation"


def test_other_settings_redo_what_they_change(demo_run):
    settings, _ = demo_run
    out = settings.output_dir

    def stamps(pattern):
        return {p: p.stat().st_mtime_ns for p in out.glob(pattern)}

    vqgan, ldm = stamps("vqgan/checkpoints/*"), stamps("ldm/checkpoints/*")
    synthesis = stamps("synthesis/*/*/*.nii.gz")
    # A phantom case cut short (an interrupted generation) is made again, the same.
    (out / "phantom" / "phantom_003" / "dwi.nii.gz").unlink()
    # More post-training steps: post-training trains on; the syntheses and the report are redone.
    more = DemoSettings(**{**vars(settings), "steps": {**settings.steps, "posttrain": 3}, "sample_steps": 2})
    summary = run_demo(more)
    assert stamps("vqgan/checkpoints/*") == vqgan and stamps("ldm/checkpoints/*") == ldm
    assert summary["training"]["posttrain"]["step"] == 3
    assert set(stamps("synthesis/*/*/*.nii.gz")) == set(synthesis)
    assert all(t != synthesis[p] for p, t in stamps("synthesis/*/*/*.nii.gz").items())
    assert json.loads((out / "synthesis" / "base" / summary["held_out_cases"][0] / "synthesis.json").read_text()
                      )["steps"] == 2
    # Fewer VQGAN steps than it trained: every stage from the VQGAN on starts again.
    fewer = DemoSettings(**{**vars(more), "steps": {**more.steps, "vqgan": 1}})
    summary = run_demo(fewer)
    assert summary["training"]["vqgan"]["step"] == 1
    assert all(t != ldm.get(p) for p, t in stamps("ldm/checkpoints/*").items()), "the cLDM was trained again"
    # More draws per case: only the syntheses and what follows are redone.
    trained = stamps("*/checkpoints/*")
    summary = run_demo(DemoSettings(**{**vars(fewer), "samples": 3}))
    assert stamps("*/checkpoints/*") == trained and summary["samples"] == 3
    assert (out / "synthesis" / "post-trained" / summary["held_out_cases"][0] / "dwi_s2.nii.gz").is_file()


def test_the_output_must_be_a_demo_folder(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(tmp_path), "--steps", "vqgan=1"]) == 2
    assert "not a demo run's" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["demo", "--output", str(tmp_path / "notes.txt")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_second_demo_in_the_same_folder_is_refused(capsys, tmp_path):
    # Two at once in one folder: one rebuilt the slice cache under the other, which then failed.
    import fcntl

    from ldmfast.demo import LOCK_NAME, folder_lock
    with folder_lock(tmp_path):
        assert main(["demo", "--output", str(tmp_path), "--steps", "vqgan=1"]) == 2
        assert "another ldmfast demo is running in" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else touched
    with open(tmp_path / LOCK_NAME) as f:  # released at the end of the block
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_bad_steps_are_refused(capsys, tmp_path):
    assert main(["demo", "--output", str(tmp_path), "--steps", "unet=3"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path), "--samples", "0"]) == 2
    assert "--samples: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path), "--seed", "-1"]) == 2
    assert "--seed: must be in [0, 2^31), got -1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the folder was touched


def test_summary_table_marks_the_direction_of_each_metric():
    rows = [("MAE", [0.2, 0.1]), ("PSNR (dB)", [20.0, 19.0]), ("MS-SSIM", [None, 0.5]), ("lesion MAE", [0.5, 0.4])]
    lines = format_table(["base", "post-trained"], rows).splitlines()
    assert "better" in lines[2] and "worse" in lines[3] and "n/a" in lines[4] and "better" in lines[5]


def test_a_changed_shipped_configuration_redoes_its_stage_and_what_follows():
    # Another ldmfast version may ship another demo configuration: its stage is trained again, not
    # taken for finished (the record of an older demo, without configurations, redoes everything).
    from ldmfast.demo import RESULTS, STAGES, demo_record, stale_outputs

    new = demo_record(DemoSettings())
    assert stale_outputs(new, demo_record(DemoSettings())) is None
    old = json.loads(json.dumps(new))
    old["stages"]["ldm"]["config"]["optim"]["lr"] = 1.0
    folders, change = stale_outputs(old, new)
    assert folders == ["ldm", "posttrain", *RESULTS] and "ldm's demo configuration changed" in change
    for stage in STAGES:
        del old["stages"][stage]["config"]
    assert stale_outputs(old, new) == ([*STAGES, *RESULTS], "its demo.json, from an older ldmfast, does not record "
                                                            "the stages' configurations")
    old = json.loads(json.dumps(new))
    del old["samples"]  # an older demo: one draw per case
    assert stale_outputs(old, new) == (list(RESULTS), "samples 1 -> 16")
