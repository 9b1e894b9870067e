"""Batch synthesis throughput of the cLDM (slices per second), side by side in one process: the
CTP condition plus DDIM sampling of a batch of latents, at 50 and 2 steps.

    python bench/bench_synthesis_throughput.py --device cuda        # release UNet, batch 48
    python bench/bench_synthesis_throughput.py --config demo        # CPU: demo UNet, batch 4
    python bench/bench_synthesis_throughput.py --threads 1 --cpu-time   # CPU time of one thread (shared machines)

Variants (same weights, same seeds):
  reference fp32 eager    the reference backend (plain-torch GroupNorm, attention, DDIM): what the
                          release does
  fused fp32              ldmfast's fused kernels (auto backend)
  fused bf16 cl           + bf16 autocast and channels-last weights and inputs
  fused bf16 cl graph     + one CUDA graph per batch shape (GPU only), reused across batches: the
                          steady state of synthesis; the first call, which captures, is reported apart
  monai fp32 / bf16 cl    MONAI's DiffusionModelUNet and DDIMScheduler at a matched size (same
                          widths, res blocks, attention levels, 32 channels a head), fp32 eager and
                          with the same bf16 autocast + channels-last; skipped with a note when
                          monai is not installed (pip install --no-deps monai)

GPU goals: fused bf16 graph >= 4x reference fp32 eager and >= 2x MONAI. The VQGAN decode after
sampling is the same for every variant and not timed here (bench_vqgan.py times it).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ldmfast.ops as ops  # noqa: E402
from ldmfast.diffusion import DDIMSampler, NoiseSchedule  # noqa: E402
from ldmfast.models import ConditionalLDM, UNetConfig  # noqa: E402

LATENT = (3, 48, 56)          # a 192 x 224 slice through the VQGAN (factor 4)
CTP = (15, 192, 224)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device: torch.device, clock) -> tuple[float, torch.Tensor]:
    """Seconds of one call and its output. Calls take seconds, so each is timed alone rather than
    through torch.utils.benchmark's blocks."""
    sync(device)
    start = clock()
    out = fn()
    sync(device)
    return clock() - start, out


# ---- MONAI, the peer ---------------------------------------------------------------------------

def monai_peer(config: UNetConfig, device: torch.device):
    """MONAI's DiffusionModelUNet matching `config`, and a DDIMScheduler with the paper's schedule;
    (None, None, why) when monai is missing."""
    levels = len(config.channel_mult)
    try:
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDIMScheduler

        unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=config.in_channels, out_channels=config.out_channels,
            channels=[config.base_channels * m for m in config.channel_mult], num_res_blocks=config.num_res_blocks,
            attention_levels=[lv in config.attention_levels for lv in range(levels)],
            num_head_channels=config.head_channels, norm_num_groups=config.norm_groups,
            use_flash_attention=device.type == "cuda",  # torch SDPA: MONAI's fastest attention on a GPU
        ).to(device).eval()
    except ImportError as err:  # monai itself, or what its blocks import lazily (einops)
        return None, None, f"monai column skipped: {err} (pip install --no-deps monai einops)"
    # "scaled_linear_beta" is linear in sqrt(beta), PAPER.md's schedule; no clipping, as ldmfast.
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                              beta_end=0.0195, clip_sample=False)
    return unet, scheduler, None


