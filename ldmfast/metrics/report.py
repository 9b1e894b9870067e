"""The HTML report of an evaluation: figures of chosen slices (CTP frame, reference and
synthesized DWI/ADC with the lesion contour, error maps), metric tables and, for two runs,
a side-by-side comparison with per-metric differences. PNG figures sit beside report.html
in figures/, so the folder can be copied or zipped as a whole."""

from __future__ import annotations

import datetime
import html
import math
import os
import re
from pathlib import Path

import numpy as np

from ldmfast.data.atomic import atomic_path

from . import png
from .extractors import FEATURE_DIM
from .image import MS_SSIM_WEIGHTS
from .evaluate import CHANNELS, CTP_WINDOW, DEFAULT_SCALE, HIGHER_IS_BETTER, METRICS, SCALES, Evaluation, FigureSlice, column
from .results import summary

METRIC_NAMES = {"mae": "MAE", "psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "lesion_mae": "lesion MAE"}
#: Error maps saturate at this absolute error in the normalized scale (a quarter of its range).
DEFAULT_ERROR_MAX = 0.5
_MIN_PANEL_PIXELS = 200

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1600px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.better { background: #dff3df; } .worse { background: #f8dcdc; }
.figure td, .figure th { border: none; text-align: center; vertical-align: top; padding: 2px; font-size: 0.8em; }
.figure td { max-width: 180px; }
.figure img { display: block; width: 176px; height: auto; image-rendering: pixelated; }
.note { color: #555; font-size: 0.9em; } .undefined { color: #999; }
"""


def _fmt(value, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="undefined">undefined</span>'
    if isinstance(value, str) or math.isinf(value):
        return html.escape(str(value))
    digits = 2 if metric == "psnr" else 4
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.1f}"


def _panel(path: Path, rgb: np.ndarray) -> str:
    """Write a panel PNG (enlarged so small slices stay legible) and return its <img>."""
    factor = max(1, math.ceil(_MIN_PANEL_PIXELS / max(rgb.shape[:2])))
    png.write_png(path, png.upscale(rgb, factor))
    return f'<img src="figures/{html.escape(path.name)}" alt="{html.escape(path.stem)}">'


def _draws_text(settings: dict) -> str:
    """A sentence on the draws measured per case where some case had more than one (else "")."""
    draws = settings.get("draws_per_case", {})
    if all(set(found) <= {"1"} for found in draws.values()):
        return ""
    per_run = "; ".join(f"{html.escape(label)}: " + ", ".join(f"{n} case(s) x {k}" for k, n in found.items())
                        for label, found in draws.items())
    return (f"Several synthesized samples per case ({per_run}): every value is the mean over a case's draws; the "
            "figures show draw 0, with the slice's mean values under them. ")


def _figure_html(fig: FigureSlice, labels: list[str], folder: Path, error_max: float, metrics: dict) -> str:
    """Rows DWI and ADC; columns CTP, reference, then each run's synthesis and error map."""
    stem = f"{fig.case_id}_z{fig.z:03d}"
    lesion = png.to_display(fig.lesion)
    ctp = _panel(folder / f"{stem}_ctp.png", png.gray(png.to_display(fig.ctp), *CTP_WINDOW))
    head = "<tr><th></th><th>CTP frame {}</th><th>reference</th>".format(fig.frame)
    head += "".join(f"<th>{html.escape(label)}</th><th>|error| {html.escape(label)}</th>" for label in labels) + "</tr>"
    rows = []
    for c, channel in enumerate(CHANNELS):
        ref = png.to_display(fig.reference[c])
        cells = [f"<th>{channel.upper()}</th>"]
        cells.append(f'<td rowspan="2">{ctp}</td>' if c == 0 else "")
        cells.append("<td>" + _panel(folder / f"{stem}_{channel}_ref.png", png.draw_contour(png.gray(ref, -1, 1), lesion)) + "</td>")
        for k, label in enumerate(labels):
            pred = png.to_display(fig.predictions[label][c])
            synth = png.draw_contour(png.gray(pred, -1, 1), lesion)
            error = png.draw_contour(png.error_colormap(np.abs(pred - ref), error_max), lesion)
            m = metrics.get(label, {})
            caption = ", ".join(
                f"{METRIC_NAMES[name]} {_fmt(m.get(column(DEFAULT_SCALE, channel, name)), name)}"
                for name in ("mae", "psnr", "ms_ssim", "lesion_mae"))
            cells.append("<td>" + _panel(folder / f"{stem}_{channel}_run{k}.png", synth) + "</td>")
            cells.append("<td>" + _panel(folder / f"{stem}_{channel}_run{k}_error.png", error) + f"<br>{caption}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    title = f"case {html.escape(fig.case_id)}, slice {fig.z} ({fig.lesion_pixels} lesion pixels)"
    return f"<h3>{title}</h3><table class=\"figure\">{head}{''.join(rows)}</table>"


def _dataset_table(info: dict, labels: list[str], scale: str) -> str:
    """Metrics down, channel x run across; with two runs the difference of the second."""
    head = ["<tr><th class=name>metric</th>"]
    for channel in CHANNELS:
        head += [f"<th>{channel.upper()} {html.escape(label)}</th>" for label in labels]
        if len(labels) > 1:
            head.append(f"<th>{channel.upper()} &Delta;</th>")
    rows = ["".join(head) + "</tr>"]
    for metric in METRICS:
        cells = [f"<td class=name>{METRIC_NAMES[metric]} {'&uarr;' if HIGHER_IS_BETTER[metric] else '&darr;'}</td>"]
        for channel in CHANNELS:
            entries = [info["runs"][label]["dataset"][scale][channel][metric] for label in labels]
            for e in entries:
                spread = "" if e["mean"] is None else f" &plusmn; {_fmt(e['std'], metric)}"
                cells.append(f"<td>{_fmt(e['mean'], metric)}{spread} <span class=note>(n={e['n']})</span></td>")
            if len(labels) > 1:
                d = info["differences"][f"{labels[1]} - {labels[0]}"][scale][channel][metric]
                cls = "" if d["improved"] is None else (' class="better"' if d["improved"] else ' class="worse"')
                value = d["difference"]
                cells.append(f"<td{cls}>{'' if value is None or value < 0 else '+'}{_fmt(value, metric)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _ms_ssim_text(ms: dict) -> str:
    """What MS-SSIM was computed with: the paper's is 5 scales; fewer (small slices) give other values."""
    scales = len(ms["weights"])
    return (f"MS-SSIM: {scales} scale{'s' if scales > 1 else ''} (weights {', '.join(f'{w:g}' for w in ms['weights'])}), "
            f"Gaussian window {ms['window']}, sigma {ms['sigma']:g}"
            + ("." if scales == len(MS_SSIM_WEIGHTS) else f"; the paper's has {len(MS_SSIM_WEIGHTS)} scales."))


def _fid_html(info: dict, labels: list[str], features: str | None) -> str:
    runs = info["runs"]
    if not any(runs[label]["fid"]["available"] for label in labels):
        reason = runs[labels[0]]["fid"]["reason"]
        return f"<p>FID unavailable: {html.escape(reason)}.</p>"
    counts = {label: runs[label]["fid"]["n_slices"] for label in labels if runs[label]["fid"]["available"]}
    n = min(counts.values())
    same = len(set(counts.values())) == 1
    over = (f"{n} slices per run" if same  # (several draws per case count each draw's slices)
            else ", ".join(f"{k} slices ({html.escape(label)})" for label, k in counts.items()))
    note = (f"<p class=note>Fréchet distance of {html.escape(features or 'extractor')} over {over} "
            "and channel, normalized scale; lower is better. Values from other extractors or weights do not compare"
            + ("" if same else "; nor do these runs' values, FID depending on the slice count")
            + (f"; with fewer slices than the {FEATURE_DIM} feature dimensions FID is biased upwards and compares only "
               "between runs of the same slice count" if n < FEATURE_DIM else "") + ".</p>")
    rows = ["<tr><th class=name>run</th>" + "".join(f"<th>FID {c.upper()}</th>" for c in CHANNELS) + "</tr>"]
    for label in labels:
        fid = runs[label]["fid"]
        cells = [f"<td>{_fmt(fid.get(c))}</td>" if fid["available"] else f"<td>{html.escape(fid['reason'])}</td>" for c in CHANNELS]
        rows.append(f"<tr><td class=name>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return note + "<table>" + "".join(rows) + "</table>"


def _case_table(evaluation: Evaluation, labels: list[str]) -> str:
    """Per case, default scale: each metric for each run (and the difference)."""
    shown = [(channel, metric) for channel in CHANNELS for metric in ("mae", "psnr", "ms_ssim", "lesion_mae")]
    head = "<tr><th class=name>case</th><th>slices</th><th>lesion voxels</th>"
    for channel, metric in shown:
        head += "".join(f"<th>{channel.upper()} {METRIC_NAMES[metric]} {html.escape(lb)}</th>" for lb in labels)
        if len(labels) > 1:
            head += "<th>&Delta;</th>"
    rows = [head + "</tr>"]
    by_run = [{r["case_id"]: r for r in run.case_rows} for run in evaluation.runs]
    for row in evaluation.runs[0].case_rows:
        cid = row["case_id"]
        cells = [f"<td class=name>{html.escape(cid)}</td><td>{row['n_slices']}</td><td>{row['lesion_voxels']}</td>"]
        for channel, metric in shown:
            key = column(DEFAULT_SCALE, channel, metric)
            values = [runs[cid][key] for runs in by_run]
            cells += [f"<td>{_fmt(v, metric)}</td>" for v in values]
            if len(labels) > 1:
                d = values[1] - values[0]
                ok = not math.isnan(d) and d != 0
                cls = "" if not ok else (' class="better"' if (d > 0) == HIGHER_IS_BETTER[metric] else ' class="worse"')
                cells.append(f"<td{cls}>{_fmt(d, metric)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_report(out_dir: str | os.PathLike, evaluation: Evaluation, *, error_max: float = DEFAULT_ERROR_MAX) -> Path:
    """Write out_dir/report.html and out_dir/figures/*.png; return the HTML's path."""
    if not error_max > 0:
        raise ValueError(f"error_max: must be positive, got {error_max}")
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    info = summary(evaluation)
    labels = [run.label for run in evaluation.runs]
    settings = evaluation.settings

    slice_metrics = {}
    for run in evaluation.runs:
        for row in run.slice_rows:
            slice_metrics.setdefault((row["case_id"], row["slice"]), {})[run.label] = row
    png.write_png(figures / "colorbar.png", png.colorbar())

    parts = [f"<!DOCTYPE html><html><head><meta charset=utf-8><title>ldmfast evaluation</title><style>{_STYLE}</style></head><body>"]
    parts.append("<h1>ldmfast evaluation: synthesized DWI/ADC against the reference</h1>")
    runs_text = "; ".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}" for k, v in settings["runs"].items())
    parts.append(
        f"<p class=note>Reference: {html.escape(settings['reference'])}. Runs: {runs_text}. "
        f"{info['runs'][labels[0]]['n_cases']} cases, {info['runs'][labels[0]]['n_slices']} slices. "
        f"Region: {html.escape(settings['region_meaning'])}. {_draws_text(settings)}"
        f"Written {datetime.datetime.now():%Y-%m-%d %H:%M}.</p>")
    if evaluation.not_predicted:
        parts.append(f"<p class=note>Reference cases without prediction (not evaluated): "
                     f"{html.escape(', '.join(evaluation.not_predicted))}.</p>")

    parts.append("<h2>Data set</h2>")
    parts.append("<p class=note>Mean &plusmn; standard deviation over volumes; n counts volumes where the metric is "
                 "defined (lesion MAE: volumes with a lesion). &uarr;/&darr;: higher/lower is better. "
                 + _ms_ssim_text(settings["ms_ssim"])
                 + (f" &Delta;: {html.escape(labels[1])} minus {html.escape(labels[0])}, green where better." if len(labels) > 1 else "")
                 + "</p>")
    for scale in SCALES:
        parts.append(f"<h3>{scale} scale{' (default, as in the paper)' if scale == DEFAULT_SCALE else ''}</h3>"
                     f"<p class=note>{html.escape(settings['scales'][scale])}.</p>")
        parts.append(_dataset_table(info, labels, scale))
    parts.append("<h3>FID</h3>" + _fid_html(info, labels, settings.get("fid_features")))

    parts.append("<h2>Slices</h2>")
    parts.append(
        "<p class=note>Normalized scale, shown from -1 (black) to 1 (white); CTP at its peak-enhancement frame, window "
        "0-100 HU. Red: lesion contour (reference mask). Error maps: |synthesized - reference| from 0 to "
        f"{error_max:g}:</p><p><img src=\"figures/colorbar.png\" alt=\"colorbar\" width=256 height=12> "
        f"<span class=note>0 &rarr; {error_max:g}</span></p>")
    if not evaluation.figures:
        parts.append("<p class=note>No slice chosen for figures.</p>")
    for fig in evaluation.figures:
        parts.append(_figure_html(fig, labels, figures, error_max, slice_metrics.get((fig.case_id, fig.z), {})))

    parts.append("<h2>Cases</h2><p class=note>Normalized scale; every metric, scale and slice is in "
                 "<a href=cases.csv>cases.csv</a> and <a href=slices.csv>slices.csv</a>; settings and statistics in "
                 "<a href=summary.json>summary.json</a>.</p>")
    parts.append(_case_table(evaluation, labels))
    parts.append("</body></html>\n")

    path = out_dir / "report.html"
    text = "".join(parts)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    # An earlier report's figures in the same folder (other cases, runs, slices) would travel with
    # this one when the folder is copied: only what this report shows stays.
    shown = {html.unescape(name) for name in re.findall(r'src="figures/([^"]+)"', text)}
    for old in figures.glob("*.png"):
        if old.name not in shown:
            old.unlink(missing_ok=True)
    return path
