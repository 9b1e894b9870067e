"""Peak memory and time of one lesion-aware post-training step (PAPER.md stage 3: forward,
backward and AdamW step (the trainers': fused on CUDA) of the UNet and the condition module),
eight ways, side by side:

  naive             what a direct implementation does: D(x0_hat) and the target D(z0) both decoded
                    by `vqgan.decode` with the graph recorded (the decoder's parameters still require
                    gradients; it is "frozen" only by being left out of the optimizer), so the
                    backward runs through two decoders and computes their weight gradients
  no_ckpt           ldmfast.train.posttrain_loss without checkpointing: the target decoded without
                    gradient, D(x0_hat) differentiable in x0_hat only
  decoder_ckpt      the same with gradient checkpointing of each decoder block (the default)
  decoder_unet_ckpt and UNet.gradient_checkpointing
  step_in_backward  and AdamW applied to each parameter inside the backward, its gradient freed at
                    once (train.step_in_backward; ldmfast.train.step_in_backward): the step holds
                    no gradient of the whole UNet
  lean_8bit         and AdamW's moments in 8 bits (optim.state_bits = 8; ldmfast.train.adamw8bit):
                    2 bytes of state per parameter instead of 8. Not PAPER.md's optimizer: the
                    other variants' update, to the rounding of its stored moments. Its peak is
                    what the process held less the float32 AdamW state the other variants share
                    (which exists beside its own here, and which a run with it would not have;
                    --max-batch searches beside it too, so its largest batch is understated).
  decoder_8bit      lean_8bit without UNet checkpointing: the UNet's forward runs once, at the
                    memory cost of its activations (the other way to trade time for memory)
  recast_8bit       decoder_8bit whose backward casts each weight to 16 bits again instead of
                    keeping autocast's copies from the forward (train.recast_weight_copies;
                    ldmfast.train.recast): without the 16-bit copy of every UNet weight that
                    decoder_8bit holds through the forward, for one cast per weight

    python bench/bench_posttrain.py                              # CPU: --config small
    python bench/bench_posttrain.py --device cuda                # GPU: --config release, bf16, + batch 24 peaks
    python bench/bench_posttrain.py --device cuda --max-batch    # + the largest batch under 80 GiB
    python bench/bench_posttrain.py --threads 1 --cpu-time       # CPU time of one thread (shared machines)

Configs: small = VQGANConfig.demo() and UNetConfig.demo() on 96 x 112 slices, batch 6;
release = PAPER.md's VQGAN and UNet on 192 x 224 slices, batch 6. Encoding z0 is not part of the
step (the same for all). Memory: on the CPU, the peak resident memory (VmHWM) of a fresh
process per variant over its first steps, above its resident memory once models, batch and
optimizer state exist; on a GPU, torch.cuda.max_memory_allocated over a step, in total and above
the memory allocated before it (models, optimizer state, batch). Time: the minimum over
alternating rounds of the variants in one process (robust to a shared machine).
Goals on a GPU: a post-training step at most 40% of naive's peak for at most 1.3x its time.
The models and AdamW's state (and the trainer's EMA, not built here) are the same for every
variant, so the "extra" columns (peak above the memory held before the step) are where they differ.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmfast.diffusion import NoiseSchedule  # noqa: E402
from ldmfast.models import VQGAN, ConditionalLDM, UNetConfig, VQGANConfig, to_latent  # noqa: E402
from ldmfast.train import PostTrainLossConfig, adamw8bit, optim, posttrain_loss  # noqa: E402
from ldmfast.train.recast import recast_weight_copies, training_autocast  # noqa: E402
from ldmfast.train.step_in_backward import StepInBackward  # noqa: E402

VARIANTS = ("naive", "no_ckpt", "decoder_ckpt", "decoder_unet_ckpt", "step_in_backward", "lean_8bit",
            "decoder_8bit", "recast_8bit")
# variants stepping inside the backward, and their AdamW state bits
IN_BACKWARD = {"step_in_backward": 32, "lean_8bit": 8, "decoder_8bit": 8, "recast_8bit": 8}
UNET_CKPT = ("decoder_unet_ckpt", "step_in_backward", "lean_8bit")
RECAST = ("recast_8bit",)
CONFIGS = {"small": (96, 112), "release": (192, 224)}


class Setup:
    """Models, optimizer and one batch of a post-training step."""

    def __init__(self, config: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        torch.manual_seed(seed)
        size = CONFIGS[config]
        small = config == "small"
        vq_config = VQGANConfig.demo() if small else VQGANConfig.release()
        unet_config = UNetConfig.demo() if small else UNetConfig()
        unet_config.in_channels, unet_config.out_channels = vq_config.latent_channels + 15, vq_config.latent_channels
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        # Eval mode, parameters left requiring gradients: the naive variant needs them, and
        # posttrain_loss gives them none whatever their flag.
        self.vqgan = VQGAN(vq_config).to(device, memory_format=fmt).eval()
        self.ldm = ConditionalLDM(unet_config, latent_channels=vq_config.latent_channels).to(device, memory_format=fmt)
        self.ldm.train()
        self.optimizer = optim.adamw(self.ldm.parameters(), lr=2e-6 * batch)  # the trainer's (fused on CUDA)
        self._in_backward: dict[int, StepInBackward] = {}  # by AdamW state bits
        self.schedule = NoiseSchedule()
        self.device, self.dtype, self.size, self.fmt = device, dtype, size, fmt
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        """A random batch: images and CTP in [-1, 1], a disc of brain with a small lesion in it."""
        device, g, (h, w) = self.device, self.generator, self.size
        self.image = (torch.rand(batch, 2, h, w, device=device, generator=g) * 2 - 1).contiguous(memory_format=self.fmt)
        self.ctp = (torch.rand(batch, 15, h, w, device=device, generator=g) * 2 - 1).contiguous(memory_format=self.fmt)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                                indexing="ij")
        self.brain = (yy ** 2 + xx ** 2 < 0.8).float().expand(batch, 1, h, w).contiguous()
        self.lesion = ((yy - 0.2) ** 2 + (xx + 0.3) ** 2 < 0.02).float().expand(batch, 1, h, w).contiguous()
        with torch.no_grad(), self.autocast():
            self.z0 = to_latent(self.vqgan, self.image).float()

    def autocast(self):
        """The trainers' autocast (ldmfast.train.recast.training_autocast), off in float32."""
        return training_autocast(self.device.type, None if self.dtype == torch.float32 else self.dtype)

    def init_optimizer_state(self) -> None:
        """AdamW's moments exist from here on, as in a run past its first step (a zero-gradient
        step allocates them; the update it makes does not matter to a benchmark)."""
        for p in self.ldm.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def in_backward_optimizer(self, bits: int) -> StepInBackward:
        """AdamW applied per parameter inside the backward, with `bits`-bit state, made once from the
        plain one's state (the float32 one shares its state tensors: load_state_dict keeps them; the
        8-bit one quantizes them) and left detached. One per state width: the variants stepping
        inside the backward with the same width share it."""
        if bits not in self._in_backward:
            make = optim.adamw_maker(bits, lr=self.optimizer.defaults["lr"])
            stepper = StepInBackward(list(self.ldm.parameters()), make)
            stepper.remove()  # attached by step() for the variants that use it
            stepper.load_state_dict(self.optimizer.state_dict())
            self._in_backward[bits] = stepper
        return self._in_backward[bits]

    def prepare(self, variant: str) -> None:
        """Make `variant`'s optimizer state before a measurement, so that the step measured is a
        steady one (a first in-backward step would also count quantizing the state)."""
        if variant in IN_BACKWARD:
            self.in_backward_optimizer(IN_BACKWARD[variant])

    def foreign_state_bytes(self, variant: str) -> int:
        """Bytes of AdamW state that this process holds beside `variant`'s own, which a run of
        `variant` alone would not have: the float32 state beside an 8-bit variant's, and beside the
        others the 8-bit state once it exists."""
        if IN_BACKWARD.get(variant) == 8:
            return adamw8bit.state_bytes(self.optimizer)
        eight = self._in_backward.get(8)
        return sum(adamw8bit.state_bytes(o) for o in eight.optimizers) if eight else 0

    def step(self, variant: str, after_backward=None) -> float:
        self.ldm.unet.gradient_checkpointing = variant in UNET_CKPT
        optimizer = self.optimizer
        if variant in IN_BACKWARD:
            optimizer = self.in_backward_optimizer(IN_BACKWARD[variant])
            optimizer.attach()
        try:
            with self.autocast(), recast_weight_copies(variant in RECAST):
                if variant == "naive":
                    loss = naive_loss(self)
                else:
                    config = PostTrainLossConfig(decoder_checkpoint=variant != "no_ckpt")
                    loss = posttrain_loss(self.ldm.denoiser(self.ctp), self.vqgan, self.schedule, self.z0,
                                          self.image, self.brain, self.lesion, config=config,
                                          generator=self.generator).total
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
        finally:
            if optimizer is not self.optimizer:
                optimizer.remove()  # the other variants step after the backward
            optimizer.zero_grad(set_to_none=True)
            self.vqgan.zero_grad(set_to_none=True)  # the naive way leaves weight gradients there
        return loss.item()


