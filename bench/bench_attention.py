"""Fused attention against torch's scaled_dot_product_attention (each backend torch offers on the
device) and matmul-softmax-matmul, forward and forward+backward, side by side; and peak memory
against sequence length. On a GPU, a loop of eager calls (host time included) and the kernels
alone (CUDA graphs) of ldmfast's Triton backend and the fastest torch implementation.

    python bench/bench_attention.py                 # CPU: shapes with batch / 8 by default
    python bench/bench_attention.py --device cuda   # GPU: the full shapes, bf16

TFLOP/s count 4 B H Lq Lk D for the forward and 3.5x that for forward+backward (the backward
recomputes the scores), the convention of the flash-attention papers.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ldmfast.ops as ops  # noqa: E402

SHAPES = [("UNet 24x28 level", 48, 28, 672, 32), ("UNet 12x14 level", 48, 56, 168, 32),
          ("VQGAN middle block", 6, 1, 2688, 512), ("standard", 8, 16, 4096, 64)]
SDPA_BACKENDS = {"cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
                 "cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]}


def matmul_softmax_matmul(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def candidates(device: torch.device):
    """(name, fn) pairs; ldmfast's backends that run on this device, then the peers."""
    out = []
    for backend in ("cpu", "triton", "cuda"):
        if ops.unavailable_reason(backend, device) is None and (backend != "triton" or device.type == "cuda"):
            def run(q, k, v, backend=backend):
                with ops.use_backend(backend):
                    return ops.attention(q, k, v)
            out.append((f"ldmfast {backend}", run))
    for sdpa in SDPA_BACKENDS[device.type]:
        def run(q, k, v, sdpa=sdpa):
            with sdpa_kernel([sdpa]):
                return F.scaled_dot_product_attention(q, k, v)
        out.append((f"sdpa {sdpa.name.lower()}", run))
    out.append(("matmul-softmax-matmul", matmul_softmax_matmul))
    return out


def speed(args, device, dtype):
    rows = []
    for label, b, h, length, d in SHAPES:
        b = max(1, b // args.batch_divisor)
        q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        grad = torch.randn_like(q)
        flops = 4 * b * h * length * length * d
        timed = []  # (row, forward, forward+backward) of each implementation that takes the shape
        for name, fn in candidates(device):
            row = {"shape": f"{label} B={b} H={h} L={length} D={d}", "impl": name}
            rows.append(row)

            def forward(fn=fn):
                return fn(q, k, v)

            def forward_backward(fn=fn):
                # autograd.grad, as a model's backward meets attention: q, k and v are activations,
                # whose gradients flow on and never accumulate into a .grad
                return torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)

            try:
                if device.type == "cuda":
                    # The cuda backend's forward runs on CUDA cores, 20-140x slower than Triton's
                    # (auto never picks it): timed briefly, it kept the whole benchmark past its
                    # lease slot.
                    run_time = 0.0 if name == "ldmfast cuda" else args.min_run_time
                    row["fwd_ms"] = common.time_ms(forward, run_time)
                    row["fwdbwd_ms"] = common.time_ms(forward_backward, run_time)
                    # the earlier form (until 2026-11-27), which adds into .grad: it timed the VQGAN
                    # block's fwd+bwd at 1.43 ms where a profile of the form above saw 0.86 (H100);
                    # both, side by side, until the cause is known
                    row["fwdbwd_accumulate_ms"] = common.time_ms(lambda: fn(qg, kg, vg).backward(grad), run_time)
                else:  # a first call of each: a torch backend may refuse the shape
                    forward()
                    forward_backward()
            except (RuntimeError, torch.OutOfMemoryError) as err:  # a torch backend refusing the shape
                row["note"] = str(err).splitlines()[0][:60]
                continue
            timed.append((row, forward, forward_backward))
        if device.type == "cpu":
            # All implementations in alternating rounds, minimum per call: this shared CPU's speed
            # drifts by up to 1.5x within a minute, which one implementation timed after another
            # folded into their ratio (the same build measured 0.64x and 1.02x of SDPA's forward).
            for key, column in (("fwd_ms", 1), ("fwdbwd_ms", 2)):
                times = common.alternating_min_ms([t[column] for t in timed], args.min_run_time)
                for (row, *_), ms in zip(timed, times):
                    row[key] = ms
        for row, *_ in timed:
            row["fwd_TFLOPs"] = flops / row["fwd_ms"] / 1e9
            row["fwdbwd_TFLOPs"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
        # Ratios against the best torch implementation of this shape (>1: ldmfast faster).
        peers = [r for r in rows if r["shape"].startswith(label) and not r["impl"].startswith("ldmfast")
                 and "fwd_ms" in r]
        best_fwd = min(r["fwd_ms"] for r in peers)
        best_bwd = min(r["fwdbwd_ms"] for r in peers)
        for r in rows:
            if r["shape"].startswith(label) and "fwd_ms" in r:
                r["fwd_vs_best_torch"] = best_fwd / r["fwd_ms"]
                r["fwdbwd_vs_best_torch"] = best_bwd / r["fwdbwd_ms"]
        if device.type == "cuda":
            device_times(rows, label, (q, k, v), peers)
    return rows


def device_times(rows, label, qkv, peers) -> None:
    """The kernels' own times (CUDA graphs, common.graph_ms) of ldmfast's Triton backend and of the
    torch implementation that was fastest in the eager timing, each pass: the loop of eager calls
    above includes the host time around the kernels (checks, autograd, launches), which decides at
    the UNet's small shapes, while a model's step hides it whenever its host runs ahead of the GPU.
    Adds dev_fwd_ms, dev_fwdbwd_ms and (to ldmfast's row) their ratios to that peer's."""
    fns = dict(candidates(qkv[0].device))
    ours = next((r for r in rows if r["shape"].startswith(label) and r["impl"] == "ldmfast triton"
                 and "fwd_ms" in r), None)
    if ours is None:
        return
    qg, kg, vg = (t.clone().requires_grad_() for t in qkv)
    grad = torch.randn_like(qg)
    for pass_name, key in (("fwd", "fwd_ms"), ("fwdbwd", "fwdbwd_ms")):
        best = min(peers, key=lambda r: r[key])
        timed = []
        for row in (ours, best):
            fn = fns[row["impl"]]
            if pass_name == "fwd":
                timed.append(lambda fn=fn: fn(*qkv))
            else:
                timed.append(lambda fn=fn: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad))
        with torch.no_grad() if pass_name == "fwd" else torch.enable_grad():
            ms = common.graph_ms(timed, reps=10)
        for row, value in zip((ours, best), ms):
            if value is not None:
                row[f"dev_{pass_name}_ms"] = value
        if ms[0] is not None and ms[1] is not None:
            ours[f"dev_{pass_name}_vs_best_torch"] = ms[1] / ms[0]


