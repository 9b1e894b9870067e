"""Peer models before and after `ldmfast.accelerate`, side by side in one process: forward
(no grad) of each model, and the DDIM sampling loop (scheduler step included, accelerated with
ldmfast.schedulers) of each denoiser.

    python bench/bench_accelerate.py                                   # CPU: small sizes, fp32
    python bench/bench_accelerate.py --threads 1 --cpu-time            # CPU time of one thread (shared machines)
    python bench/bench_accelerate.py --device cuda --dtype bfloat16    # GPU: the paper's sizes, bf16

Models (each skipped with a note where its library is missing):
  monai-unet       MONAI DiffusionModelUNet     denoiser on the 3 x 48 x 56 latent (+15 condition channels)
  diffusers-unet   diffusers UNet2DModel        the same denoiser layout
  openai-unet      openaimodel-style UNetModel  (tests/openaimodel_style.py), the reference release's layout
  monai-aekl       MONAI AutoencoderKL          decode of a 2-channel slice's latent
  diffusers-aekl   diffusers AutoencoderKL      encode + decode of a 2-channel slice
  diffusers-vq     diffusers VQModel            encode + decode of a 2-channel slice
GPU ("release") sizes follow PAPER.md: UNet width 224, multipliers 1, 4, 8, 2 residual blocks per
level, 32 channels per attention head at the two lower levels and the middle, batch 16 latents of
48 x 56; autoencoders of width 128, multipliers 1, 2, 4 on 192 x 224 slices. Weights are cast to
the dtype (as `torch_dtype=` pipelines do); the models run in their default contiguous format,
and with --channels-last (default on GPU) also with channels-last convolution weights, with and
without the fused ops (speedup_cl: over the model as built; speedup_cl_vs_torch_cl: over torch
with the same memory format); with --cuda-graphs (default on GPU) also with the inference forward
replayed from CUDA graphs, ldmfast's (channels-last) and torch's alike (speedup_graphs: over the
model as built; speedup_graphs_vs_torch_graphs: over torch replayed from graphs too).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))  # openaimodel_style.py
import common  # noqa: E402

import ldmfast  # noqa: E402
import ldmfast.schedulers  # noqa: E402

SIZES = {
    # UNet width, multipliers, attention levels; AE width, multipliers; image size; latent size
    "small": dict(unet=(32, (1, 2, 4)), ae=(32, (1, 2, 4)), image=(192, 224), latent=(48, 56), groups=8),
    "release": dict(unet=(224, (1, 4, 8)), ae=(128, (1, 2, 4)), image=(192, 224), latent=(48, 56), groups=32),
}
CONDITION, LATENT = 15, 3


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ---- the models -------------------------------------------------------------------------------

def monai_unet(s):
    from monai.networks.nets import DiffusionModelUNet
    width, mult = s["unet"]
    return DiffusionModelUNet(spatial_dims=2, in_channels=LATENT + CONDITION, out_channels=LATENT,
                              channels=tuple(width * m for m in mult), attention_levels=(False, True, True),
                              num_res_blocks=2, num_head_channels=32, norm_num_groups=s["groups"])


def diffusers_unet(s):
    from diffusers import UNet2DModel
    width, mult = s["unet"]
    return UNet2DModel(in_channels=LATENT + CONDITION, out_channels=LATENT,
                       block_out_channels=tuple(width * m for m in mult), layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=32, norm_num_groups=s["groups"])


def openai_unet(s):
    from openaimodel_style import UNetModel
    width, mult = s["unet"]
    return UNetModel(in_channels=LATENT + CONDITION, out_channels=LATENT, model_channels=width, channel_mult=mult,
                     num_res_blocks=2, attention_resolutions=(2, 4), num_head_channels=32, groups=s["groups"])


def monai_aekl(s):
    from monai.networks.nets import AutoencoderKL
    width, mult = s["ae"]
    return AutoencoderKL(spatial_dims=2, in_channels=2, out_channels=2, channels=tuple(width * m for m in mult),
                         attention_levels=(False, False, False), latent_channels=LATENT, num_res_blocks=2,
                         norm_num_groups=s["groups"])


def _diffusers_ae_kwargs(s):
    width, mult = s["ae"]
    n = len(mult)
    return dict(in_channels=2, out_channels=2, block_out_channels=tuple(width * m for m in mult),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=2, norm_num_groups=s["groups"], latent_channels=LATENT)


def diffusers_aekl(s):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**_diffusers_ae_kwargs(s))


def diffusers_vq(s):
    from diffusers import VQModel
    return VQModel(**_diffusers_ae_kwargs(s), num_vq_embeddings=8192, vq_embed_dim=LATENT)


# name: (library, build, kind); kind "unet" runs forward and the sampling loop, "ae" a forward
MODELS = {
    "monai-unet": ("monai", monai_unet, "unet"),
    "diffusers-unet": ("diffusers", diffusers_unet, "unet"),
    "openai-unet": (None, openai_unet, "unet"),
    "monai-aekl": ("monai", monai_aekl, "ae"),
    "diffusers-aekl": ("diffusers", diffusers_aekl, "ae"),
    "diffusers-vq": ("diffusers", diffusers_vq, "ae"),
}


# ---- what is timed ----------------------------------------------------------------------------

def unet_call(name, model, x, t):
    """One denoiser evaluation: MONAI's UNet takes a (B,) timestep tensor, diffusers' returns .sample."""
    if name == "monai-unet":
        return model(x, timesteps=t.expand(x.shape[0]))
    if name == "diffusers-unet":
        return model(x, t).sample
    return model(x, t.expand(x.shape[0]))


def ae_call(name, model, x):
    if name == "monai-aekl":
        return model.decode(x)  # x is a latent
    return model.decode(model.encode(x).latents if name == "diffusers-vq" else model.encode(x).latent_dist.mode()
                        ).sample


def make_scheduler(name, steps):
    """The denoiser's own library's DDIM scheduler (diffusers' for the openaimodel UNet), on the
    paper's schedule."""
    if name == "monai-unet":
        from monai.networks.schedulers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0195,
                              clip_sample=False)
    else:
        from diffusers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015,
                              beta_end=0.0195, clip_sample=False)
    sched.set_timesteps(steps)
    return sched


