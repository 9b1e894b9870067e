"""DDIM sampling on the fused DDIM op, with per-slice seeds.

Every random draw of a slice (its starting noise and, for eta > 0, each step's noise) comes from a
generator seeded for that slice alone, so a slice's output does not depend on what else is in its
batch: synthesis can batch slices across volumes freely and still reproduce a case exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ldmfast import ops

from .schedule import NoiseSchedule

SPACINGS = ("uniform", "trailing")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(num_train_steps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Descending timesteps for num_steps DDIM steps. "uniform": 0, c, 2c, ... (c = T // steps), as the
    latent-diffusion release samples; "trailing": ending at T - 1 (Lin et al. 2024), better for few steps."""
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


def slice_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def per_slice_normal(generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """One standard normal draw of `shape` per slice, each from its own generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in generators])


class DDIMSampler:
    """x_T ~ N(0, I) per slice, then `steps` fused DDIM updates down to x_0."""

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, spacing: str = "uniform",
                 parameterization: str = "eps", clip_x0: float | None = None):
        self.schedule = schedule
        self.timesteps = ddim_timesteps(schedule.num_steps, steps, spacing)
        self.eta, self.parameterization, self.clip_x0 = float(eta), parameterization, clip_x0

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, shape: Sequence[int], seeds: Sequence[int], device=None,
               dtype=torch.float32, progress: bool = False) -> torch.Tensor:
        """Samples of shape (len(seeds), *shape). denoiser(x_t, t) gets t as a (N,) long tensor."""
        device = torch.device(device or "cpu")
        generators = slice_generators(seeds, device)
        x = per_slice_normal(generators, shape, device, dtype)
        abar = self.schedule.alphas_cumprod
        for i, t in enumerate(tqdm(self.timesteps, desc="DDIM", disable=not progress, leave=False)):
            t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else None
            a_t = float(abar[t])
            a_prev = float(abar[t_prev]) if t_prev is not None else 1.0  # the last step lands on x0
            out = denoiser(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long))
            noise = per_slice_normal(generators, shape, device, dtype) if self.eta > 0 else None
            x = ops.ddim_step(x, out.to(dtype), a_t, a_prev, eta=self.eta, noise=noise,
                              parameterization=self.parameterization, clip_x0=self.clip_x0)
        return x
