"""Fused DDIM update against the chain of torch ops schedulers run today, side by side.

    python bench/bench_ddim.py                 # CPU: times and ratios
    python bench/bench_ddim.py --device cuda   # GPU: also bandwidth against a device copy

The torch chain is diffusers' DDIMScheduler.step arithmetic (eps prediction, eta as given).
On a GPU the goal is >= 85% of device-copy bandwidth from 64 MB up and >= 3x the chain.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ldmfast.ops as ops  # noqa: E402


def scheduler_chain(x_t, out, a_t, a_prev, eta, noise):
    """diffusers' DDIM step arithmetic on scalar alphas, in the tensors' dtype."""
    b_t = 1 - a_t
    x0 = (x_t - b_t ** 0.5 * out) / a_t ** 0.5
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * out
    if eta > 0:
        prev = prev + std * noise
    return prev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per measurement")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # (name, shape): the paper's latent batch, then sizes of 16 MB to 256 MB (fp32).
    shapes = [("latent 48x3x48x56", (48, 3, 48, 56)), ("16 MB", (16, 4, 256, 256)),
              ("64 MB", (64, 4, 256, 256)), ("256 MB", (64, 16, 256, 256))]
    if device.type == "cpu":
        shapes = shapes[:3]
    a_t, a_prev = 0.3, 0.5
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for name, shape in shapes:
            x, out, noise = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
            for eta in (0.0, 1.0):
                backend = ops.resolve("ddim_step", x)
                fused = common.time_ms(lambda: ops.ddim_step(x, out, a_t, a_prev, eta=eta, noise=noise),
                                       args.min_run_time)
                chain = common.time_ms(lambda: scheduler_chain(x, out, a_t, a_prev, eta, noise), args.min_run_time)
                nbytes = x.numel() * x.element_size() * (4 if eta > 0 else 3)  # reads + one write
                row = {"dtype": str(dtype).replace("torch.", ""), "size": name, "eta": eta, "backend": backend,
                       "fused_ms": fused, "torch_chain_ms": chain, "speedup": chain / fused,
                       "fused_GBps": nbytes / fused / 1e6}
                if device.type == "cuda":
                    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    copy = common.time_ms(lambda: dst.copy_(src), args.min_run_time)
                    row["copy_GBps"] = nbytes / copy / 1e6
                    row["of_copy_bw"] = row["fused_GBps"] / row["copy_GBps"]
                rows.append(row)
    columns = ["dtype", "size", "eta", "backend", "fused_ms", "torch_chain_ms", "speedup", "fused_GBps"]
    if device.type == "cuda":
        columns += ["copy_GBps", "of_copy_bw"]
    print(f"DDIM step on {common.device_tag(device)} ({torch.get_num_threads()} threads), "
          "fused ldmfast op vs the torch op chain of diffusers' DDIMScheduler.step")
    common.print_table(rows, columns)
    if not args.no_save:
        print(f"saved {common.save('ddim', device, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