def sampling_loop(name, model, sched, z_T, cond):
    z = z_T
    for t in sched.timesteps:
        t_dev = t.to(z.device)
        eps = unet_call(name, model, torch.cat([z, cond], dim=1), t_dev)
        step = sched.step(eps, t, z)
        z = step[0] if isinstance(step, tuple) else step.prev_sample
    return z


# ---- the run ----------------------------------------------------------------------------------

class Acceleration:
    """Switch the model (and the scheduler) between the timed states between rounds:
    torch: as built; ldmfast: accelerate(model) and the fused DDIM step; with --channels-last also
    ldmfast+cl: accelerate(model, channels_last=True), and torch+cl: only the convolution weights
    channels-last (accelerate with the fused ops switched off), to tell what the memory format
    alone gives."""

    KWARGS = {"torch": None, "ldmfast": {}, "ldmfast+cl": {"channels_last": True},
              "torch+cl": {"group_norm": False, "attention": False, "channels_last": True},
              "ldmfast+cl+graphs": {"channels_last": True, "cuda_graphs": True},
              "torch+graphs": {"group_norm": False, "attention": False, "cuda_graphs": True}}

    def __init__(self, model, sched):
        self.model, self.sched, self.report, self.sched_on = model, sched, None, False

    def set(self, state):
        self.off()
        kwargs = self.KWARGS[state]
        if kwargs is None:
            return
        self.report = ldmfast.accelerate(self.model, **kwargs)
        if self.sched is not None and state.startswith("ldmfast"):
            ldmfast.schedulers.accelerate(self.sched)
            self.sched_on = True

    def off(self):
        if self.report is not None and self.report.active:
            ldmfast.restore(self.model)
        if self.sched_on:
            ldmfast.schedulers.restore(self.sched)
            self.sched_on = False


def paired_min_ms(fn, switch, states, min_run_time, sync, clock, capture=None):
    """Milliseconds per call of fn in each state, timed in alternating rounds, each the minimum
    over rounds: robust to other processes sharing the machine. `capture` (one denoiser call) runs
    untimed after each switch to a CUDA-graph state, whose graphs a switch drops: the timed call
    replays, as every call of a sampling loop but its first does."""
    best = dict.fromkeys(states, float("inf"))
    deadline = time.perf_counter() + len(states) * min_run_time
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        for state in states:
            switch.set(state)
            if rounds == 0:
                fn()  # warm up: Triton compilation, allocator, cuDNN's choice for the layout
            elif capture is not None and state.endswith("graphs"):
                capture()
            sync()
            t0 = clock()
            fn()
            sync()
            best[state] = min(best[state], (clock() - t0) * 1e3)
        rounds += 1
    switch.off()
    return best


