"""Noise schedules and the parameterizations of what a denoiser predicts.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar_t the cumulative product of (1 - beta).
"linear" is the latent-diffusion release's schedule: linear in sqrt(beta) from beta_start to
beta_end (0.0015 to 0.0195 over 1000 steps in PAPER.md); "cosine" is Nichol & Dhariwal's.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")
PARAMETERIZATIONS = ("eps", "v", "x0")


def make_betas(name: str, num_steps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195,
               cosine_s: float = 0.008) -> torch.Tensor:
    """float64 betas of the named schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if name == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"beta_start, beta_end: need 0 < start <= end < 1, got {beta_start}, {beta_end}")
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    if name == "cosine":
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {name!r}")


class NoiseSchedule:
    """abar_t for t in [0, num_steps), forward noising, training targets and x0 recovery."""

    def __init__(self, name: str = "linear", num_steps: int = 1000, beta_start: float = 0.0015,
                 beta_end: float = 0.0195):
        self.name = name
        self.betas = make_betas(name, num_steps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.num_steps = num_steps

    def abar(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """abar at integer timesteps t (any shape), as float64 on t's device; with `like`, shaped
        (N, 1, ..., 1) to broadcast against it and in its dtype."""
        a = self.alphas_cumprod.to(t.device)[t.long()]
        if like is not None:
            a = a.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)
        return a

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, parameterization: str) -> torch.Tensor:
        """What a denoiser of the given parameterization should output for x_t = add_noise(x0, noise, t)."""
        _check_parameterization(parameterization)
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        a = self.abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
                   parameterization: str) -> torch.Tensor:
        """x0_hat from the denoiser's output at x_t (differentiable; used by post-training)."""
        _check_parameterization(parameterization)
        if parameterization == "x0":
            return model_output
        a = self.abar(t, x_t)
        if parameterization == "eps":
            return (x_t - (1 - a).sqrt() * model_output) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * model_output


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization: must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")
