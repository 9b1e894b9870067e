"""The trainers' optimizers: torch's Adam and AdamW, fused into one kernel per step on CUDA.

The default (foreach) implementation allocates temporaries the size of the parameters during
its step; on an H200 those set the peak memory of a post-training step of the release UNet,
above everything the step's forward and backward held (bench/bench_posttrain.py). The fused
one computes the same update (to rounding) in place, and in fewer launches.
"""
from __future__ import annotations

from typing import Iterable

import torch

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