# The high-water mark of this process's resident memory (VmHWM: unlike getrusage's ru_maxrss, it
# is not inherited from the parent through fork and exec). The CPU needs a fresh process per
# length (the mark never goes down); on a GPU one process measures every length (the allocator's
# peak is reset before each).
MEMORY_PROBE = """
import sys, torch, ldmfast.ops as ops
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
lengths, backend, device = [int(n) for n in sys.argv[1].split(",")], sys.argv[2], sys.argv[3]
with ops.use_backend(backend):  # first-call costs (thread pools, allocator) are not per-L memory
    ops.attention(*(torch.randn(1, 1, 16, 64, device=device) for _ in range(3)))
for length in lengths:
    q, k, v = (torch.randn(1, 1, length, 64, device=device) for _ in range(3))
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = hwm()
    with ops.use_backend(backend):
        out = ops.attention(q, k, v)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else hwm()
    print(peak - base)
    del q, k, v, out
"""


def memory(device):
    """Peak extra memory of one forward (B=1, H=1, D=64) as L doubles, in fresh processes. The cuda
    backend allocates as Triton does (its forward's outputs and log-sum-exp), and takes minutes at
    L=16384 on CUDA cores: it is left out."""
    lengths = (2048, 4096, 8192, 16384)
    backends = ["reference"] + [b for b in ("cpu", "triton") if ops.unavailable_reason(b, device) is None
                                and (b != "triton" or device.type == "cuda")]
    groups = [lengths] if device.type == "cuda" else [(n,) for n in lengths]
    peaks = {b: [] for b in backends}
    for backend in backends:
        for group in groups:
            out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, ",".join(map(str, group)), backend,
                                  device.type], capture_output=True, text=True, check=True)
            peaks[backend] += [int(line) / 2**20 for line in out.stdout.split()]
    rows = [{"L": n, **{f"{b}_MiB": peaks[b][i] for b in backends}} for i, n in enumerate(lengths)]
    return rows, ["L"] + [f"{b}_MiB" for b in backends]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on a GPU by default")
    p.add_argument("--batch-divisor", type=int, default=None, help="divide every batch (default 8 on the CPU, 1 on a GPU)")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.batch_divisor = args.batch_divisor or (8 if device.type == "cpu" else 1)
    kept_freed = device.type == "cpu" and common.keep_freed_cpu_memory()  # timings only: probes are subprocesses
    rows = speed(args, device, dtype)
    print(f"attention on {common.device_tag(device)}, {dtype}, batch / {args.batch_divisor}")
    common.print_table(rows, ["shape", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_vs_best_torch", "fwdbwd_ms",
                              "fwdbwd_TFLOPs", "fwdbwd_vs_best_torch", "note"]
                       + (["fwdbwd_accumulate_ms"] if device.type == "cuda" else []))
    if device.type == "cuda":
        print("\nkernels alone (CUDA graphs): ldmfast's Triton backend and the fastest torch implementation")
        common.print_table([r for r in rows if "dev_fwd_ms" in r or "dev_fwdbwd_ms" in r],
                           ["shape", "impl", "dev_fwd_ms", "dev_fwd_vs_best_torch", "dev_fwdbwd_ms",
                            "dev_fwdbwd_vs_best_torch"])
    mem_rows = []
    if not args.skip_memory:
        mem_rows, columns = memory(device)
        print("\npeak extra memory of one forward, B=1 H=1 D=64 (reference materializes L x L)")
        common.print_table(mem_rows, columns)
    if not args.no_save:
        meta = {"dtype": str(dtype), "batch_divisor": args.batch_divisor,
                "timing": ("alternating rounds of all implementations, minimum per call" if device.type == "cpu"
                           else "median per call (torch.utils.benchmark), one implementation after another"),
                "cpu_malloc": common.cpu_malloc_meta(kept_freed)}
        print(f"saved {common.save('attention', device, rows + mem_rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
