"""`ldmfast demo`: the whole method on built-in synthetic data, on this machine, in minutes.

phantom data set -> VQGAN -> cLDM -> lesion-aware post-training -> synthesis of the held-out
cases with the base and the post-trained model -> evaluation of both -> report and a summary
table. Each stage is the real command's code with the demo configuration shipped in
ldmfast/configs/*_demo.toml; every stage resumes where an interrupted demo stopped, and a
finished stage is not run again. OUT/demo.json records the settings: a rerun with other ones
redoes what they change (and what depends on it), never mixes the two.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ldmfast.train.config import from_dict, read_toml, set_dotted

STAGES = ("vqgan", "ldm", "posttrain")
# Held-out lesion MAE of the VQGAN above which it has not learned lesions (phantom data: ~0.65 when
# their pixels come back as surrounding tissue, 0.18-0.26 once learned); they are learned late in
# stage 1 (300 steps missed them in some seeds; the demo runs 600).
LESION_RECONSTRUCTED = 0.5
# Draws per held-out case that the table averages: the base and the post-trained model differ by
# less than one draw's noise (4 volumes of 8 slices; per draw, the MAE difference spread 0.004 in
# two runs whose 8-draw means were -0.002 and -0.003), so a single draw's sign is a coin toss.
# Synthesis of a draw is cheap (the 48 held-out slices x 10 DDIM steps: about a second on 2 cores).
SAMPLES = 16
SUMMARY_METRICS = (("mae", "MAE", "lower"), ("psnr", "PSNR (dB)", "higher"), ("ms_ssim", "MS-SSIM", "higher"),
                   ("lesion_mae", "lesion MAE", "lower"))


@dataclass
class DemoSettings:
    """What `ldmfast demo` runs; `steps` overrides the demo configurations' train.steps per stage
    (e.g. {"ldm": 50} for a quick look), `overrides` any key, as `--set` does (e.g.
    {"ldm": ["train.batch_size=4"]})."""

    output_dir: Path = Path("ldmfast-demo")
    device: str = "auto"
    # 24: six held-out cases (val_fraction 0.25); with 16, four volumes left the global metrics'
    # sign to chance (see SAMPLES) and a second seed ended with MAE +0.0009 where 24 cases give -0.005.
    cases: int = 24
    shape: tuple[int, int, int] = (64, 64, 8)
    seed: int = 0
    sample_steps: int = 10
    samples: int = SAMPLES
    steps: dict[str, int] = field(default_factory=dict)
    overrides: dict[str, list[str]] = field(default_factory=dict)
    progress: bool = True


def demo_config(stage: str) -> dict:
    """The shipped demo configuration of a stage, as a TOML dict."""
    with resources.as_file(resources.files("ldmfast") / "configs" / f"{stage}_demo.toml") as path:
        return read_toml(path)


def stage_config(stage: str, settings: DemoSettings, **paths) -> dict:
    out = settings.output_dir
    data = demo_config(stage)
    data["output_dir"] = str(out / stage)
    data["device"] = settings.device
    data["seed"] = settings.seed
    data["data"].pop("phantom", None)
    data["data"].update(root=str(out / "phantom"), cache_dir=str(out / "cache"), size=list(settings.shape[:2]))
    data.update({k: str(v) for k, v in paths.items()})
    if stage in settings.steps:
        set_dotted(data, f"train.steps={settings.steps[stage]}")
    for assignment in settings.overrides.get(stage, []):
        set_dotted(data, assignment)
    return data


#: the demo's record of its settings in OUT, and what makes a folder a demo's
RECORD_NAME = "demo.json"
#: OUT's folders after the training stages, in the order they are made
RESULTS = ("synthesis", "report")


def demo_record(settings: DemoSettings) -> dict:
    """What decides the demo's results, stage by stage (steps as the stage will train them, and the
    shipped configuration, which another ldmfast version may change)."""
    return {"data": {"cases": settings.cases, "shape": list(settings.shape), "seed": settings.seed},
            "stages": {stage: {"steps": settings.steps.get(stage, demo_config(stage)["train"]["steps"]),
                               "overrides": list(settings.overrides.get(stage, [])),
                               "config": demo_config(stage)} for stage in STAGES},
            "sample_steps": settings.sample_steps, "samples": settings.samples}


def stale_outputs(old: dict, new: dict) -> tuple[list[str], str] | None:
    """The folders of OUT that `old` settings made and `new` ones would not (the first change and all
    that depends on it), and what changed; None when nothing did. A stage asked for more steps
    trains on from its checkpoint; fewer steps or other overrides start it again."""
    if old.get("data") != new["data"]:
        return ["phantom", "cache", *STAGES, *RESULTS], f"data {old.get('data')} -> {new['data']}"
    for i, stage in enumerate(STAGES):
        was, now = old["stages"][stage], new["stages"][stage]
        if "config" not in was:  # nothing tells which of its configurations differ from these
            return [stage, *STAGES[i + 1:], *RESULTS], ("its demo.json, from an older ldmfast, does not record the "
                                                        "stages' configurations")
        if was["config"] != now["config"]:
            return [stage, *STAGES[i + 1:], *RESULTS], f"{stage}'s demo configuration changed (another ldmfast version)"
        if was != now:
            goes_on = now["steps"] > was["steps"] and now["overrides"] == was["overrides"]
            change = (f"{stage} steps {was['steps']} -> {now['steps']}" if was["steps"] != now["steps"]
                      else f"{stage} overrides {was['overrides']} -> {now['overrides']}")
            return ([] if goes_on else [stage]) + list(STAGES[i + 1:]) + list(RESULTS), change
    if old.get("sample_steps") != new["sample_steps"]:
        return list(RESULTS), f"sample steps {old.get('sample_steps')} -> {new['sample_steps']}"
    if old.get("samples", 1) != new["samples"]:  # (records of older demos: one draw)
        return list(RESULTS), f"samples {old.get('samples', 1)} -> {new['samples']}"
    return None


def prepare_output(settings: DemoSettings) -> None:
    """Make OUT (a folder: run_demo refused a file) a demo folder for these settings: refuse another
    program's folder, and remove what a run with other settings made there (said), then record these
    settings."""
    from ldmfast.train.checkpoint import write_json_atomic

    out = settings.output_dir
    record_path = out / RECORD_NAME
    new = demo_record(settings)
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
            stale = stale_outputs(old, new)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--output: {record_path} is damaged; delete {out} or choose another folder") from None
        if stale:
            folders, change = stale
            gone = [name for name in folders if (out / name).exists()]
            if gone:
                _say(settings, f"settings changed since the last run in {out} ({change}): redoing {', '.join(gone)}")
            for name in gone:
                shutil.rmtree(out / name)
    elif (out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())
          and not (out / "phantom").is_dir()):  # (older demos had no record)
        raise ValueError(f"--output: {out} holds files that are not a demo run's; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(new, record_path)


def _say(settings: DemoSettings, text: str) -> None:
    if settings.progress:
        print(text, flush=True)


def run_stage(stage: str, settings: DemoSettings, **paths) -> dict:
    """Train one stage with its demo configuration (resuming an interrupted run)."""
    from ldmfast.train.distributed import DistInfo, resolve_device

    if stage == "vqgan":
        from ldmfast.train.vqgan import VQGANTrainer as trainer_cls
        from ldmfast.train.vqgan_config import VQGANTrainConfig as config_cls
    elif stage == "ldm":
        from ldmfast.train.ldm import LDMTrainer as trainer_cls
        from ldmfast.train.ldm_config import LDMTrainConfig as config_cls
    else:
        from ldmfast.train.posttrain import PostTrainer as trainer_cls
        from ldmfast.train.posttrain_config import PostTrainConfig as config_cls
    config = from_dict(config_cls, stage_config(stage, settings, **paths))
    # One process: the demo is a single-machine walk-through (the stages' own commands run DDP).
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(config.device))
    trainer = trainer_cls(config, progress=settings.progress, dist_info=dist)
    if trainer.step >= config.train.steps:
        _say(settings, f"{stage}: already trained ({trainer.step} steps)")
    return trainer.run()


def held_out_cases(settings: DemoSettings) -> list:
    """The validation cases of the demo's split (every stage splits the same way)."""
    from ldmfast.data import TRAINING_MODALITIES, find_cases
    from ldmfast.train.data import split_cases

    val_fraction = demo_config("vqgan")["data"]["val_fraction"]
    cases = sorted(find_cases(settings.output_dir / "phantom", require=TRAINING_MODALITIES), key=lambda c: c.case_id)
    return split_cases(cases, val_fraction, settings.seed)[1]


