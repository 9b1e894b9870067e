"""Where attention spends its time, ours beside torch's best for the shape: GPU time kernel by
kernel (torch.profiler), wall time per call (their difference is host time the GPU waits for),
and where the host spends ours (cProfile).

    python bench/profile_attention.py [--shapes vqgan,unet168] [--reps 20]

vqgan: the VQGAN's middle block (one head of 512 over 48 x 56 tokens: attention_wide's chunked
GEMMs, against matmul-softmax-matmul); unet168 / unet672: the cLDM UNet's attention levels (the
flash-style Triton kernels, against cuDNN's SDPA); standard: B=8 H=16 L=4096 D=64.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import ldmfast.ops as ops
from ldmfast.ops import attention_wide

SHAPES = {"vqgan": (6, 1, 2688, 512), "unet168": (48, 56, 168, 32), "unet672": (48, 28, 672, 32),
          "standard": (8, 16, 4096, 64)}


def matmul_softmax_matmul(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def profile(shape: str, reps: int) -> None:
    b, h, l, d = SHAPES[shape]
    q, k, v = (torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    theirs = ("matmul-softmax-matmul", matmul_softmax_matmul) if d > 256 else ("cudnn", cudnn)
    ops.attention(q.detach(), k.detach(), v.detach())  # (attention_wide probes what the GEMMs can do)
    if d > 256:
        print(f"dk/dv summed in the GEMM's epilogue (baddbmm out_dtype): {attention_wide._F32_OUT_BADDBMM}")
    for who, f in (("ours", ops.attention), theirs):
        passes = {"fwd": lambda: f(q.detach(), k.detach(), v.detach()),
                  "fwd+bwd": lambda: torch.autograd.grad(f(q, k, v), (q, k, v), dout)}
        for name, fn in passes.items():
            rows = common.kernel_table(fn, reps)
            total = sum(r[1] for r in rows)
            print(f"{shape} B={b} H={h} L={l} D={d} bf16 [{who}] {name}: {total:.1f} us of kernels, "
                  f"{common.wall_ms(fn, reps) * 1e3:.1f} us wall per call")
            for key, us, count in rows:
                print(f"    {us:8.1f} us  x{count}  {key[:110]}")
            if who == "ours" and name == "fwd+bwd":
                print("    CUDA runtime calls (host us per call, count):")
                for key, us, count in common.runtime_calls(fn, reps)[:12]:
                    print(f"    {us:8.1f} us  x{count}  {key[:110]}")
                common.host_profile(fn, reps=reps, top=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="vqgan,unet168", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"--shapes: unknown shape {shape!r} (known: {', '.join(sorted(SHAPES))})")
        profile(shape, args.reps)


if __name__ == "__main__":
    main()
