"""Augmentation moves every image channel and mask by the same draw."""

import math

import numpy as np
import pytest
import torch

from ldmfast.data import AugmentConfig, augment_slice


def _blob_slice(height=48, width=64):
    """An off-centre, asymmetric blob: any flip, rotation or shift changes it visibly."""
    y, x = np.mgrid[:height, :width]
    mask = (((x - 40) / 14.0) ** 2 + ((y - 18) / 9.0) ** 2 < 1) | ((x > 8) & (x < 14) & (y > 20) & (y < 44))
    mask = torch.from_numpy(mask.astype(np.float32))
    images = (mask * 2 - 1).expand(17, -1, -1).clone()  # background -1, object +1, on all 17 channels
    masks = mask.expand(2, -1, -1).clone()
    return images, masks


@pytest.mark.parametrize("seed", range(12))
def test_images_and_masks_stay_aligned(seed):
    images, masks = _blob_slice()
    out_images, out_masks = augment_slice(images, masks, AugmentConfig(), torch.Generator().manual_seed(seed))
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    # Masks are resampled with nearest interpolation: still binary; both masks identical.
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_masks[0], out_masks[1])
    # One draw for all channels: every image channel identical.
    assert torch.equal(out_images, out_images[:1].expand_as(out_images))
    # The image (bilinear) agrees with the mask (nearest) except along the blob's edge.
    agree = ((out_images[0] > 0) == (out_masks[0] > 0.5)).float().mean()
    assert agree > 0.985
    assert out_images.min() >= -1 - 1e-6 and out_images.max() <= 1 + 1e-6


def test_area_shifted_in_is_background():
    """grid_sample pads with 0, but the images' background is -1 (and the masks' 0)."""
    images, masks = torch.ones(17, 40, 48), torch.ones(2, 40, 48)
    config = AugmentConfig(flip_prob=0.0, affine_prob=1.0, max_rotation=0.0, max_translation=32.0)
    out_images, out_masks = augment_slice(images, masks, config, torch.Generator().manual_seed(2))
    revealed = out_masks[0] == 0
    assert revealed.float().mean() > 0.1
    assert (out_images[:, revealed] < -0.99).float().mean() > 0.9


def test_flips_alone_are_exact():
    images, masks = _blob_slice()
    config = AugmentConfig(affine_prob=0.0)
    changed = 0
    for seed in range(8):
        out_images, out_masks = augment_slice(images, masks, config, torch.Generator().manual_seed(seed))
        assert torch.equal(out_images[0], out_masks[0] * 2 - 1)
        changed += not torch.equal(out_masks, masks)
    assert changed > 0


def test_draws_are_reproducible_and_vary():
    images, masks = _blob_slice()
    first = augment_slice(images, masks, AugmentConfig(), torch.Generator().manual_seed(3))
    again = augment_slice(images, masks, AugmentConfig(), torch.Generator().manual_seed(3))
    other = augment_slice(images, masks, AugmentConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_translation_in_pixels_and_rotation_about_the_centre():
    """A pure shift of +tx pixels along W moves content by tx pixels; the centre of a
    rotation stays put even on a non-square slice."""
    images, masks = _blob_slice()
    config = AugmentConfig(flip_prob=0.0, affine_prob=1.0, max_rotation=0.0, max_translation=10.0)
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    tx, ty = (2 * u[4] - 1) * 10.0, (2 * u[5] - 1) * 10.0
    _, out_masks = augment_slice(images, masks, config, generator)
    ys, xs = np.nonzero(masks[0].numpy())
    ys2, xs2 = np.nonzero(out_masks[0].numpy())
    # affine_grid maps output to input positions, so content moves by -t.
    assert xs2.mean() == pytest.approx(xs.mean() - tx, abs=0.6)
    assert ys2.mean() == pytest.approx(ys.mean() - ty, abs=0.6)

    spot = torch.zeros(1, 49, 65)
    spot[0, 24, 32] = 1
    rotate = AugmentConfig(flip_prob=0.0, affine_prob=1.0, max_rotation=math.pi / 16, max_translation=0.0)
    _, out = augment_slice(spot * 2 - 1, spot, rotate, torch.Generator().manual_seed(1))
    assert out[0, 24, 32] == 1 and out.sum() == 1


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="differ"):
        augment_slice(torch.zeros(3, 8, 8), torch.zeros(1, 8, 9), AugmentConfig(), torch.Generator())
