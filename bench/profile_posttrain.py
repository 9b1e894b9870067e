"""Where a post-training step spends its time on a GPU, variant by variant (bench_posttrain.py's
Setup, release config): wall time per step against the GPU's busy time (the sum of its kernels'
durations, one stream), so host-bound steps show as a gap; the kernels by family; and the host's
top operators by own time. What to fix before the time goal (at most 1.3x the naive step's) can hold.

    python bench/profile_posttrain.py [--variants naive,decoder_ckpt,lean_8bit] [--batch 6]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_posttrain  # noqa: E402
import common  # noqa: E402


def kernel_family(name: str) -> str:
    """A coarse family of a kernel's name: enough to tell GEMMs and convolutions from our fused
    ops and torch's elementwise tail."""
    lowered = name.lower()
    for family, keys in (("gemm/conv", ("gemm", "conv", "cutlass", "sm90_xmma", "nvjet", "cudnn", "implicit")),
                         ("group_norm", ("group_norm", "groupnorm")), ("attention", ("attn", "attention", "_fwd_kernel", "_bwd_kernel")),
                         ("optimizer", ("adam", "multi_tensor")), ("copy/cast", ("copy", "cast", "convert")),
                         ("reduce", ("reduce",)), ("elementwise", ("elementwise", "vectorized"))):
        if any(k in lowered for k in keys):
            return family
    return "other"


def profile_variant(s: bench_posttrain.Setup, variant: str, steps: int) -> None:
    s.prepare(variant)
    for _ in range(2):  # warm-up: compilation, allocator, cuBLAS heuristics
        s.step(variant)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        s.step(variant)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s.step(variant)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    busy_ms = sum(e.device_time_total for e in kernels) / 1e3
    families = collections.Counter()
    for e in kernels:
        families[kernel_family(e.key)] += e.device_time_total / 1e3
    print(f"\n== {variant}: {wall_ms:.1f} ms per step (mean of {steps}), GPU busy {busy_ms:.1f} ms "
          f"({sum(e.count for e in kernels)} kernels), host-bound gap {wall_ms - busy_ms:.1f} ms")
    print("   kernels by family (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in families.most_common()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="naive,decoder_ckpt,decoder_unet_ckpt,lean_8bit")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in bench_posttrain.VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(bench_posttrain.VARIANTS)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    device = torch.device("cuda")
    s = bench_posttrain.Setup("release", args.batch, device, torch.bfloat16)
    s.init_optimizer_state()
    print(f"post-training step profile on {common.device_tag(device)}, release config, batch {args.batch}")
    for v in variants:
        profile_variant(s, v, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
