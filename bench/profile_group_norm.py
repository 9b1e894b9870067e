"""Where a GroupNorm+SiLU forward+backward spends its GPU time, kernel by kernel (torch.profiler),
ours beside torch's, on a few of bench_group_norm.py's shapes: what to fix next.

    python bench/profile_group_norm.py [--reps 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import common
import ldmfast.ops as ops

# (name, N, C, H, W, dtype, channels_last)
CASES = [
    ("unet 1792@12x14 bf16 contiguous", 48, 1792, 12, 14, torch.bfloat16, False),
    ("unet 1792@12x14 bf16 channels-last", 48, 1792, 12, 14, torch.bfloat16, True),
    ("vqgan 512@48x56 bf16 contiguous", 8, 512, 48, 56, torch.bfloat16, False),
    ("vqgan 128@192x224 bf16 contiguous", 8, 128, 192, 224, torch.bfloat16, False),
    ("unet 224@48x56 bf16 channels-last", 48, 224, 48, 56, torch.bfloat16, True),
]


def host_overhead(reps: int = 2000) -> None:
    """Microseconds per call on a tiny CUDA tensor (the GPU idles: this is host time), ours and
    torch's, then where ours goes (cProfile, by own time)."""
    x = torch.randn(2, 64, 4, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wt = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    cases = {"ours fwd": lambda: ops.group_norm(x.detach(), 32, wt.detach(), b.detach(), 1e-5, "silu"),
             "torch fwd": lambda: F.silu(F.group_norm(x.detach(), 32, wt.detach(), b.detach(), 1e-5)),
             "ours fwd+bwd": lambda: torch.autograd.grad(ops.group_norm(x, 32, wt, b, 1e-5, "silu"), (x, wt, b), dy),
             "torch fwd+bwd": lambda: torch.autograd.grad(F.silu(F.group_norm(x, 32, wt, b, 1e-5)), (x, wt, b), dy)}
    for name, fn in cases.items():
        print(f"host: {name:>14}: {common.wall_ms(fn, reps, warmup=50) * 1e3:7.1f} us per call", flush=True)
    common.host_profile(cases["ours fwd+bwd"], reps, top=18)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    host_overhead()
    for name, n, c, h, w, dtype, cl in CASES:
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_()
        wt = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(c, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        fns = {"ours": lambda: ops.group_norm(x, 32, wt, b, 1e-5, "silu"),
               "torch": lambda: F.silu(F.group_norm(x, 32, wt, b, 1e-5))}
        for who, f in fns.items():
            rows = common.kernel_table(lambda: torch.autograd.grad(f(), (x, wt, b), dy), args.reps)
            total = sum(r[1] for r in rows)
            print(f"{name} [{who}] fwd+bwd: {total:.1f} us of kernels per call")
            for key, us, count in rows:
                print(f"    {us:8.1f} us  x{count}  {key[:110]}")


if __name__ == "__main__":
    main()
