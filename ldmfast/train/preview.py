"""Greyscale PNG grids of validation slices (with ldmfast.metrics' PNG writer: no imaging
library), so a run can be looked at while it trains."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldmfast.metrics.png import contour, write_png


def write_png_grey(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 2D array in [0, 1] as an 8-bit greyscale PNG, atomically."""
    return write_png(path, (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def reconstruction_grid(targets: np.ndarray, recons: np.ndarray, lesions: np.ndarray, gap: int = 2) -> np.ndarray:
    """One row per slice: DWI target, DWI reconstruction, ADC target, ADC reconstruction, lesion
    outline; inputs (N, 2, H, W) in [-1, 1] and lesions (N, 1, H, W); output in [0, 1]."""
    n, _, h, w = targets.shape
    tiles_per_row = 5
    grid = np.ones((n * (h + gap) - gap, tiles_per_row * (w + gap) - gap), dtype=np.float32)
    for i in range(n):
        outline = contour(lesions[i, 0] > 0.5)
        tiles = [targets[i, 0], recons[i, 0], targets[i, 1], recons[i, 1]]
        tiles = [(t + 1.0) / 2.0 for t in tiles] + [np.where(outline, 1.0, (targets[i, 0] + 1.0) / 4.0)]
        for j, tile in enumerate(tiles):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return grid