def peak_GiB(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def build_model(name, s, device, dtype):
    """MODELS[name] at size s, in eval mode, on device in dtype (seeded weights)."""
    torch.manual_seed(0)
    model = MODELS[name][1](s).to(device=device, dtype=dtype).eval()
    if name == "openai-unet":
        # The release's convert_to_fp16 leaves its GroupNorm32 layers in float32.
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.float()
    return model


def bench_model(name, kind, s, args, device, dtype):
    model = build_model(name, s, device, dtype)
    batch = args.batch
    sched = None
    if kind == "unet":
        z = torch.randn(batch, LATENT, *s["latent"], device=device, dtype=dtype)
        cond = torch.randn(batch, CONDITION, *s["latent"], device=device, dtype=dtype)
        t = torch.tensor(500, device=device)
        sched = make_scheduler(name, args.steps)
        cases = [("forward", lambda: unet_call(name, model, torch.cat([z, cond], 1), t)),
                 (f"sampling {args.steps} steps", lambda: sampling_loop(name, model, sched, z, cond))]
    else:
        shape = (batch, LATENT, s["image"][0] // 4, s["image"][1] // 4) if name == "monai-aekl" else \
            (batch, 2, *s["image"])
        x = torch.randn(*shape, device=device, dtype=dtype)
        cases = [("decode" if name == "monai-aekl" else "encode+decode", lambda: ae_call(name, model, x))]
    switch = Acceleration(model, sched)
    gpu = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    states = ["torch", "ldmfast"] + (["ldmfast+cl", "torch+cl"] if args.channels_last else []) + \
        (["ldmfast+cl+graphs", "torch+graphs"] if args.cuda_graphs else [])
    rows = []
    with torch.no_grad():
        for what, fn in cases:
            ms = paired_min_ms(fn, switch, states, args.min_run_time, sync, clock, capture=cases[0][1])
            switch.set("ldmfast")
            report = switch.report
            row = {"model": name, "what": what, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                   "torch_ms": ms["torch"], "ldmfast_ms": ms["ldmfast"], "speedup": ms["torch"] / ms["ldmfast"],
                   "replaced": ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items())),
                   "left_alone": len(report.left_alone)}
            if args.channels_last:
                row.update({"ldmfast_cl_ms": ms["ldmfast+cl"], "speedup_cl": ms["torch"] / ms["ldmfast+cl"],
                            "torch_cl_ms": ms["torch+cl"], "speedup_cl_vs_torch_cl": ms["torch+cl"] / ms["ldmfast+cl"]})
            if args.cuda_graphs:
                ours = ms["ldmfast+cl+graphs"]
                row.update({"ldmfast_graphs_ms": ours, "speedup_graphs": ms["torch"] / ours,
                            "torch_graphs_ms": ms["torch+graphs"],
                            "speedup_graphs_vs_torch_graphs": ms["torch+graphs"] / ours})
            if gpu:
                row["ldmfast_peak_GiB"] = peak_GiB(fn, device)
                switch.off()
                row["torch_peak_GiB"] = peak_GiB(fn, device)
            switch.off()
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--size", choices=sorted(SIZES), help="default: release on GPU, small on CPU")
    p.add_argument("--batch", type=int, help="default: 16 on GPU, 2 on CPU")
    p.add_argument("--steps", type=int, help="DDIM steps of the sampling loop; default: 50 on GPU, 5 on CPU")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="seconds of timing per pair (alternating rounds, at least 3, minimum per call)")
    p.add_argument("--threads", type=int, help="torch threads (CPU; default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time with this thread's CPU time (needs --threads 1): immune to other processes")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="also time accelerate(model, channels_last=True), and torch with only its convolution "
                        "weights channels-last (default: on GPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also time accelerate(model, channels_last=True, cuda_graphs=True), and torch replayed "
                        "from CUDA graphs (default: on GPU)")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and (on_gpu or torch.get_num_threads() != 1):
        p.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    size = args.size or ("release" if on_gpu else "small")
    args.batch = args.batch or (16 if on_gpu else 2)
    args.steps = args.steps or (50 if on_gpu else 5)
    if args.channels_last is None:
        args.channels_last = on_gpu
    if args.cuda_graphs is None:
        args.cuda_graphs = on_gpu
    if args.cuda_graphs and not on_gpu:
        p.error("--cuda-graphs needs --device cuda")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    rows, skipped = [], []
    for name in names:
        library, _, kind = MODELS[name]
        if library is not None and not _have(library):
            skipped.append(f"{name} ({library} is not installed: pip install '.[peers]')")
            continue
        rows += bench_model(name, kind, SIZES[size], args, device, dtype)
        if on_gpu:
            torch.cuda.empty_cache()
        print(f"  done: {name}", flush=True)
    print(f"Peer models before/after ldmfast.accelerate on {common.device_tag(device)} "
          f"({torch.get_num_threads()} threads), size {size}, {dtype}")
    columns = ["model", "what", "batch", "dtype", "torch_ms", "ldmfast_ms", "speedup", "replaced", "left_alone"]
    if args.channels_last:
        columns[7:7] = ["torch_cl_ms", "ldmfast_cl_ms", "speedup_cl", "speedup_cl_vs_torch_cl"]
    if args.cuda_graphs:
        columns[7:7] = ["torch_graphs_ms", "ldmfast_graphs_ms", "speedup_graphs", "speedup_graphs_vs_torch_graphs"]
    if on_gpu:
        columns += ["torch_peak_GiB", "ldmfast_peak_GiB"]
    common.print_table(rows, columns)
    for s in skipped:
        print(f"skipped: {s}")
    if not args.no_save and rows:
        meta = {"size": size, "sizes": SIZES[size], "steps": args.steps, "skipped": skipped,
                "clock": "thread_time" if args.cpu_time else "perf_counter",
                "timing": "alternating rounds (accelerate / restore in between), minimum per call",
                "peers": {lib: _version(lib) for lib in ("monai", "diffusers")}}
        name = "accelerate-cputime" if args.cpu_time else "accelerate"
        print(f"saved {common.save(name, device, rows, meta)}")
    return 0


def _version(lib):
    try:
        from importlib.metadata import version
        return version(lib)
    except Exception:  # not installed
        return None


if __name__ == "__main__":
    sys.exit(main())
