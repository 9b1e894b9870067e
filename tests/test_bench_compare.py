"""bench/compare_results.py: rows of two saved results matched on their non-float fields."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare_results  # noqa: E402


def _write(path, rows):
    path.write_text(json.dumps({"info": {}, "rows": rows}))
    return path


def test_ratios_per_matched_row_and_their_geomean(tmp_path, capsys):
    old = _write(tmp_path / "old.json", [
        {"model": "unet", "C": 224, "pass": "fwd", "ms": 2.0},
        {"model": "unet", "C": 224, "pass": "fwd+bwd", "ms": 4.0},
        {"model": "vqgan", "C": 128, "pass": "fwd", "ms": 1.0},  # not in new: left out
    ])
    new = _write(tmp_path / "new.json", [
        {"model": "unet", "C": 224, "pass": "fwd", "ms": 1.0},
        {"model": "unet", "C": 224, "pass": "fwd+bwd", "ms": 8.0},
        {"model": "unet", "C": 896, "pass": "fwd", "ms": 3.0},  # not in old: left out
    ])
    table = compare_results.compare(compare_results._rows(old), compare_results._rows(new), "ms")
    assert [(label, ratio) for label, _, _, ratio in table] == [("unet 224 fwd", 0.5), ("unet 224 fwd+bwd", 2.0)]
    assert compare_results.main([str(old), str(new), "--metric", "ms"]) == 0
    out = capsys.readouterr().out
    assert f"geomean new/old of ms: {math.sqrt(0.5 * 2.0):.3f} over 2 rows" in out


def test_missing_metric_and_missing_file(tmp_path, capsys):
    old = _write(tmp_path / "old.json", [{"model": "unet", "ms": 2.0}])
    assert compare_results.main([str(old), str(old), "--metric", "GBps"]) == 1
    assert "no rows with 'GBps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_results.main([str(old), str(tmp_path / "absent.json")])
    assert "absent.json: no such file" in capsys.readouterr().err
