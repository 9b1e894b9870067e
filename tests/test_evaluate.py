"""`ldmfast evaluate` on a tiny phantom: pairing, metrics against direct computations,
outputs, errors, the report's figures."""
import csv
import json
import math
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from ldmfast.data import DataError, find_cases, load_case, output_paths, preprocess_case, write_synthesis
from ldmfast.metrics.evaluate import EvaluateOptions, evaluate
from ldmfast.metrics.png import contour, encode_png
from ldmfast.metrics.report import write_report
from ldmfast.metrics.results import summary, write_csv

OPTIONS = EvaluateOptions(ms_ssim_scales=2)  # 64 x 64 phantom slices: too small for 5 scales


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-case phantom (lesion cases and a lesion-free one) and two prediction folders:
    reference + noise (base) and reference + half that noise (post-trained)."""
    from ldmfast.data import make_phantom_dataset

    root = tmp_path_factory.mktemp("eval")
    make_phantom_dataset(root / "ref", n_cases=3, shape=(64, 64, 5), progress=False, lesion_fraction=0.67)
    rng = np.random.default_rng(0)
    for case in find_cases(root / "ref"):
        prepared = preprocess_case(load_case(case))
        noise = rng.normal(0, 0.1, prepared.target.shape).astype(np.float32)
        write_synthesis(root / "base", prepared, prepared.target + noise)
        write_synthesis(root / "pt", prepared, prepared.target + noise / 2)
    return root


def test_metrics_equal_direct_computations(runs):
    result = evaluate(runs / "ref", [("base", runs / "base")], OPTIONS, progress=False, figure_cases=0)
    run = result.runs[0]
    case = preprocess_case(load_case(find_cases(runs / "ref")[0]))
    stored = np.stack([np.asarray(__import__("nibabel").load(p).dataobj) for p in output_paths(runs / "base", case.case_id).values()])
    pred = np.moveaxis(stored[:, :, :, case.slice_index], -1, 0)  # S x 2 x X x Y
    lo = np.array([case.dwi_stats.low, case.adc_stats.low])[None, :, None, None]
    hi = np.array([case.dwi_stats.high, case.adc_stats.high])[None, :, None, None]
    pred_norm = 2 * np.clip((pred - lo) / (hi - lo), 0, 1) - 1
    err = np.abs(pred_norm - case.target)
    rows = [r for r in run.slice_rows if r["case_id"] == case.case_id]
    assert [r["slice"] for r in rows] == case.slice_index.tolist()
    for i, row in enumerate(rows):
        assert row["normalized_dwi_mae"] == pytest.approx(err[i, 0].mean(), rel=1e-5)
        mse = (err[i, 1] ** 2).mean()
        assert row["normalized_adc_psnr"] == pytest.approx(10 * math.log10(4 / mse), rel=1e-5)
        les = case.lesion[i]
        want = err[i, 0][les].mean() if les.any() else math.nan
        assert row["normalized_dwi_lesion_mae"] == pytest.approx(want, rel=1e-5, nan_ok=True)
    # Per volume: MAE over every evaluated voxel; lesion MAE over every lesion voxel.
    volume = run.case_rows[0]
    assert volume["normalized_dwi_mae"] == pytest.approx(err[:, 0].mean(), rel=1e-5)
    if case.lesion.any():
        assert volume["normalized_adc_lesion_mae"] == pytest.approx(err[:, 1][case.lesion].mean(), rel=1e-5)
    # The lesion-free case: lesion MAE undefined at every level, left out of the data-set mean.
    free = [r for r in run.case_rows if r["lesion_voxels"] == 0]
    assert free and all(math.isnan(r["normalized_dwi_lesion_mae"]) for r in free)
    stats = summary(result)["runs"]["base"]["dataset"]["normalized"]["dwi"]["lesion_mae"]
    assert stats["n"] == 3 - len(free)
    # Original scale: MAE in the image's unit, the noise scaled by the clip range / 2.
    assert volume["original_dwi_mae"] == pytest.approx(
        volume["normalized_dwi_mae"] * (case.dwi_stats.high - case.dwi_stats.low) / 2, rel=0.05)


def test_predictions_are_read_back_on_the_scale_their_record_names(runs, tmp_path):
    # The same synthesis written on the [0, 1] `unit` scale (as `ldmfast synthesize` writes a case
    # without DWI/ADC) with its synthesis.json: the metrics equal those of the case-scale files,
    # in both scales. Read as intensities, a perfect prediction scored MAE 0.5 before.
    from ldmfast.synthesis.cases import UNIT_STATS

    rng = np.random.default_rng(1)
    for case in find_cases(runs / "ref"):
        prepared = preprocess_case(load_case(case))
        pred = prepared.target + rng.normal(0, 0.1, prepared.target.shape).astype(np.float32)
        write_synthesis(tmp_path / "case", prepared, pred)
        write_synthesis(tmp_path / "unit", prepared, pred, stats={"dwi": UNIT_STATS, "adc": UNIT_STATS})
        (tmp_path / "unit" / case.case_id / "synthesis.json").write_text(json.dumps(
            {"scale": "unit", "stats": {"dwi": [0.0, 1.0], "adc": [0.0, 1.0]}}))
    result = evaluate(runs / "ref", [("case", tmp_path / "case"), ("unit", tmp_path / "unit")], OPTIONS,
                      progress=False, figure_cases=0)
    assert result.settings["prediction_scales"] == {"case": {"none": 3}, "unit": {"unit": 3}}
    case_rows, unit_rows = result.runs[0].case_rows, result.runs[1].case_rows
    for a, b in zip(case_rows, unit_rows):
        for key in ("normalized_dwi_mae", "normalized_adc_ssim", "original_dwi_mae", "original_adc_psnr"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), key
    (tmp_path / "unit" / find_cases(runs / "ref")[0].case_id / "synthesis.json").write_text('{"scale": "unit"}')
    with pytest.raises(DataError, match="no usable 'stats'"):
        evaluate(runs / "ref", [("unit", tmp_path / "unit")], OPTIONS, progress=False, figure_cases=0)


def test_outputs_and_report_with_comparison(runs, tmp_path):
    result = evaluate(runs / "ref", [("base", runs / "base"), ("post", runs / "pt")], OPTIONS, progress=False,
                      figure_cases=2)
    out = tmp_path / "eval"
    write_csv(out / "cases.csv", result, "cases")
    report = write_report(out, result)
    with open(out / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["base"] * 3 + ["post"] * 3
    assert any(r["normalized_dwi_lesion_mae"] == "" for r in rows)  # undefined: empty cell
    info = summary(result)
    diff = info["differences"]["post - base"]["normalized"]
    for channel in ("dwi", "adc"):
        for metric in ("mae", "psnr", "ms_ssim", "lesion_mae"):
            assert diff[channel][metric]["improved"] is True, (channel, metric)
    assert info["runs"]["base"]["fid"] == {"available": False, "reason": "no FID weights file given"}
    html = report.read_text()
    assert len(result.figures) == 2 and all(f.lesion_pixels > 0 for f in result.figures)
    images = [part.split('"')[0] for part in html.split('<img src="')[1:]]
    assert len(images) == 1 + 2 * (1 + 2 * (1 + 2 * 2))  # colorbar; per figure: CTP, per channel ref + 2 x (synth, error)
    for name in images:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert "<th>DWI &Delta;</th>" in html and "FID unavailable: no FID weights file given" in html
    assert "MS-SSIM: 2 scales" in html and "the paper's has 5 scales" in html
    # A second report into the same folder keeps only its own figures (the first one's would
    # travel with it when the folder is copied).
    (out / "figures" / "old-run.png").write_bytes(b"")
    one = evaluate(runs / "ref", [("base", runs / "base")], OPTIONS, progress=False, figure_cases=1)
    html = write_report(out, one).read_text()
    shown = {part.split('"')[0] for part in html.split('<img src="')[1:]}
    assert {f"figures/{p.name}" for p in (out / "figures").iterdir()} == shown


def test_cli_end_to_end_and_errors(runs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "ldmfast", "evaluate", *map(str, args), "--quiet"],
                              capture_output=True, text=True, timeout=120)

    ok = run("--pred", runs / "base", "--ref", runs / "ref", "--out", tmp_path / "e", "--ms-ssim-scales", "2",
             "--figure-slice", "phantom_000:2")
    assert ok.returncode == 0, ok.stderr
    info = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert info["settings"]["default_scale"] == "normalized" and info["runs"]["base"]["n_cases"] == 3
    assert (tmp_path / "e" / "figures" / "phantom_000_z002_dwi_ref.png").is_file()
    # 64 x 64 slices and 5 scales: the error says why and what to do.
    small = run("--pred", runs / "base", "--ref", runs / "ref", "--out", tmp_path / "f")
    assert small.returncode == 2 and "ms_ssim_scales: 5 scales need slices of at least 176" in small.stderr
    assert "(at most 3 scales fit: --ms-ssim-scales 3)" in small.stderr
    bad = run("--pred", runs / "base", "--ref", runs / "ref", "--out", tmp_path / "g", "--fid-weights", tmp_path / "none.pth")
    assert bad.returncode == 2 and "none.pth not found" in bad.stderr
    missing = run("--pred", tmp_path / "nowhere", "--ref", runs / "ref", "--out", tmp_path / "h")
    assert missing.returncode == 2 and "prediction folder not found" in missing.stderr


@pytest.mark.parametrize("args, message", [
    (["--error-max", "0"], "--error-max: must be a positive number"),
    (["--error-max", "nan"], "--error-max: must be a positive number"),
    (["--figure-cases", "-1"], "--figure-cases: must be >= 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--device", "bogus"], "--device:"),
    (["--device", "cuda:99"], "--device: cuda:99 is not available"),
    (["--figure-slice", "phantom_999:2"], "figure slice: no evaluated case ['phantom_999']"),
])
def test_cli_refuses_bad_arguments_before_writing(runs, tmp_path, capsys, args, message):
    from ldmfast.cli import main

    out = tmp_path / "out"
    assert main(["evaluate", "--pred", str(runs / "base"), "--ref", str(runs / "ref"), "--out", str(out),
                 "--ms-ssim-scales", "2", "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # no result beside an error
    (tmp_path / "file").write_text("")
    assert main(["evaluate", "--pred", str(runs / "base"), "--ref", str(runs / "ref"), "--out",
                 str(tmp_path / "file" / "out"), "--quiet"]) == 2
    assert "--out: cannot create" in capsys.readouterr().err


def test_ctrl_c_ends_with_a_message(runs, tmp_path, capsys, monkeypatch):
    from ldmfast.cli import main
    from ldmfast.metrics import evaluate as evaluate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    assert main(["evaluate", "--pred", str(runs / "base"), "--ref", str(runs / "ref"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 130
    assert "ldmfast evaluate: interrupted: results are written at the end only" in capsys.readouterr().err


def test_pairing_and_shape_errors(runs, tmp_path):
    import shutil

    import nibabel as nib

    pred = tmp_path / "pred"
    shutil.copytree(runs / "base", pred)
    (pred / "stranger").mkdir()
    with pytest.raises(DataError, match=r"case 'stranger'.*no reference case"):
        evaluate(runs / "ref", [("p", pred)], OPTIONS, progress=False)
    shutil.rmtree(pred / "stranger")
    # A reference case without prediction is left out and listed, even one without DWI/ADC; the
    # results folder inside the prediction folder is no case.
    shutil.rmtree(pred / "phantom_002")
    ref = tmp_path / "ref"
    shutil.copytree(runs / "ref", ref)
    (ref / "phantom_002" / "dwi.nii.gz").unlink()
    (pred / "eval").mkdir()
    result = evaluate(ref, [("p", pred)], OPTIONS, progress=False, figure_cases=0, exclude=(pred / "eval",))
    assert result.not_predicted == ["phantom_002"] and len(result.runs[0].case_rows) == 2
    shutil.rmtree(pred / "eval")
    (ref / "phantom_001" / "adc.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case 'phantom_001'.*no ADC file to compare with"):
        evaluate(ref, [("p", pred)], OPTIONS, progress=False)
    # A prediction on another grid: named by case and file.
    path = pred / "phantom_000" / "adc.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros((32, 64, 5), np.float32), img.affine), path)
    with pytest.raises(DataError, match=r"case 'phantom_000', file .*adc.nii.gz: shape \(32, 64, 5\) differs"):
        evaluate(runs / "ref", [("p", pred)], OPTIONS, progress=False)
    (pred / "phantom_000" / "dwi.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case 'phantom_000'.*missing synthesized DWI"):
        evaluate(runs / "ref", [("p", pred)], OPTIONS, progress=False)
    # Damaged gzip data (the header reads, the voxels do not): named like any unreadable file.
    shutil.rmtree(pred / "phantom_000")
    shutil.copytree(runs / "base" / "phantom_000", pred / "phantom_000")
    path = pred / "phantom_001" / "dwi.nii.gz"
    data = bytearray(path.read_bytes())
    data[200:208] = bytes(b ^ 0xFF for b in data[200:208])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"case 'phantom_001', file .*dwi.nii.gz: cannot read as NIfTI"):
        evaluate(runs / "ref", [("p", pred)], OPTIONS, progress=False, figure_cases=0)


def _decode_png(data: bytes) -> np.ndarray:
    """A minimal independent decoder for the encoder's output (8-bit, filter 0)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, channels).squeeze()


