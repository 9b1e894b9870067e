"""Learning rate as a function of the step alone (so that resuming keeps runs bit-identical):
an optional linear warm-up, then constant or cosine decay to min_lr_ratio x the peak."""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, peak_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of the update made at `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule != "cosine":
        raise ValueError(f"schedule: must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