def monai_sample(unet, scheduler, cond_module, ctp, steps, autocast, channels_last, seed):
    """MONAI's documented loop: scheduler.set_timesteps, then unet + scheduler.step per timestep."""
    device = ctp.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(seed)
    cond = cond_module(ctp).contiguous(memory_format=fmt)
    x = torch.randn((ctp.shape[0],) + LATENT, generator=g, device=device).contiguous(memory_format=fmt)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        t = int(t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = unet(torch.cat([x, cond.to(x.dtype)], 1), timesteps=torch.full((x.shape[0],), t, device=device))
        x, _ = scheduler.step(out.float(), t, x)
    return x


# ---- the benchmark -----------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", choices=["demo", "release"], help="default: release on GPU, demo on CPU")
    p.add_argument("--batch", type=int, help="slices per batch; default 48 (release), 4 (demo)")
    p.add_argument("--steps", default="50,2", help="DDIM step counts, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant after the first")
    p.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time with this thread's CPU time (needs --threads 1): immune to other processes")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (on_gpu or torch.get_num_threads() != 1):
        p.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    name = args.config or ("release" if on_gpu else "demo")
    config = UNetConfig() if name == "release" else UNetConfig.demo()
    batch = args.batch or (48 if name == "release" else 4)
    step_counts = [int(s) for s in args.steps.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cudnn.benchmark = True  # fixed shapes: every variant gets cuDNN's best algorithms

    torch.manual_seed(0)
    model = ConditionalLDM(config).to(device).eval()
    ctp = torch.rand((batch,) + CTP, device=device) * 2 - 1
    seeds = list(range(batch))
    fused = ops.resolve("group_norm", ctp)
    monai_unet, monai_scheduler, monai_note = monai_peer(config, device)
    schedule = NoiseSchedule()

    # Weights in each memory format, converted once: converting between calls would also move the
    # weights under a captured CUDA graph, which reads them where they were at capture.
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    monai_cl = copy.deepcopy(monai_unet).to(memory_format=torch.channels_last) if monai_unet is not None else None

    def ldmfast_variant(backend, steps, autocast=None, channels_last=False, cuda_graph=False):
        net = model_cl if channels_last else model
        sampler = DDIMSampler(schedule, steps=steps, autocast=autocast, channels_last=channels_last,
                              cuda_graph=cuda_graph)

        def unet_with_condition(z, t, cond):  # one persistent denoiser: the graph is reused across batches
            return net.unet(torch.cat([z, cond], 1), t)

        def run():
            with torch.no_grad(), ops.use_backend(backend):
                if cuda_graph:
                    cond = net.condition(ctp)
                    return sampler.sample(unet_with_condition, LATENT, seeds, device=device, condition=cond)
                return sampler.sample(net.denoiser(ctp), LATENT, seeds, device=device)
        return run

    def monai_variant(steps, autocast, channels_last):
        net = monai_cl if channels_last else monai_unet

        def run():
            with torch.no_grad():
                return monai_sample(net, monai_scheduler, model.condition, ctp, steps, autocast, channels_last, seed=0)
        return run

    rows, notes = [], []
    if monai_note:
        notes.append(monai_note)
    if not on_gpu:
        notes.append("fused bf16 cl graph: CUDA graphs need a GPU")
    for steps in step_counts:
        variants = {"reference fp32 eager": ldmfast_variant("reference", steps),
                    "fused fp32": ldmfast_variant(fused, steps),
                    "fused bf16 cl": ldmfast_variant(fused, steps, torch.bfloat16, True)}
        if on_gpu:
            variants["fused bf16 cl graph"] = ldmfast_variant(fused, steps, torch.bfloat16, True, True)
        if monai_unet is not None:
            variants["monai fp32"] = monai_variant(steps, False, False)
            variants["monai bf16 cl"] = monai_variant(steps, True, True)
        variants = {k: v for k, v in variants.items() if k not in skip}
        # First calls apart (Triton compilation, cuDNN choice, graph capture), then alternating
        # rounds, so that a slow spell of a shared machine spreads over every variant.
        # Progress on stderr as it goes: a run cut short by a lease's time limit still leaves numbers.
        first = {}
        for v, fn in variants.items():
            first[v] = timed_call(fn, device, clock)
            print(f"  {steps} steps, {v}: first call {first[v][0]:.3g} s", file=sys.stderr, flush=True)
        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, fn in variants.items():
                times[v].append(timed_call(fn, device, clock)[0])
                print(f"  {steps} steps, {v}: {times[v][-1]:.3g} s", file=sys.stderr, flush=True)
        reference_out = first["reference fp32 eager"][1] if "reference fp32 eager" in first else None
        results = {}
        for variant, (first_s, out) in first.items():
            if not torch.isfinite(out).all():
                raise RuntimeError(f"{variant}: non-finite samples")
            s = statistics.median(times[variant])
            row = {"steps": steps, "variant": variant, "batch": batch, "s_per_batch": s,
                   "slices_per_s": batch / s, "first_call_s": first_s}
            if reference_out is not None and not variant.startswith("monai"):
                # Same weights and seeds: how far the fast paths move the samples (bf16 rounding).
                row["rel_diff_vs_ref"] = ((out - reference_out).norm() / reference_out.norm()).item()
            results[variant] = row
            rows.append(row)
        base = results.get("reference fp32 eager")
        monai = [results[v] for v in ("monai fp32", "monai bf16 cl") if v in results]
        best_monai = max(monai, key=lambda r: r["slices_per_s"]) if monai else None
        for row in results.values():
            if base is not None:
                row["x_vs_ref_fp32"] = row["slices_per_s"] / base["slices_per_s"]
            if best_monai is not None:
                row["x_vs_best_monai"] = row["slices_per_s"] / best_monai["slices_per_s"]

    params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    print(f"cLDM synthesis ({name} UNet, {params:.0f}M parameters, latent {'x'.join(map(str, LATENT))}, batch "
          f"{batch}) on {common.device_tag(device)} ({torch.get_num_threads()} threads); fused backend: {fused}")
    common.print_table(rows, ["steps", "variant", "slices_per_s", "s_per_batch", "first_call_s", "x_vs_ref_fp32",
                              "x_vs_best_monai", "rel_diff_vs_ref"])
    for note in notes:
        print(f"note: {note}")
    if not args.no_save:
        meta = {"config": name, "unet_params_M": params, "batch": batch, "latent": list(LATENT),
                "cudnn_benchmark": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "notes": notes,
                "clock": "thread_time" if args.cpu_time else "perf_counter", "repeats": args.repeats,
                "timing": "first call apart, then median of alternating rounds"}
        if monai_unet is not None:
            import monai
            meta["monai"] = monai.__version__
            meta["monai_params_M"] = sum(p.numel() for p in monai_unet.parameters()) / 1e6
        result_name = "synthesis_throughput-cputime" if args.cpu_time else "synthesis_throughput"
        print(f"saved {common.save(result_name, device, rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
