"""VQGAN training step (forward + backward) and decode throughput, ldmfast's fused ops against the
plain-torch reference backend, side by side in one process.

    python bench/bench_vqgan.py                    # CPU: the demo config on 64 x 64 slices, fp32
    python bench/bench_vqgan.py --device cuda      # GPU: the release config on 192 x 224, bf16

The model calls only ldmfast.ops for attention (and, once merged, GroupNorm+SiLU), so switching
the backend switches exactly those ops; everything else is the same torch code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ldmfast.ops as ops  # noqa: E402
from ldmfast.models import VQGAN, VQGANConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", choices=["demo", "release"], help="default: demo on CPU, release on GPU")
    p.add_argument("--batch", type=int, help="default: 8")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default: 64 64 (demo), 192 224 (release)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype; default bf16 on GPU, fp32 on CPU")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    name = args.config or ("release" if on_gpu else "demo")
    config = VQGANConfig.release() if name == "release" else VQGANConfig.demo()
    size = tuple(args.size or ((192, 224) if name == "release" else (64, 64)))
    batch = args.batch or 8
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    fmt = torch.channels_last if on_gpu else torch.contiguous_format

    torch.manual_seed(0)
    model = VQGAN(config).to(device, memory_format=fmt)
    x = torch.randn(batch, 2, *size, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        latent = model.quantize(model.encode(x)).z_q.contiguous(memory_format=fmt)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step():
        with autocast():
            recon, q = model(x)
            loss = (recon.float() - x).abs().mean() + q.loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def decode():
        with autocast():
            model.decode(latent)

    fused_backend = ops.resolve("attention", x.to(dtype))
    rows = []
    for what, fn in (("train step", train_step), ("decode", decode)):
        ms, peak = {}, {}
        for backend in (fused_backend, "reference"):
            with ops.use_backend(backend):
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                ms[backend] = common.time_ms(fn, args.min_run_time)
                if on_gpu:
                    peak[backend] = torch.cuda.max_memory_allocated(device) / 2**30
        row = {"what": what, "config": name, "batch": batch, "size": f"{size[0]}x{size[1]}",
               "dtype": str(dtype).replace("torch.", ""), "fused": fused_backend,
               "fused_ms": ms[fused_backend], "reference_ms": ms["reference"],
               "speedup": ms["reference"] / ms[fused_backend],
               "fused_img_per_s": batch / ms[fused_backend] * 1e3,
               "reference_img_per_s": batch / ms["reference"] * 1e3}
        if on_gpu:
            row.update(fused_peak_GiB=peak[fused_backend], ref_peak_GiB=peak["reference"])
        rows.append(row)
    columns = ["what", "config", "batch", "size", "dtype", "fused", "fused_ms", "reference_ms", "speedup",
               "fused_img_per_s", "reference_img_per_s"]
    if on_gpu:
        columns += ["fused_peak_GiB", "ref_peak_GiB"]
    print(f"VQGAN ({name} config, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on "
          f"{common.device_tag(device)} ({torch.get_num_threads()} threads): fused ldmfast ops vs the reference backend")
    common.print_table(rows, columns)
    if not args.no_save:
        print(f"saved {common.save('vqgan', device, rows, {'config': config.to_dict()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
