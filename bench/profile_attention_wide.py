"""Where wide-head attention (the VQGAN's middle block: one head of 512 over 48 x 56 tokens)
spends its time, ours (attention_wide's chunked GEMMs) beside matmul-softmax-matmul: GPU time
kernel by kernel (torch.profiler) and wall time per call, whose difference is host time.

    python bench/profile_attention_wide.py [--reps 20]
"""
from __future__ import annotations

import argparse

import torch

import common
import ldmfast.ops as ops
from ldmfast.ops import attention_wide

B, H, L, D = 6, 1, 2688, 512


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def plain(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, -1) @ v

    impls = {"ours": ops.attention, "matmul-softmax-matmul": plain}
    ops.attention(q.detach(), k.detach(), v.detach())  # (attention_wide probes what the GEMMs can do)
    print(f"dk/dv summed in the GEMM's epilogue (baddbmm out_dtype): {attention_wide._F32_OUT_BADDBMM}")
    for who, f in impls.items():
        passes = {"fwd": lambda: f(q.detach(), k.detach(), v.detach()),
                  "fwd+bwd": lambda: torch.autograd.grad(f(q, k, v), (q, k, v), dout)}
        for name, fn in passes.items():
            rows = common.kernel_table(fn, args.reps)
            total = sum(r[1] for r in rows)
            print(f"B={B} H={H} L={L} D={D} bf16 [{who}] {name}: {total:.1f} us of kernels, "
                  f"{common.wall_ms(fn, args.reps) * 1e3:.1f} us wall per call")
            for key, us, count in rows:
                print(f"    {us:8.1f} us  x{count}  {key[:110]}")


if __name__ == "__main__":
    main()
