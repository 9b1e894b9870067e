"""Launch-setting sweep of the Triton attention on a GPU: for each shape of bench_attention.py,
time the forward (and forward+backward) under candidate tiles, warps and pipeline stages, beside
the best torch path measured in the same run, and print the fastest setting of each.

    python bench/sweep_attention_triton.py [--dtype bfloat16] [--out FILE.json]

The winners become the defaults in ldmfast/ops/attention_triton.py (_blocks, _launch_kwargs);
this script is how they were chosen.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ldmfast.ops as ops
from ldmfast.ops import attention_triton, attention_wide

# (name, B, H, L, D): bench_attention.py's shapes
SHAPES = [
    ("UNet 24x28 level", 48, 28, 672, 32),
    ("UNet 12x14 level", 48, 56, 168, 32),
    ("VQGAN middle block", 6, 1, 2688, 512),
    ("standard", 8, 16, 4096, 64),
]
# (BLOCK_M, BLOCK_N, num_warps, num_stages); None: the current default. A backward setting is one
# such tuple for both backward kernels, or a pair: (dk/dv kernel's, dq kernel's); "two launches":
# the default tiles with the backward's kernels launched one after the other even for short query
# sequences (attention_triton.ONE_LAUNCH_MAX_LQ = 0).
SMALL_D_FWD = [None, (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 3)]
SMALL_D_BWD = [None, "two launches", (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2),
               (64, 64, 4, 2),
               # Triton's fused-attention tutorial: the stationary side 128 wide, the walked side 32
               ((32, 128, 4, 5), (128, 32, 4, 5)), ((32, 128, 4, 3), (128, 32, 4, 3)),
               ((64, 128, 8, 3), (128, 64, 8, 3)), ((32, 64, 4, 3), (64, 32, 4, 3))]
LARGE_D_FWD = [None, (32, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1), (64, 64, 8, 1), (128, 32, 8, 1),
               (64, 16, 4, 2), (32, 64, 8, 2)]
LARGE_D_BWD = [None, (32, 32, 8, 1), (64, 32, 8, 1), (32, 64, 8, 1), (64, 64, 8, 1)]


def ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def best_torch(q, k, v, backward: bool) -> tuple[str, float]:
    """The fastest of torch's SDPA backends and matmul-softmax-matmul on these inputs."""
    dout = torch.randn_like(q)

    def run(f):
        def go():
            if backward:
                for t in (q, k, v):
                    t.grad = None
                f().backward(dout)
            else:
                f()
        return go

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    def plain():
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v

    candidates = {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                  "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION), "matmul-softmax-matmul": plain}
    best = ("none", float("inf"))
    for name, f in candidates.items():
        try:
            t = ms(run(f))
        except RuntimeError:
            continue  # this backend does not take the shape
        if t < best[1]:
            best = (name, t)
    return best


def ours(q, k, v, backward: bool, which: str, setting) -> float:
    attention_triton.OVERRIDES.clear()

    def launch(s):
        bm, bn, warps, stages = s
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    one_launch_max_lq = attention_triton.ONE_LAUNCH_MAX_LQ
    if setting == "two launches":
        attention_triton.ONE_LAUNCH_MAX_LQ = 0
    elif setting is not None and isinstance(setting[0], tuple):  # (dk/dv kernel's, dq kernel's)
        attention_triton.OVERRIDES.update(backward_dkdv=launch(setting[0]), backward_dq=launch(setting[1]))
    elif setting is not None:
        attention_triton.OVERRIDES[which] = launch(setting)
    dout = torch.randn_like(q)

    def go():
        if backward:
            for t in (q, k, v):
                t.grad = None
            ops.attention(q, k, v).backward(dout)
        else:
            ops.attention(q, k, v)
    try:
        with ops.use_backend("triton"):
            return ms(go)
    except Exception as e:  # OutOfResources (shared memory, registers) and the like
        print(f"    {setting}: {type(e).__name__}", file=sys.stderr)
        return float("inf")
    finally:
        attention_triton.OVERRIDES.clear()
        attention_triton.ONE_LAUNCH_MAX_LQ = one_launch_max_lq


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", help="write every timing as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    records = []
    for name, b, h, length, d in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        large = d > 128
        for backward, which, settings in ((False, "forward", LARGE_D_FWD if large else SMALL_D_FWD),
                                          (True, "backward", LARGE_D_BWD if large else SMALL_D_BWD)):
            if attention_wide.applies(q):
                settings = [None]  # GEMMs over query chunks: the kernels' launch settings do not apply
            torch_name, torch_ms = best_torch(q, k, v, backward)
            times = [(s, ours(q, k, v, backward, which, s)) for s in settings]
            default_ms = times[0][1]
            best_setting, best_ms = min(times, key=lambda x: x[1])
            pass_name = "fwd+bwd" if backward else "fwd"
            print(f"{name} B={b} H={h} L={length} D={d} {pass_name}: best torch {torch_name} {torch_ms:.3f} ms; "
                  f"default {default_ms:.3f} ms ({torch_ms / default_ms:.2f}x); best {best_setting} "
                  f"{best_ms:.3f} ms ({torch_ms / best_ms:.2f}x)", flush=True)
            records.append(dict(shape=name, B=b, H=h, L=length, D=d, dtype=args.dtype, pass_=pass_name,
                                torch_best=torch_name, torch_ms=torch_ms,
                                settings=[dict(setting=s, ms=t) for s, t in times]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