def summary_rows(evaluation) -> list[tuple[str, list[float | None]]]:
    """(metric label, [value per run]) in the normalized scale, each the mean over volumes of
    the DWI and ADC values averaged."""
    from ldmfast.metrics.evaluate import dataset_summary

    summaries = [dataset_summary(run)["normalized"] for run in evaluation.runs]
    rows = []
    for key, label, _ in SUMMARY_METRICS:
        values = []
        for s in summaries:
            means = [s[ch][key]["mean"] for ch in ("dwi", "adc")]
            values.append(None if any(m is None for m in means) else sum(means) / len(means))
        rows.append((label, values))
    return rows


def format_table(labels: list[str], rows: list[tuple[str, list[float | None]]]) -> str:
    """A plain-text table: one row per metric, one column per run, and the change base -> last."""
    header = ["metric", *labels, "change"]
    body = []
    for (label, values), (_, _, better) in zip(rows, SUMMARY_METRICS):
        cells = [label] + ["n/a" if v is None else f"{v:.4f}" for v in values]
        a, b = values[0], values[-1]
        if a is None or b is None:
            cells.append("n/a")
        else:
            improved = (b < a) if better == "lower" else (b > a)
            cells.append(f"{b - a:+.4f} ({'better' if improved else 'worse'})")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def write_manifest(cases, path: Path) -> Path:
    """A CSV manifest of `cases` (the held-out ones), so synthesis and evaluation see only them."""
    import csv

    from ldmfast.data.atomic import atomic_path

    columns = ("case_id", "ctp", "mask", "dwi", "adc", "lesion")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for case in cases:
            writer.writerow([case.case_id] + [str(Path(getattr(case, c)).resolve()) for c in columns[1:]])
    return path


