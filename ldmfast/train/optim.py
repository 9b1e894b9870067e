"""The trainers' optimizers: torch's Adam and AdamW, fused into one kernel per step on CUDA, and
AdamW with 8-bit moments (adamw8bit.py).

The default (foreach) implementation allocates temporaries the size of the parameters during
its step; on an H200 those set the peak memory of a post-training step of the release UNet,
above everything the step's forward and backward held (bench/bench_posttrain.py). The fused
one computes the same update (to rounding) in place, and in fewer launches.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .adamw8bit import AdamW8bit

# How an optimizer computes, not what it has learned: a checkpoint written by a fused run resumes
# with the resuming optimizer's own choice (a CPU run's, say).
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _fused(params: list[torch.Tensor]) -> bool | None:
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def adam(params: Iterable[torch.Tensor], **kwargs) -> torch.optim.Adam:
    params = list(params)
    return torch.optim.Adam(params, fused=_fused(params), **kwargs)


def adamw(params: Iterable[torch.Tensor], **kwargs) -> torch.optim.AdamW:
    params = list(params)
    return torch.optim.AdamW(params, fused=_fused(params), **kwargs)


def adamw_maker(state_bits: int = 32, seed: int = 0, **kwargs) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """make(params): AdamW over params with float32 moments (state_bits 32) or 8-bit ones (8).
    Successive calls number their parameters on, which seeds the 8-bit rounding: one optimizer
    over a whole model and StepInBackward's one per parameter (made in the model's order) round
    alike, and their checkpoints resume each other exactly."""
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits: must be 8 or 32, got {state_bits!r}")
    made = 0

    def make(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        nonlocal made
        params = list(params)
        opt = AdamW8bit(params, seed=seed + made, **kwargs) if state_bits == 8 else adamw(params, **kwargs)
        made += len(params)
        return opt

    return make
