"""Host time of the GPU ops' Python wrappers, measured on any CPU: the CUDA module and the Triton
kernels are replaced by stubs that launch nothing, the tensors are tiny CPU tensors, and the ops
are told to take their GPU backends (cuda for GroupNorm, triton for attention). What remains is
what ldmfast itself adds between the caller and the launches: checks, dispatch, autograd,
allocations, launch-setting choices. On a GPU the real launches come on top (bench/profile_*.py
print both); at the UNet's small maps an op's host time exceeds its kernels' (H100 profiles,
bench/results/profile_*), and whatever the host cannot run ahead of, the GPU waits for.

Torch's own ops on the same tiny CPU tensors are printed beside as a yardstick (their time
includes a little arithmetic).

    python bench/host_overhead.py [--reps 2000] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

import common
import ldmfast.ops as ops
from ldmfast.ops import _backends, _native, attention_triton


class _NoLaunch:
    """Stands for a Triton kernel: kernel[grid](...) launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoCudaModule:
    """Stands for ldmfast._cuda: the GroupNorm entry points return at once."""

    @staticmethod
    def group_norm_workspace(*args):
        return 64

    @staticmethod
    def group_norm_forward(*args):
        return None

    @staticmethod
    def group_norm_backward(*args):
        return None


@contextlib.contextmanager
def stubbed_gpu():
    """The GPU backends run on CPU tensors with every launch stubbed out."""
    backend = {"group_norm": "cuda", "attention": "triton"}
    kernels = ("_fwd_kernel", "_bwd_kernel", "_bwd_delta_kernel")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_backends, "resolve", lambda op, t: backend[op]))
        stack.enter_context(mock.patch.object(_native, "cuda_module", lambda: _NoCudaModule))
        stack.enter_context(mock.patch.object(_native, "cuda_stream", lambda t: 0))
        stack.enter_context(mock.patch.object(_native, "triton_device", lambda t: contextlib.nullcontext()))
        for name in kernels:
            stack.enter_context(mock.patch.object(attention_triton, name, _NoLaunch()))
        yield


def us_per_call(fn, reps: int) -> float:
    return common.wall_ms(fn, reps, warmup=max(10, reps // 20)) * 1e3


def cases() -> dict:
    """name -> (ours, torch's): each a no-argument call."""
    x = torch.randn(2, 64, 4, 4, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    dy = torch.randn_like(x)
    q, k, v = (torch.randn(2, 2, 16, 32, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    d = [t.detach() for t in (x, w, b, q, k, v)]
    return {
        "group_norm fwd": (lambda: ops.group_norm(d[0], 32, d[1], d[2], 1e-5, "silu"),
                           lambda: F.silu(F.group_norm(d[0], 32, d[1], d[2], 1e-5))),
        "group_norm fwd+bwd": (
            lambda: torch.autograd.grad(ops.group_norm(x, 32, w, b, 1e-5, "silu"), (x, w, b), dy),
            lambda: torch.autograd.grad(F.silu(F.group_norm(x, 32, w, b, 1e-5)), (x, w, b), dy)),
        "attention fwd": (lambda: ops.attention(d[3], d[4], d[5]),
                          lambda: F.scaled_dot_product_attention(d[3], d[4], d[5])),
        "attention fwd+bwd": (
            lambda: torch.autograd.grad(ops.attention(q, k, v), (q, k, v), dout),
            lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), dout)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="then cProfile each of ours (own time, top 15)")
    args = p.parse_args()
    rows = []
    with stubbed_gpu():
        for name, (ours, theirs) in cases().items():
            rows.append({"case": name, "ours_us": us_per_call(ours, args.reps),
                         "torch_cpu_us": us_per_call(theirs, args.reps)})
        common.print_table(rows, ["case", "ours_us", "torch_cpu_us"])
        if args.profile:
            for name, (ours, _) in cases().items():
                print(f"\n== {name}")
                common.host_profile(ours, reps=args.reps // 4, top=15)
    path = common.save("host_overhead", torch.device("cpu"), rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
