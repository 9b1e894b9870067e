"""Throughput of the image metrics on a batch of 192 x 224 two-channel (DWI, ADC) slices.

    python bench/bench_metrics.py                 # CPU
    python bench/bench_metrics.py --device cuda   # GPU

Slices per second of MAE, PSNR, SSIM and MS-SSIM (5 scales), whole slice and over a brain
mask, in float32; the evaluation of a data set is dominated by MS-SSIM and SSIM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmfast import metrics  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="slices per batch (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    n = args.batch or (32 if device.type == "cpu" else 256)
    g = torch.Generator(device=device).manual_seed(0)
    ref = torch.rand(n, 2, 192, 224, device=device, generator=g) * 2 - 1
    pred = (ref + 0.1 * torch.randn(n, 2, 192, 224, device=device, generator=g)).clamp(-1, 1)
    yy, xx = torch.meshgrid(torch.arange(192, device=device), torch.arange(224, device=device), indexing="ij")
    brain = (((yy - 96) / 80) ** 2 + ((xx - 112) / 95) ** 2 < 1).expand(n, 192, 224)
    cases = {
        "mae": lambda m: metrics.mae(pred, ref, m),
        "psnr": lambda m: metrics.psnr(pred, ref, m, data_range=2.0),
        "ssim": lambda m: metrics.ssim(pred, ref, m, data_range=2.0),
        "ms_ssim": lambda m: metrics.ms_ssim(pred, ref, m, data_range=2.0),
    }
    rows = []
    for name, fn in cases.items():
        for region, mask in (("slice", None), ("brain", brain)):
            ms = common.time_ms(lambda: fn(mask), args.min_run_time)
            rows.append({"metric": name, "region": region, "batch": n, "ms": ms, "slices_per_s": n / ms * 1e3})
    print(f"image metrics on {common.device_tag(device)} ({torch.get_num_threads()} threads), "
          f"{n} slices of 2 x 192 x 224, float32")
    common.print_table(rows, ["metric", "region", "batch", "ms", "slices_per_s"])
    if not args.no_save:
        print(f"saved {common.save('metrics', device, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
