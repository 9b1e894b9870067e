"""Centre crop / pad of the two in-plane axes, shared by the dataset and the writer."""

from __future__ import annotations

import numpy as np


def fit_to_size(array: np.ndarray, size: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Centre-crop or pad the last two axes of `array` to `size`, padding with `fill`.

    Crop and pad use the same offset, floor((larger - smaller) / 2), so fitting a slice to a
    training size and back to its original size puts every kept pixel where it was.
    """
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"size: must be positive, got {size}")
    if array.shape[-2:] == (h, w):
        return array
    out = np.full(array.shape[:-2] + (h, w), fill, dtype=array.dtype)
    src = [crop_window(have, want) for have, want in zip(array.shape[-2:], (h, w))]
    dst = [crop_window(want, have) for have, want in zip(array.shape[-2:], (h, w))]
    out[(..., *dst)] = array[(..., *src)]
    return out


def crop_window(have: int, want: int) -> slice:
    """The part of an axis of `have` pixels that fitting it to `want` keeps (all of it when it
    is padded); swapped, where those pixels land in the fitted axis."""
    n = min(have, want)
    a = (have - n) // 2
    return slice(a, a + n)
