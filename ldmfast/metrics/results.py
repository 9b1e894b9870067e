"""Writing an evaluation's numbers: per-case and per-slice CSV, summary JSON (atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from ldmfast.data.atomic import atomic_path

from .evaluate import Evaluation, dataset_summary, differences


def _cell(value):
    """CSV cell: undefined (NaN) is empty, so spreadsheets and pandas read it as missing."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return value


def _json_safe(value):
    """NaN -> null (undefined), +-inf -> "inf"/"-inf": strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(path: str | os.PathLike, evaluation: Evaluation, level: str) -> Path:
    """One row per run and case (level "cases") or per run and slice ("slices")."""
    rows = [{"run": run.label, **row} for run in evaluation.runs
            for row in (run.case_rows if level == "cases" else run.slice_rows)]
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return _write_text(Path(path), buffer.getvalue())


def summary(evaluation: Evaluation) -> dict:
    """Settings, per-run data-set statistics and FID, and (with two runs or more) each run's
    differences from the first."""
    runs = {run.label: {"pred_dir": str(run.pred_dir), "n_cases": len(run.case_rows), "n_slices": len(run.slice_rows),
                        "dataset": dataset_summary(run), "fid": run.fid} for run in evaluation.runs}
    out = {"settings": evaluation.settings, "runs": runs, "not_predicted": evaluation.not_predicted}
    base = evaluation.runs[0]
    if len(evaluation.runs) > 1:
        out["differences"] = {}
        for run in evaluation.runs[1:]:
            diff = differences(runs[base.label]["dataset"], runs[run.label]["dataset"])
            # FID depends on the slice count (draws included): only runs of the same count compare.
            if (base.fid.get("available") and run.fid.get("available")
                    and base.fid["n_slices"] == run.fid["n_slices"]):
                diff["fid"] = {ch: {"difference": run.fid[ch] - base.fid[ch], "improved": run.fid[ch] < base.fid[ch]}
                               for ch in ("dwi", "adc")}
            out["differences"][f"{run.label} - {base.label}"] = diff
    return out


def write_summary(path: str | os.PathLike, evaluation: Evaluation) -> Path:
    return _write_text(Path(path), json.dumps(_json_safe(summary(evaluation)), indent=1, allow_nan=False) + "\n")
