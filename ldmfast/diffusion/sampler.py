"""DDIM sampling on the fused DDIM op, with per-slice seeds.

Every random draw of a slice (its starting noise and, for eta > 0, each step's noise) comes from a
generator seeded for that slice alone, so a slice's output does not depend on what else is in its
batch: synthesis can batch slices across volumes freely and still reproduce a case exactly.
Several samples of one input get seeds derived from the input's seed (sample 0 keeps it).

The fast paths are options of the sampler: bf16 autocast of the denoiser, channels-last inputs,
and on CUDA one CUDA graph per static batch shape holding a denoiser call and the DDIM update.
The update itself always runs in the state's dtype with abar as device tensors
(ops.ddim_step_capturable), so the sampling loop never waits on the GPU.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldmfast import ops
from ldmfast._values import is_integer, is_number

from .cuda_graph import GraphCache, GraphedStep
from .schedule import PARAMETERIZATIONS, NoiseSchedule

SPACINGS = ("uniform", "trailing")
Denoiser = Callable[..., torch.Tensor]  # (x_t, t) -> output, or (x_t, t, condition) -> output


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Descending timesteps for num_steps DDIM steps. "uniform": 0, c, 2c, ... (c = T // steps; the
    latent-diffusion release's make_ddim_timesteps adds 1 to each, and its last step ends at
    alphas_cumprod[0] where this one ends at 1); "trailing": ending at T - 1 (Lin et al. 2024),
    better for few steps."""
    if not is_integer(num_steps):
        raise ValueError(f"steps: must be an integer in 1..{num_train_steps}, got {num_steps!r}")
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps: must be in 1..{num_train_steps}, got {num_steps}")
    if spacing == "uniform":
        c = num_train_steps // num_steps
        ts = list(range(0, c * num_steps, c))
    elif spacing == "trailing":
        ts = sorted({round(num_train_steps - i * num_train_steps / num_steps) - 1 for i in range(num_steps)})
    else:
        raise ValueError(f"spacing: must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    return ts[::-1]


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of an input seeded `seed`. Sample 0 keeps the input's seed, so one
    sample per input reproduces the single-sample result; others get a SplitMix64 mix of (seed,
    index): reproducible, and distinct from each other and from the inputs' seeds up to 64-bit
    collisions."""
    if index == 0:
        return int(seed)
    z = (int(seed) + index * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63  # a non-negative int64: any generator accepts it


def expand_seeds(seeds: Sequence[int], samples_per_input: int) -> list[int]:
    """Input-major seeds of every sample: input i's sample s is row i * samples_per_input + s."""
    return [sample_seed(seed, s) for seed in seeds for s in range(samples_per_input)]


def _check_seeds(seeds) -> list[int]:
    try:
        values = list(seeds)
    except TypeError:
        raise ValueError(f"seeds: must be a sequence of ints (one per input), got {type(seeds).__name__}") from None
    if not values:
        raise ValueError("seeds: needs at least one seed (one per input)")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds: must be ints, got {s!r}")
    return [int(s) for s in values]


def slice_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def per_slice_normal(generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """One standard normal draw of `shape` per slice, each from its own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in generators])


class DDIMSampler:
    """x_T ~ N(0, I) per slice, then `steps` fused DDIM updates down to x_0.

    steps, spacing ("uniform" or "trailing"), eta >= 0, parameterization and clip_x0 define the
    sampler; the rest are speed options that leave the result the same up to their rounding:
    samples_per_input: samples drawn per input (per seed), returned input-major.
    autocast: None, torch.bfloat16 or torch.float16: the denoiser runs under torch.autocast; the
        state and the DDIM update stay in the sampling dtype.
    channels_last: the denoiser gets its input (and condition) in channels-last memory format;
        the model's weights are the caller's (model.to(memory_format=torch.channels_last)).
    cuda_graph: on CUDA, capture one denoiser call + DDIM update per static batch shape and
        replay it every step (see sample() for what may change between replays).
    """

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, spacing: str = "uniform",
                 parameterization: str = "eps", clip_x0: float | None = None, samples_per_input: int = 1,
                 autocast: Optional[torch.dtype] = None, channels_last: bool = False, cuda_graph: bool = False):
        if not is_number(eta) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: must be one of {', '.join(PARAMETERIZATIONS)}, "
                             f"got {parameterization!r}")
        if clip_x0 is not None and (not isinstance(clip_x0, (int, float)) or not clip_x0 > 0):
            raise ValueError(f"clip_x0: must be None or a number > 0, got {clip_x0!r}")
        if not is_integer(samples_per_input) or samples_per_input < 1:
            raise ValueError(f"samples_per_input: must be an int >= 1, got {samples_per_input!r}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast: must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.schedule = schedule
        self.timesteps = ddim_timesteps(schedule.num_steps, steps, spacing)
        self.eta, self.parameterization, self.clip_x0 = float(eta), parameterization, clip_x0
        self.samples_per_input = samples_per_input
        self.autocast, self.channels_last, self.cuda_graph = autocast, bool(channels_last), bool(cuda_graph)
        self._graphs = GraphCache()
        self._tables: dict = {}

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, shape: Sequence[int], seeds: Sequence[int], device=None,
               dtype=torch.float32, progress: bool = False, condition: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """Samples of shape (len(seeds) * samples_per_input, *shape), input-major (reshape to
        (len(seeds), samples_per_input, *shape) to group them), in `dtype`.

        denoiser(x_t, t) gets t as an (N,) long tensor, N = len(seeds) * samples_per_input; a
        closure over a per-input condition must then hold it repeated samples_per_input times
        (repeat_interleave). With `condition` (one row per input), the sampler repeats it and calls
        denoiser(x_t, t, condition) instead. With cuda_graph, a graph is kept per denoiser and
        batch shape, reading the condition from a static buffer: pass one persistent denoiser
        and the batch's condition to reuse it across batches (a new closure per batch is
        captured anew, as the graph would otherwise read the old closure's tensors). A graph reads
        the weights where they were at capture: after moving, converting or reloading the model
        in place, call clear_graphs().
        """
        device = torch.device(device or "cpu")
        shape = tuple(int(d) for d in shape)
        seeds = _check_seeds(seeds)
        self._check_call(shape, seeds, device, condition)
        generators = slice_generators(expand_seeds(seeds, self.samples_per_input), device)
        n = len(generators)
        x = self._layout(per_slice_normal(generators, shape, device, dtype))
        if condition is not None:
            condition = self._layout(condition.to(device).repeat_interleave(self.samples_per_input, 0))
        t_rows, abar_t_rows, abar_prev_rows = self._step_tables(n, device)

        def step_noise():
            return per_slice_normal(generators, shape, device, dtype) if self.eta > 0 else None

        update = self._update_fn(denoiser, condition is not None)
        steps = tqdm(range(len(self.timesteps)), desc="DDIM", disable=not progress, leave=False)
        if not self.cuda_graph:
            for i in steps:
                x = update(x, t_rows[i], abar_t_rows[i], abar_prev_rows[i], step_noise(), condition)
            return x.contiguous()
        noise = step_noise()
        # id(): any callable will do; the graph holds the denoiser, so its id stays unique meanwhile.
        key = (id(denoiser), n, shape, dtype, device, None if condition is None else (condition.shape, condition.dtype),
               noise is not None, self.autocast, self.channels_last, self.eta, self.parameterization, self.clip_x0)
        graph = self._graphs.get(key, lambda: GraphedStep(
            update, x, t_rows[0], abar_t_rows[0], abar_prev_rows[0], noise, condition))
        graph.set_state(x, condition)
        for i in steps:
            graph.step(t_rows[i], abar_t_rows[i], abar_prev_rows[i], noise if i == 0 else step_noise())
        # A copy: the static state is overwritten by the graph's next batch.
        return graph.state.clone(memory_format=torch.contiguous_format)

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs and the memory they hold."""
        self._graphs.clear()

    # ---- parts of sample() ---------------------------------------------------------------------

    def _check_call(self, shape, seeds, device, condition) -> None:
        if self.channels_last and len(shape) != 3:
            raise ValueError(f"channels_last: needs a (C, H, W) sample shape, got {shape}")
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph: CUDA-graph capture needs device='cuda', got {device}; "
                             "sample on a GPU or set cuda_graph=False")
        if condition is not None:
            if not isinstance(condition, torch.Tensor) or condition.dim() < 1 or condition.shape[0] != len(seeds):
                raise ValueError(f"condition: must be a tensor with one row per seed ({len(seeds)}), got "
                                 f"{getattr(condition, 'shape', type(condition).__name__)}")
            if self.channels_last and condition.dim() != 4:
                raise ValueError(f"condition: channels_last needs an (N, C, H, W) condition, got {condition.dim()}-d")

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def _step_tables(self, n: int, device: torch.device):
        """Per step: t (N,) long, abar_t and abar_prev (N,) float64 on the device, built once per batch
        size and device, so that the loop makes no host-to-device copy."""
        key = (n, device)
        if key not in self._tables:
            ts = self.timesteps
            abar = self.schedule.alphas_cumprod
            t = torch.tensor(ts, dtype=torch.long)
            a_t = abar[t]
            a_prev = torch.cat([a_t[1:], torch.ones(1, dtype=a_t.dtype)])  # the last step lands on x0
            self._tables = {key: tuple(v[:, None].expand(len(ts), n).contiguous().to(device)
                                       for v in (t, a_t, a_prev))}  # one batch size kept
        return self._tables[key]

    def _update_fn(self, denoiser: Denoiser, with_condition: bool) -> Callable[..., torch.Tensor]:
        """The step the eager loop calls and a CUDA graph captures: denoiser call (under autocast
        if asked) and the fused DDIM update in the state's dtype."""
        eta, parameterization, clip_x0 = self.eta, self.parameterization, self.clip_x0

        def autocast_ctx(device: torch.device):
            if self.autocast is None:
                return contextlib.nullcontext()
            # No weight-cast cache: each weight is used once per call, and a cache filled during
            # a graph capture would hold tensors of the graph's pool.
            return torch.autocast(device.type, dtype=self.autocast, cache_enabled=False)

        def update(x, t, abar_t, abar_prev, noise, condition):
            with autocast_ctx(x.device):
                out = denoiser(x, t, condition) if with_condition else denoiser(x, t)
            return ops.ddim_step_capturable(x, out.to(x.dtype), abar_t, abar_prev, eta=eta, noise=noise,
                                            parameterization=parameterization, clip_x0=clip_x0)

        return update