def naive_loss(s: Setup) -> torch.Tensor:
    """PAPER.md's loss as a direct implementation writes it (module docstring: naive)."""
    n = s.z0.shape[0]
    t = torch.randint(0, s.schedule.num_steps, (n,), device=s.device, generator=s.generator)
    noise = torch.randn(s.z0.shape, device=s.device, generator=s.generator)
    x_t = s.schedule.add_noise(s.z0, noise, t)
    eps_hat = s.ldm.denoiser(s.ctp)(x_t, t)
    latent = torch.mean((eps_hat.float() - noise) ** 2)
    x0_hat = s.schedule.predict_x0(x_t, t, eps_hat.float(), "eps")
    decoded = s.vqgan.decode(s.vqgan.quantize(x0_hat).z_q)
    target = s.vqgan.decode(s.vqgan.quantize(s.z0).z_q)
    error = (decoded.float() - target.float()).square().sum(1, keepdim=True)
    image = error.sum() / s.brain.sum()
    lesion = (error * s.lesion).sum() / s.lesion.sum().clamp(min=1)
    return latent + 0.01 * image + 0.02 * lesion


# ---- memory ----------------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_cpu_memory(args) -> dict:
    """Run in a fresh process (cpu_memory sets its malloc up): peak resident memory of steps of
    `args.probe`, after a warm-up step that pages in code and creates thread pools and caches."""
    s = Setup(args.config, args.batch, torch.device("cpu"), torch.float32)
    s.init_optimizer_state()
    s.step(args.probe)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the baseline is what is live
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    for _ in range(args.probe_steps):
        s.step(args.probe)
    peak = _status_bytes("VmHWM")
    return {"peak_MiB": (peak - s.foreign_state_bytes(args.probe)) / 2**20, "extra_MiB": (peak - base) / 2**20}


