"""Training augmentation of PAPER.md: random flips on both axes and a random rigid affine,
one draw applied identically to every image channel and mask of a slice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """flip_prob: chance of flipping each in-plane axis; affine_prob: chance of a random
    rotation (uniform within +-max_rotation radians) and translation (uniform within
    +-max_translation pixels on each axis)."""

    flip_prob: float = 0.5
    affine_prob: float = 0.9
    max_rotation: float = math.pi / 16
    max_translation: float = 32.0


def _affine_theta(angle: float, tx: float, ty: float, height: int, width: int) -> torch.Tensor:
    """The 2 x 3 matrix affine_grid expects for a rotation by `angle` about the centre and a
    shift of (tx, ty) pixels. affine_grid works in [-1, 1] coordinates per axis, so on a
    non-square image the pixel-space rotation is conjugated by the axis scaling."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor(
        [
            [c, -s * height / width, 2 * tx / width],
            [s * width / height, c, 2 * ty / height],
        ],
        dtype=torch.float32,
    )


def augment_slice(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one slice: `images` (C x H x W, background -1) bilinearly, `masks`
    (M x H x W, values 0/1) with nearest interpolation, both with the same random draw."""
    if images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in H x W")
    # Draw a fixed count of numbers whatever happens, so one slice's draw never shifts the next.
    u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    flip_dims = [d for d, p in ((-2, u[0]), (-1, u[1])) if p < config.flip_prob]
    if flip_dims:
        images = torch.flip(images, flip_dims)
        masks = torch.flip(masks, flip_dims)
    if u[2] >= config.affine_prob:
        return images, masks

    height, width = images.shape[-2:]
    theta = _affine_theta(
        angle=(2 * u[3] - 1) * config.max_rotation,
        tx=(2 * u[4] - 1) * config.max_translation,
        ty=(2 * u[5] - 1) * config.max_translation,
        height=height,
        width=width,
    )
    grid = F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
    # grid_sample fills outside the image with 0, but the images' background is -1: sample
    # image + 1 and subtract 1 again, so revealed borders read as background.
    images = F.grid_sample(images[None] + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] - 1
    masks = F.grid_sample(masks[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return images, masks
