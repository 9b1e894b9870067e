"""The DDPM training loss: mean squared error between the denoiser's output and its target."""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_timesteps(n: int, schedule: NoiseSchedule, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t uniform over [0, num_steps)."""
    return torch.randint(0, schedule.num_steps, (n,), device=device, generator=generator)


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, parameterization: str = "eps",
                   generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """mean((denoiser(x_t, t) - target)^2) for uniform t and Gaussian noise (both drawable by the caller)."""
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule, x0.device, generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    out = denoiser(x_t, t)
    return torch.mean((out.float() - schedule.target(x0, noise, t, parameterization).float()) ** 2)