def cpu_memory(args) -> dict[str, dict]:
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--probe", variant, "--config", args.config, "--batch", str(args.batch),
               "--threads", str(torch.get_num_threads())]
        # A fixed mmap threshold: every tensor of 128 KiB or more is its own mapping, returned to
        # the system when freed, so resident memory follows live tensors (glibc otherwise raises
        # the threshold as blocks are freed and keeps them in its heap).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def cuda_memory(s: Setup, variant: str) -> dict:
    s.prepare(variant)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    # The forward+backward peak is also reported, the part the variants differ in: the optimizer's
    # step allocates the same for every variant (the foreach AdamW's UNet-sized temporaries set the
    # step's peak on an H200 whatever the checkpointing; the trainers' fused AdamW, used here, has
    # none).
    grad_peak = []
    s.step(variant, after_backward=lambda: grad_peak.append(torch.cuda.max_memory_allocated()))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_MiB": (peak - s.foreign_state_bytes(variant)) / 2**20, "extra_MiB": (peak - base) / 2**20,
            "fwdbwd_extra_MiB": (grad_peak[0] - base) / 2**20}


def largest_batch(s: Setup, variant: str, limit: int = 1024, estimate: int | None = None,
                  tolerance: float = 0.05) -> int:
    """The largest batch whose step fits beside the models and the optimizer state of `s`: by
    doubling, then bisection; or, from an `estimate` (the linear memory model's), by steps of
    `tolerance` up or down from it until the answer is bracketed that closely (a few steps, each at
    a batch of hundreds: the bisection's many large-batch steps ran past a lease's time)."""
    def fits(batch: int) -> bool:
        try:
            s.set_batch(batch)
            s.step(variant)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            s.image = s.ctp = s.brain = s.lesion = s.z0 = None
            s.optimizer.zero_grad(set_to_none=True)
            s.vqgan.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    if estimate is not None and estimate > 0:
        stride = max(1, int(estimate * tolerance))
        batch = min(estimate, limit)
        if fits(batch):
            while batch + stride <= limit and fits(batch + stride):
                batch += stride
            return batch
        while batch > stride:
            batch -= stride
            if fits(batch):
                return batch
        # (the estimate was far off: search from the bottom)
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def linear_memory_model(at_b1: dict, at_b2: dict, b1: int, b2: int, cap_gib: float) -> dict:
    """Peak memory is fixed (models, optimizer state, gradients) plus per-sample activations:
    the slope between two batches gives the per-sample memory (whose ratio to naive's is the peak
    ratio at large batches) and an estimate of the largest batch under the cap, without the
    search's many steps at large batches."""
    out = {}
    for v in at_b1:
        per_sample = (at_b2[v]["peak_MiB"] - at_b1[v]["peak_MiB"]) / (b2 - b1)
        fixed = at_b1[v]["peak_MiB"] - b1 * per_sample
        out[v] = {"per_sample_MiB": per_sample, "est_max_batch": int((cap_gib * 1024 - fixed) // per_sample)}
    for v in out:
        out[v]["per_sample_vs_naive"] = out[v]["per_sample_MiB"] / out["naive"]["per_sample_MiB"]
    return out


# ---- time ------------------------------------------------------------------------------------

def alternating_min_ms(s: Setup, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    """Milliseconds per step of each variant: the minimum over rounds that run all variants in turn.
    clock=time.thread_time counts this thread's CPU time only (one thread: the CPU autograd engine
    runs the backward in the calling thread)."""
    best = {v: float("inf") for v in VARIANTS}
    sync = torch.cuda.synchronize if s.device.type == "cuda" else (lambda: None)
    for v in VARIANTS:  # warm-up: first-call costs are not the steady state
        s.step(v)
    for _ in range(rounds):
        for v in VARIANTS:
            sync()
            start = clock()
            s.step(v)
            sync()
            best[v] = min(best[v], (clock() - start) * 1e3)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", choices=list(CONFIGS), help="default: small on the CPU, release on a GPU")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype; default bf16 on GPU, fp32 on CPU")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (each runs every variant once)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time by this thread's CPU time (needs --threads 1)")
    p.add_argument("--max-batch", action="store_true", help="GPU: search the largest batch per variant (within 5 "
                   "percent, from the estimate of --scaling-batch where there is one)")
    p.add_argument("--max-batch-variants", default=",".join(VARIANTS),
                   help="GPU: the variants --max-batch searches (comma-separated; default: all)")
    p.add_argument("--scaling-batch", type=int, default=None,
                   help="GPU: also measure peaks at this batch; per-sample memory and an estimated largest "
                        "batch under --memory-cap-gib from the two (default: 4x --batch on GPU; 0: off)")
    p.add_argument("--memory-cap-gib", type=float, default=80.0, help="GPU memory the batch search may use")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.config = args.config or ("release" if on_gpu else "small")
    if args.probe:
        print(json.dumps(probe_cpu_memory(args)))
        return 0
    searched = [v for v in args.max_batch_variants.split(",") if v]
    unknown = sorted(set(searched) - set(VARIANTS))
    if unknown:
        p.error(f"--max-batch-variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.cpu_time and (on_gpu or torch.get_num_threads() != 1):
        p.error("--cpu-time measures one CPU thread: use it with --device cpu --threads 1")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    if args.scaling_batch is None:
        args.scaling_batch = 4 * args.batch if on_gpu else 0

    s = Setup(args.config, args.batch, device, dtype)
    s.init_optimizer_state()
    memory = {v: cuda_memory(s, v) for v in VARIANTS} if on_gpu else cpu_memory(args)
    ms = alternating_min_ms(s, args.rounds, time.thread_time if args.cpu_time else time.perf_counter)
    scaling = {}
    if on_gpu and args.scaling_batch:
        s.set_batch(args.scaling_batch)
        scaling = linear_memory_model(memory, {v: cuda_memory(s, v) for v in VARIANTS}, args.batch,
                                      args.scaling_batch, args.memory_cap_gib)
    max_batch = {}
    if on_gpu and args.max_batch:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
        max_batch = {v: largest_batch(s, v, estimate=scaling.get(v, {}).get("est_max_batch"))
                     for v in searched}
    del s

    size = CONFIGS[args.config]
    rows = []
    for v in VARIANTS:
        row = {"variant": v, "config": args.config, "batch": args.batch, "size": f"{size[0]}x{size[1]}",
               "dtype": str(dtype).replace("torch.", ""), "step_ms": ms[v], "time_vs_naive": ms[v] / ms["naive"],
               **memory[v], "peak_vs_naive": memory[v]["peak_MiB"] / memory["naive"]["peak_MiB"],
               "extra_vs_naive": memory[v]["extra_MiB"] / memory["naive"]["extra_MiB"]}
        if "fwdbwd_extra_MiB" in memory[v]:
            row["fwdbwd_extra_vs_naive"] = memory[v]["fwdbwd_extra_MiB"] / memory["naive"]["fwdbwd_extra_MiB"]
        row.update(scaling.get(v, {}))
        if v in max_batch:
            row["max_batch"] = max_batch[v]
        rows.append(row)
    columns = ["variant", "config", "batch", "size", "dtype", "step_ms", "time_vs_naive", "peak_MiB",
               "peak_vs_naive", "extra_MiB", "extra_vs_naive"] + \
        (["fwdbwd_extra_MiB", "fwdbwd_extra_vs_naive"] if on_gpu else []) + \
        (["per_sample_MiB", "per_sample_vs_naive", "est_max_batch"] if scaling else []) + \
        (["max_batch"] if max_batch else [])
    print(f"post-training step on {common.device_tag(device)} ({torch.get_num_threads()} threads), "
          f"{args.config} config; memory: {'max_memory_allocated' if on_gpu else 'VmHWM of a fresh process'}")
    common.print_table(rows, columns)
    if not args.no_save:
        meta = {"config": args.config, "rounds": args.rounds,
                "clock": "thread_time" if args.cpu_time else "perf_counter",
                "memory": "max_memory_allocated" if on_gpu else "VmHWM of a fresh process per variant",
                "memory_cap_GiB": args.memory_cap_gib if max_batch else None}
        name = "posttrain-cputime" if args.cpu_time else "posttrain"
        print(f"saved {common.save(name, device, rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