def test_png_round_trip_and_contour():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(encode_png(rgb)), rgb)
    gray = rgb[..., 0].copy()
    np.testing.assert_array_equal(_decode_png(encode_png(gray)), gray)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.float32))
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    ring = contour(mask)
    assert ring.sum() == 16 and not ring[2:5, 2:5].any()


class _TinyExtractor(torch.nn.Module):
    """Stands in for InceptionV3 (tested in test_metrics_fid.py), which is slow on a shared CPU."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 32, 4, stride=4)

    def prepare(self, x):
        return x.expand(-1, 3, -1, -1)

    def forward(self, x):
        return torch.tanh(self.proj(x)).mean(dim=(2, 3))


def test_fid_is_reported_with_an_extractor(runs):
    torch.manual_seed(0)
    model = _TinyExtractor().eval()
    model.description = "tiny features (weights tiny.pth)"  # as load_extractor names what it loaded
    result = evaluate(runs / "ref", [("base", runs / "base"), ("post", runs / "pt")], OPTIONS, extractor=model,
                      progress=False, figure_cases=0)
    assert result.settings["fid_features"] == "tiny features (weights tiny.pth)"
    base, post = (run.fid for run in result.runs)
    assert base["available"] and base["n_slices"] == len(result.runs[0].slice_rows)
    assert post["dwi"] < base["dwi"] and post["adc"] < base["adc"]  # less noise, closer features
    assert summary(result)["differences"]["post - base"]["fid"]["dwi"]["improved"] is True


def _write_draws(runs, out, draws: int, record_samples=None, seed=0):
    """Each reference case synthesized `draws` times (reference + noise of another size per
    draw), as `ldmfast synthesize --samples` writes them; returns nothing."""
    from ldmfast.synthesis import prepare_case, write_case

    rng = np.random.default_rng(seed)
    for files in find_cases(runs / "ref"):
        case = prepare_case(files, frames=15, multiple=8)
        target = preprocess_case(load_case(files)).target
        assert target.shape[0] == len(case.prepared.slice_index)  # (phantom: the same usable slices)
        images = np.stack([target + rng.normal(0, 0.05 * (k + 1), target.shape) for k in range(draws)])
        write_case(out, case, images.astype(np.float32), {"samples": draws if record_samples is None else record_samples})


def test_several_samples_per_case_are_averaged_over_their_draws(runs, tmp_path):
    # Two draws per case: with samples "all" (the default) each slice and volume value is the mean
    # of the values the draws score alone; "first" scores draw 0 alone.
    import shutil

    from ldmfast.data import sample_paths

    _write_draws(runs, tmp_path / "two", 2)
    for k in range(2):  # each draw alone, as a one-sample folder
        for files in find_cases(runs / "ref"):
            case_dir = tmp_path / f"draw{k}" / files.case_id
            case_dir.mkdir(parents=True)
            for name, path in sample_paths(tmp_path / "two", files.case_id, k).items():
                shutil.copy(path, case_dir / f"{name}.nii.gz")
            record = json.loads((tmp_path / "two" / files.case_id / "synthesis.json").read_text())
            (case_dir / "synthesis.json").write_text(json.dumps({**record, "samples": 1}))
    result = evaluate(runs / "ref", [("two", tmp_path / "two"), ("d0", tmp_path / "draw0"), ("d1", tmp_path / "draw1")],
                      OPTIONS, progress=False, figure_cases=1)
    assert result.settings["samples"] == "all"
    assert result.settings["draws_per_case"] == {"two": {"2": 3}, "d0": {"1": 3}, "d1": {"1": 3}}
    two, d0, d1 = result.runs
    assert [r["draws"] for r in two.case_rows] == [2] * 3 and d0.case_rows[0]["draws"] == 1  # (cases.csv's column)
    keys = [k for k in two.case_rows[0] if k.startswith(("normalized_", "original_"))]
    assert len(keys) == 20
    for level in ("case_rows", "slice_rows"):
        for a, b, c in zip(getattr(two, level), getattr(d0, level), getattr(d1, level)):
            for key in keys:
                assert a[key] == pytest.approx((b[key] + c[key]) / 2, rel=1e-9, nan_ok=True), (level, key)
    assert two.case_rows[0]["normalized_dwi_mae"] != pytest.approx(d0.case_rows[0]["normalized_dwi_mae"], rel=0.05)
    np.testing.assert_array_equal(result.figures[0].predictions["two"], result.figures[0].predictions["d0"])
    html = write_report(tmp_path / "eval", result).read_text()
    assert "mean over a case's draws" in html and "two: 3 case(s) x 2" in html

    first = evaluate(runs / "ref", [("two", tmp_path / "two"), ("d0", tmp_path / "draw0")],
                     EvaluateOptions(ms_ssim_scales=2, samples="first"), progress=False, figure_cases=0)
    assert first.settings["draws_per_case"] == {"two": {"1": 3}, "d0": {"1": 3}}
    for a, b in zip(first.runs[0].case_rows, first.runs[1].case_rows):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), a["case_id"]  # (NaN == NaN)
    with pytest.raises(ValueError, match="samples"):
        EvaluateOptions(samples="mean")


def test_a_missing_sample_or_a_bad_sample_count_is_named(runs, tmp_path):
    _write_draws(runs, tmp_path / "two", 2)
    case_id = find_cases(runs / "ref")[1].case_id
    (tmp_path / "two" / case_id / "adc_s1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"adc_s1\.nii\.gz: missing synthesized ADC file of sample 1 \(the synthesis record lists 2 samples"):
        evaluate(runs / "ref", [("two", tmp_path / "two")], OPTIONS, progress=False, figure_cases=0)
    # draw 0 alone is still measurable (the command line's --samples first)
    from ldmfast.cli import main

    args = ["evaluate", "--pred", str(tmp_path / "two"), "--ref", str(runs / "ref"), "--ms-ssim-scales", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 2
    assert main([*args, "--out", str(tmp_path / "first"), "--samples", "first"]) == 0
    assert json.loads((tmp_path / "first" / "summary.json").read_text())["settings"]["samples"] == "first"
    _write_draws(runs, tmp_path / "bad", 1, record_samples="2")
    with pytest.raises(DataError, match="'samples' must be an integer >= 1, got '2'"):
        evaluate(runs / "ref", [("bad", tmp_path / "bad")], OPTIONS, progress=False, figure_cases=0)


def test_fid_counts_every_draw_and_runs_of_other_counts_are_not_compared(runs, tmp_path):
    torch.manual_seed(0)
    model = _TinyExtractor().eval()
    _write_draws(runs, tmp_path / "two", 2)
    result = evaluate(runs / "ref", [("base", runs / "base"), ("two", tmp_path / "two")], OPTIONS, extractor=model,
                      progress=False, figure_cases=0)
    base, two = (run.fid for run in result.runs)
    assert two["n_slices"] == 2 * base["n_slices"] == 2 * len(result.runs[0].slice_rows)
    assert "fid" not in summary(result)["differences"]["two - base"]  # FID depends on the count
    html = write_report(tmp_path / "eval", result).read_text()
    assert f"over {base['n_slices']} slices (base), {two['n_slices']} slices (two)" in html
    assert "do not compare; nor do these runs' values, FID depending on the slice count" in html
