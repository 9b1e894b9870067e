"""Fused GroupNorm + SiLU against torch's GroupNorm followed by SiLU, side by side.

    python bench/bench_group_norm.py                  # CPU: a representative subset (~3 minutes)
    python bench/bench_group_norm.py --full           # CPU: every shape of PAPER.md
    python bench/bench_group_norm.py --device cuda    # GPU: every shape, with bandwidth vs a device copy
    python bench/bench_group_norm.py --threads 1 --cpu-time   # CPU time of one thread (shared machines)

Shapes (PAPER.md): the VQGAN's levels (128 channels at 192x224, 256 at 96x112, 512 at 48x56) and
the UNet's (224 channels at 48x56, 896 at 24x28, 1792 at 12x14), GroupNorm(32) + SiLU, in the
contiguous and channels-last memory formats, forward and forward+backward (gradients of x, weight
and bias). Goals: CPU >= 2x torch; H100 >= 80% of device-copy bandwidth, >= 2x torch in
channels-last and >= 1.3x in contiguous format.

On a GPU every row is timed twice: a loop of eager calls (ours_ms, torch_ms: the host's Python,
dispatch and launch time included, which decides at small sizes) and the kernels alone (dev_*: 20
calls captured in a CUDA graph and replayed), with the share of a device copy's bandwidth of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ldmfast.ops as ops  # noqa: E402

# (model, channels, (H, W), batch on the GPU, batch on the CPU)
SHAPES = [
    ("vqgan", 128, (192, 224), 8, 1),
    ("vqgan", 256, (96, 112), 8, 1),
    ("vqgan", 512, (48, 56), 8, 2),
    ("unet", 224, (48, 56), 48, 4),
    ("unet", 896, (24, 28), 48, 4),
    ("unet", 1792, (12, 14), 48, 4),
]
CPU_SUBSET = [0, 2, 3, 5]
GROUPS = 32


def make_inputs(n, c, h, w, dtype, device, fmt):
    """x, weight, bias and an output gradient of one benchmark shape, x and dy in `fmt`."""
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).to(memory_format=mf)
    return (x, torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype),
            torch.randn_like(x))


def torch_chain(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def fused(x, w, b):
    return ops.group_norm(x, GROUPS, w, b, 1e-5, "silu")


def with_backward(fn, x, w, b, dy):
    def run():
        y = fn(x, w, b)
        return torch.autograd.grad(y, (x, w, b), dy)
    return run


def device_times(ours_fn, torch_fn, copy_fn, pass_name: str, nbytes: int) -> dict:
    """The kernels' own times (CUDA graphs, common.graph_ms): the speedup and the share of copy
    bandwidth without the host overhead that the loop timing includes at small sizes."""
    with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
        ours, ref, copy = common.graph_ms([ours_fn, torch_fn, copy_fn])
    if ours is None or ref is None or copy is None:
        return {}
    return {"dev_ours_ms": ours, "dev_torch_ms": ref, "dev_speedup": ref / ours,
            "dev_of_copy_bw": copy / ours}  # the same bytes both ways


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--full", action="store_true", help="every shape on the CPU too (default: a subset)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every shape")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds of timing per pair of measurements (alternating rounds, minimum per call)")
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (CPU; default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time with this thread's CPU time (needs --threads 1): immune to other processes")
    p.add_argument("--no-graph", action="store_true",
                   help="GPU: skip the device-time columns (dev_*: CUDA-graph replays, no host overhead)")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (gpu or torch.get_num_threads() != 1):
        p.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    shapes = SHAPES if gpu or args.full else [SHAPES[i] for i in CPU_SUBSET]
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    kept_freed = not gpu and common.keep_freed_cpu_memory()
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for model, c, (h, w_), batch_gpu, batch_cpu in shapes:
            n = args.batch or (batch_gpu if gpu else batch_cpu)
            for fmt in ("contiguous", "channels_last"):
                x, w, b, dy = make_inputs(n, c, h, w_, dtype, device, fmt)
                xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
                backend = ops.resolve("group_norm", x)
                for pass_name in ("fwd", "fwd+bwd"):
                    if pass_name == "fwd":
                        ours_fn, torch_fn = (lambda: fused(x, w, b)), (lambda: torch_chain(x, w, b))
                        passes = 2  # read x, write y
                    else:
                        ours_fn = with_backward(fused, xg, wg, bg, dy)
                        torch_fn = with_backward(torch_chain, xg, wg, bg, dy)
                        passes = 5  # forward, then read x and dy, write dx
                    with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
                        ours, ref = common.alternating_min_ms([ours_fn, torch_fn], args.min_run_time, sync, clock)
                    nbytes = x.numel() * x.element_size() * passes
                    row = {"model": model, "C": c, "HxW": f"{h}x{w_}", "N": n, "dtype": str(dtype)[6:],
                           "format": fmt, "pass": pass_name, "backend": backend, "ours_ms": ours,
                           "torch_ms": ref, "speedup": ref / ours, "ours_GBps": nbytes / ours / 1e6}
                    if gpu:
                        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                        dst = torch.empty_like(src)
                        copy = common.time_ms(lambda: dst.copy_(src), args.min_run_time)
                        row["copy_GBps"] = nbytes / copy / 1e6
                        row["of_copy_bw"] = row["ours_GBps"] / row["copy_GBps"]
                        if not args.no_graph:
                            row.update(device_times(ours_fn, torch_fn, lambda: dst.copy_(src), pass_name, nbytes))
                    rows.append(row)
                    print(" ".join(f"{k}={common._fmt(v)}" for k, v in row.items()), flush=True)
    columns = ["model", "C", "HxW", "N", "dtype", "format", "pass", "backend", "ours_ms", "torch_ms", "speedup",
               "ours_GBps"]
    if gpu:
        columns += ["copy_GBps", "of_copy_bw", "dev_ours_ms", "dev_torch_ms", "dev_speedup", "dev_of_copy_bw"]
    print(f"\nGroupNorm(32) + SiLU on {common.device_tag(device)} ({torch.get_num_threads()} threads): "
          "fused ldmfast op vs torch GroupNorm then SiLU")
    common.print_table(rows, columns)
    for key in ("speedup", "dev_speedup", "dev_of_copy_bw"):
        for fmt in ("contiguous", "channels_last"):
            for pass_name in ("fwd", "fwd+bwd"):
                sel = [r[key] for r in rows if r["format"] == fmt and r["pass"] == pass_name and key in r]
                if sel:
                    geo = statistics.geometric_mean(sel)
                    print(f"{key:>14} {fmt:>13} {pass_name:>7}: min {min(sel):.2f}, geomean {geo:.2f}")
    if not args.no_save:
        meta = {"full": bool(args.full or gpu), "clock": "thread_time" if args.cpu_time else "perf_counter",
                "timing": "alternating rounds, minimum per call",
                "cpu_malloc": common.cpu_malloc_meta(kept_freed),
                "device_timing": "dev_*: 20 calls in one CUDA graph, CUDA events, minimum of 5 replays"}
        name = "group_norm-cputime" if args.cpu_time else "group_norm"
        print(f"saved {common.save(name, device, rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
