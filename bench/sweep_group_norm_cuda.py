"""Launch-setting sweep of the CUDA GroupNorm + SiLU kernels on a GPU: every shape of
bench_group_norm.py (both formats, float32 and bfloat16, forward and forward+backward) under
alternative settings, one changed at a time from the defaults, timed as kernels alone (CUDA
graphs, common.graph_ms) and checked against the default setting's outputs first.

    python bench/sweep_group_norm_cuda.py [--out FILE.json] [--only fused_backward,l2_chunk_bytes]

The settings are those of `ldmfast._cuda.group_norm_set_tuning` (kernels/group_norm.cu, struct
Tuning). The winners become the defaults there; this script is how they are chosen.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_group_norm import GROUPS, SHAPES, fused, make_inputs  # noqa: E402

from ldmfast.ops import _native  # noqa: E402

# One field changed at a time (the fused backward also at 256 threads); {} is the default.
SETTINGS = [{}, {"fused_threads": 256}, {"fused": False}, {"fused_min_groups": 1024},
            {"fused_16bit": False}, {"map_items_16bit": 4}, {"fit_waves": False}, {"fused_backward": True},
            {"fused_backward": True, "fused_threads": 256},
            {"l2_chunk_bytes": 8 << 20}, {"l2_chunk_bytes": 16 << 20}, {"l2_chunk_bytes": 24 << 20},
            {"target_blocks_cl": 256}, {"target_blocks_cl": 1024},
            {"target_blocks": 512}, {"target_blocks": 2048},
            {"min_per_warp": 256}, {"min_per_warp": 4096}, {"min_rows": 8}, {"min_rows": 128},
            {"min_per_block": 1024}, {"min_per_block": 16384}]
# Different partial sums change float32 rounding only; bf16 outputs may move by one unit.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def select_settings(only: str | None) -> list[dict]:
    """The default and, with `only` (comma-separated names), just the settings that change one of
    those fields; ValueError naming an unknown field."""
    if not only:
        return SETTINGS
    names = set(only.split(","))
    unknown = names - {k for setting in SETTINGS for k in setting}
    if unknown:
        raise ValueError(f"--only: no setting named {', '.join(sorted(unknown))}")
    return [SETTINGS[0]] + [setting for setting in SETTINGS[1:] if names & set(setting)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def run_case(x, w, b, dy, pass_name):
    """The op's outputs (y, and the three gradients for fwd+bwd) and a function to time."""
    if pass_name == "fwd":
        def fn():
            with torch.no_grad():
                return (fused(x, w, b),)
    else:
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))

        def fn():
            y = fused(xg, wg, bg)
            # y detached: an output that kept its autograd graph alive would keep the leaves'
            # AccumulateGrad nodes on the eager stream, which breaks a later graph capture.
            return (y.detach(),) + torch.autograd.grad(y, (xg, wg, bg), dy)
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write every timing here as JSON")
    p.add_argument("--only", help="comma-separated setting names: only the settings that change one of them "
                                  "(beside the default), for a short run")
    args = p.parse_args(argv)
    try:
        settings = select_settings(args.only)
    except ValueError as err:
        p.error(str(err))
    if not torch.cuda.is_available() or _native.cuda_module() is None:
        p.error("needs a CUDA GPU and ldmfast built with its CUDA module (LDMFAST_CUDA=on)")
    mod = _native.cuda_module()
    device = torch.device("cuda")
    records = []
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for model, c, (h, w_), n, _ in SHAPES:
                for fmt in ("contiguous", "channels_last"):
                    x, w, b, dy = make_inputs(n, c, h, w_, dtype, device, fmt)
                    for pass_name in ("fwd", "fwd+bwd"):
                        fn = run_case(x, w, b, dy, pass_name)
                        mod.group_norm_set_tuning()
                        want = [t.clone() for t in fn()]
                        case = {"model": model, "C": c, "HxW": f"{h}x{w_}", "N": n, "dtype": str(dtype)[6:],
                                "format": fmt, "pass": pass_name, "settings": []}
                        for setting in settings:
                            mod.group_norm_set_tuning(**setting)
                            err = max(rel_err(g, e) for g, e in zip(fn(), want))
                            entry = {"setting": setting, "max_rel_err": err}
                            if err <= TOLERANCE[dtype]:
                                with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                                    entry["ms"] = common.graph_ms([fn])[0]
                            case["settings"].append(entry)
                        records.append(case)
                        report(case)
    finally:
        mod.group_norm_set_tuning()
    summarize(records, settings)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "groups": GROUPS,
                                              "records": records}, indent=1))
    return 0


def report(case) -> None:
    default = case["settings"][0].get("ms")
    timed = [s for s in case["settings"] if s.get("ms")]
    best = min(timed, key=lambda s: s["ms"]) if timed else None
    bad = [s["setting"] for s in case["settings"] if "ms" not in s]
    line = (f"{case['model']} {case['C']}@{case['HxW']} {case['dtype']} {case['format']} {case['pass']}: "
            f"default {default:.4f} ms" if default else f"{case['model']} {case['C']}: default failed")
    if best and default:
        line += f", best {best['setting'] or 'default'} {best['ms']:.4f} ms ({default / best['ms']:.2f}x)"
    if bad:
        line += f"; MISMATCH or failed: {bad}"
    print(line, flush=True)


def summarize(records, settings) -> None:
    """Each setting's geometric-mean speedup over the default across the cases it ran."""
    print("\nsetting: geomean speedup over the default (cases)")
    for i, setting in enumerate(settings[1:], start=1):
        ratios = [r["settings"][0]["ms"] / r["settings"][i]["ms"] for r in records
                  if r["settings"][0].get("ms") and r["settings"][i].get("ms")]
        if ratios:
            geo = statistics.geometric_mean(ratios)
            print(f"    {setting}: {geo:.3f} ({len(ratios)} cases, min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    sys.exit(main())
