"""Two saved results of one benchmark side by side: a metric's value in each and their ratio, row by
row (rows matched on their non-float fields: model, shape, dtype, pass...), then the geometric mean
of the ratios. For "did this change help" across leases, where one run cannot hold both builds.

    python bench/compare_results.py OLD.json NEW.json [--metric dev_ours_ms]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(f"{path}: no list of result rows")
    return rows


def _key(row: dict) -> tuple:
    """The row's identity: its fields that are not measurements (floats), in the file's order."""
    return tuple((k, v) for k, v in row.items() if not isinstance(v, float) and v is not None)


def compare(old: list[dict], new: list[dict], metric: str) -> list[tuple[str, float, float, float]]:
    """(row label, old value, new value, new / old) for the rows both have with `metric` set."""
    before = {_key(r): r for r in old}
    out = []
    for r in new:
        o = before.get(_key(r))
        if o is None or not isinstance(o.get(metric), (int, float)) or not isinstance(r.get(metric), (int, float)):
            continue
        label = " ".join(str(v) for _, v in _key(r))
        out.append((label, float(o[metric]), float(r[metric]), float(r[metric]) / float(o[metric])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--metric", default="dev_ours_ms", help="a numeric field of the rows (default: %(default)s)")
    args = p.parse_args(argv)
    for path in (args.old, args.new):
        if not path.is_file():
            p.error(f"{path}: no such file")
    table = compare(_rows(args.old), _rows(args.new), args.metric)
    if not table:
        print(f"no rows with {args.metric!r} in both files", file=sys.stderr)
        return 1
    width = max(len(t[0]) for t in table)
    print(f"{'row':<{width}}  {'old':>10}  {'new':>10}  new/old")
    for label, o, n, ratio in table:
        print(f"{label:<{width}}  {o:10.4g}  {n:10.4g}  {ratio:7.3f}")
    ratios = [t[3] for t in table if t[3] > 0]
    print(f"geomean new/old of {args.metric}: {statistics.geometric_mean(ratios):.3f} "
          f"over {len(ratios)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