def synthesize_held_out(model_dir: Path, manifest: Path, out_dir: Path, settings: DemoSettings):
    from ldmfast.synthesis import SynthesisConfig, synthesize

    config = SynthesisConfig(model=str(model_dir), input=str(manifest), output=str(out_dir),
                             steps=settings.sample_steps, samples=settings.samples, seed=settings.seed,
                             device=settings.device)
    config.check()
    summary = synthesize(config, progress=settings.progress)
    if summary.failed:
        raise RuntimeError(f"synthesis with {model_dir} failed for {len(summary.failed)} case(s): {summary.failed}")
    return summary


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold OUT/.lock exclusively for the block (released at exit, even a killed process's): a second
    demo in the same folder would delete and rewrite what the first is using (two at once: one's
    slice cache rebuilt under the other, which then failed reading it). Where the platform has no
    fcntl (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--output: another ldmfast demo is running in {folder}; wait for it to end or "
                             "choose another folder") from None
        yield


def run_demo(settings: DemoSettings) -> dict:
    """The whole demo (module docstring); returns the summary written to OUT/summary.json. One
    demo at a time per folder (folder_lock)."""
    # Absolute: the stages' checkpoints record paths, and a rerun from another folder (or with the
    # same folder spelled otherwise) must find them the same.
    settings = dataclasses.replace(settings, output_dir=Path(settings.output_dir).resolve())
    if settings.output_dir.exists() and not settings.output_dir.is_dir():
        raise ValueError(f"--output: {settings.output_dir} exists and is not a folder")
    with folder_lock(settings.output_dir):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict:
    import torch

    from ldmfast.data import make_phantom_dataset, phantom_complete
    from ldmfast.metrics.evaluate import EvaluateOptions, evaluate
    from ldmfast.metrics.report import write_report
    from ldmfast.metrics.results import write_csv, write_summary
    from ldmfast.train.checkpoint import write_json_atomic

    out = settings.output_dir
    prepare_output(settings)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    _say(settings, f"[1/6] phantom data set: {settings.cases} cases of {settings.shape} in {out / 'phantom'}")
    phantom = out / "phantom"
    if not phantom_complete(phantom, settings.cases, settings.shape):
        shutil.rmtree(phantom, ignore_errors=True)  # an interrupted generation's cases and temporaries
        timed("phantom", make_phantom_dataset, phantom, n_cases=settings.cases, shape=settings.shape,
              seed=settings.seed, lesion_fraction=0.75, progress=settings.progress)
    _say(settings, "[2/6] VQGAN (stage 1)")
    results = {"vqgan": timed("vqgan", run_stage, "vqgan", settings)}
    vq_lesion = results["vqgan"].get("val_lesion_mae")
    if vq_lesion is not None and vq_lesion > LESION_RECONSTRUCTED:
        _say(settings, f"note: the VQGAN reconstructs the held-out lesions with MAE {vq_lesion:.2f} (> "
                       f"{LESION_RECONSTRUCTED}: it has not learned them yet). Post-training's lesion term aims at "
                       "its reconstructions, so expect little lesion gain; more VQGAN steps (--steps vqgan=1000, "
                       "then rerun) usually fix it.")
    _say(settings, "[3/6] conditional LDM (stage 2)")
    results["ldm"] = timed("ldm", run_stage, "ldm", settings, autoencoder=out / "vqgan" / "vqgan")
    _say(settings, "[4/6] lesion-aware post-training (stage 3)")
    results["posttrain"] = timed("posttrain", run_stage, "posttrain", settings, init=out / "ldm" / "ldm")

    held_out = held_out_cases(settings)
    manifest = write_manifest(held_out, out / "held_out.csv")
    models = {"base": out / "ldm" / "ldm", "post-trained": out / "posttrain" / "ldm"}
    _say(settings, f"[5/6] synthesis of the {len(held_out)} held-out cases with both models "
                   f"({settings.samples} draws each, {settings.sample_steps} DDIM steps)")
    for label, model_dir in models.items():
        timed(f"synthesize {label}", synthesize_held_out, model_dir, manifest, out / "synthesis" / label, settings)

    _say(settings, "[6/6] evaluation")
    device = "cuda" if settings.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    # Small phantom slices are too small for the 5-scale MS-SSIM (161 pixels): as many scales as fit.
    from ldmfast.metrics.image import _min_size
    scales = max([k for k in range(1, 6) if _min_size(k) <= min(settings.shape[:2])], default=1)
    options = EvaluateOptions(ms_ssim_scales=scales, device=device)
    evaluation = timed("evaluate", evaluate, manifest, [(k, out / "synthesis" / k) for k in models], options,
                       progress=settings.progress)
    report_dir = out / "report"
    write_csv(report_dir / "cases.csv", evaluation, "cases")
    write_csv(report_dir / "slices.csv", evaluation, "slices")
    write_summary(report_dir / "summary.json", evaluation)
    report = write_report(report_dir, evaluation)

    rows = summary_rows(evaluation)
    table = format_table(list(models), rows)
    lesion = dict(rows)["lesion MAE"]
    summary = {
        "output_dir": str(out), "report": str(report), "held_out_cases": [c.case_id for c in held_out],
        "samples": settings.samples,
        "metrics": {label: dict(zip(models, values)) for label, values in rows},
        "lesion_mae_improved": None if None in lesion else lesion[1] < lesion[0],
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
        "training": {k: {m: v for m, v in r.items() if isinstance(v, (int, float))} for k, r in results.items()},
    }
    write_json_atomic(summary, out / "summary.json")
    (out / "summary.txt").write_text(table + "\n")
    # The results, with or without progress output (--quiet).
    draws = f" and {settings.samples} draws each" if settings.samples > 1 else ""
    print(f"\nheld-out cases, normalized scale, mean of DWI and ADC over volumes{draws}:\n" + table)
    print(f"\nreport: {report}\nsummary: {out / 'summary.json'}  ({summary['seconds']['total']:.0f} s in all)",
          flush=True)
    return summary
