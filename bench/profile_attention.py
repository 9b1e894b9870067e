"""Where attention spends its time, ours beside torch's best for the shape: GPU time kernel by
kernel (torch.profiler), wall time per call (their difference is host time the GPU waits for),
and where the host spends ours (cProfile).

    python bench/profile_attention.py [--shapes vqgan,unet168] [--reps 20]

vqgan: the VQGAN's middle block (one head of 512 over 48 x 56 tokens: attention_wide's chunked
GEMMs, against matmul-softmax-matmul); unet168 / unet672: the cLDM UNet's attention levels (the
flash-style Triton kernels, against cuDNN's SDPA); standard: B=8 H=16 L=4096 D=64. First, the
host cost of one launch (empty Triton kernels, a small torch op).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
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


@triton.jit
def _nop(X, N):
    pass


@triton.jit
def _nop_wide(X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3,
              b4, b5, b6, b7, b8, b9, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7,
              BLOCK: tl.constexpr):
    pass


def launch_costs(reps: int = 2000) -> None:
    """Host microseconds per launch of an empty Triton kernel (2 arguments, and 48 as the attention
    backward takes), of a small torch op and of attention_wide's GEMM forms: what each of the ops'
    launches costs on this machine's host. Run before any torch.profiler session (whose CUPTI
    hooks could stay behind)."""
    x = torch.zeros(16, device="cuda")
    ints = list(range(1, 39))
    # attention_wide's GEMM forms on tiny operands (the GPU idles: host time), bf16 into float32
    # through out_dtype among them (a cuBLASLt path, which may query its heuristics every call).
    a = torch.randn(2, 8, 8, device="cuda", dtype=torch.bfloat16)
    acc, s = torch.zeros(2, 8, 8, device="cuda"), torch.empty_like(a)
    cases = {"torch x.add_(1)": lambda: x.add_(1),
             "triton, 2 args": lambda: _nop[(1,)](x, 16),
             "triton, 48 args": lambda: _nop_wide[(1,)](*([x] * 10), *ints, BLOCK=16),
             "bmm bf16": lambda: torch.bmm(a, a),
             "baddbmm bf16 into s": lambda: torch.baddbmm(s, a, a, beta=0.0, alpha=0.5, out=s),
             "bmm out_dtype f32": lambda: torch.bmm(a, a, out_dtype=torch.float32),
             "baddbmm out_dtype f32 += ": lambda: torch.baddbmm(acc, a, a, out_dtype=torch.float32, beta=1.0,
                                                               alpha=0.5, out=acc)}
    for name, fn in cases.items():
        try:
            us = common.wall_ms(fn, reps, warmup=20) * 1e3
        except (RuntimeError, TypeError) as err:
            print(f"launch cost: {name:>26}: failed ({str(err).splitlines()[0][:60]})")
            continue
        print(f"launch cost: {name:>26}: {us:6.1f} us per call", flush=True)


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
    launch_costs()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"--shapes: unknown shape {shape!r} (known: {', '.join(sorted(SHAPES))})")
        profile(shape, args.reps)


if __name__ == "__main__":
    main()
