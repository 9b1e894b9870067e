"""Where a peer model's denoiser forward spends its GPU time, kernel by kernel (torch.profiler),
as built and after ldmfast.accelerate: what to fix next for issue 11's sampling-loop goal.

    python bench/profile_accelerate.py [--models monai-unet] [--reps 5] [--top 25]

Prints per state the kernels' total time per forward beside the wall time of the forward (a wall
time well above the kernels' means the host is the bottleneck), the time per kernel family and the
largest kernels.
"""
from __future__ import annotations

import argparse
import re

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import common
from bench_accelerate import CONDITION, LATENT, MODELS, SIZES, Acceleration, build_model, unet_call

# Kernel families by name, first match wins: how much of a forward is convolution, matmul,
# normalization, attention, or elementwise/layout work.
FAMILIES = [
    ("attention", r"attention|attn|flash|fmha|_attention_fwd"),
    ("group_norm", r"group_norm|groupnorm|GroupNorm|gn_|welford"),
    ("convolution", r"conv|implicit|wgrad|dgrad|xmma|sm90_xmma|cudnn"),
    ("matmul", r"gemm|cutlass|Kernel2|nvjet|sm90_"),
    ("layout copy", r"copy|transpose|nchw|nhwc|permute|contiguous"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|silu|add|mul"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def profile_forward(fn, reps: int):
    """(kernel rows, aten-op rows, wall ms per forward): kernel rows (name, us per forward,
    launches per forward); op rows (op and input shapes, us of its own kernels per forward, calls
    per forward): which line of the model a kernel comes from."""
    wall_ms = common.wall_ms(fn, reps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / reps, e.count // reps) for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    ops = [(f"{e.key} {e.input_shapes}", e.self_device_time_total / reps, e.count // reps)
           for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    return sorted(kernels, key=lambda r: -r[1]), sorted(ops, key=lambda r: -r[1]), wall_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="monai-unet", help="comma-separated unet models of bench_accelerate")
    p.add_argument("--states", default="torch,ldmfast,ldmfast+cl")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--host", action="store_true", help="also where the host spends a forward (cProfile)")
    args = p.parse_args()
    device, dtype, s = torch.device("cuda"), torch.bfloat16, SIZES["release"]
    for name in args.models.split(","):
        if MODELS[name][2] != "unet":
            raise SystemExit(f"--models: {name} is not a UNet")
        model = build_model(name, s, device, dtype)
        x = torch.randn(args.batch, LATENT + CONDITION, *s["latent"], device=device, dtype=dtype)
        t = torch.tensor(500, device=device)
        switch = Acceleration(model, None)
        with torch.no_grad():
            for state in args.states.split(","):
                switch.set(state)
                rows, ops, wall_ms = profile_forward(lambda: unet_call(name, model, x, t), args.reps)
                total = sum(r[1] for r in rows) / 1e3
                # At batch 1 the kernels are short: the wall time is about the host's time per forward.
                host_ms = common.wall_ms(lambda: unet_call(name, model, x[:1], t), args.reps)
                print(f"\n== {name} [{state}] batch {args.batch} bf16: kernels {total:.2f} ms per forward, "
                      f"wall {wall_ms:.2f} ms, {sum(r[2] for r in rows)} launches; wall at batch 1 {host_ms:.2f} ms")
                by_family: dict[str, float] = {}
                for key, us, _ in rows:
                    by_family[family(key)] = by_family.get(family(key), 0.0) + us
                for fam, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
                    print(f"   {fam:>12}: {us / 1e3:7.2f} ms ({us / 1e3 / total:5.1%})")
                for key, us, count in rows[:args.top]:
                    print(f"    {us:8.1f} us  x{count:<3d} {family(key):>12}  {key[:160]}")
                print("  by aten op and input shapes (own kernels):")
                for key, us, count in ops[:args.top]:
                    print(f"    {us:8.1f} us  x{count:<3d} {key[:200]}")
                if args.host:
                    common.host_profile(lambda: unet_call(name, model, x, t), reps=5, top=15)
        switch.off()
        model = None  # (freed before the next model is built; `del` left the lambdas above an unbound name)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
