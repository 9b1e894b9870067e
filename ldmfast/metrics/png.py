"""PNG images for the report without an imaging library: an encoder (zlib + struct), gray
and colormap rendering, and the lesion contour."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ldmfast.data.atomic import atomic_path

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LESION_RGB = (255, 32, 32)
# Error colormap: black through purple and orange to pale yellow (magma-like), so small
# errors stay dark and large ones stand out; monotonic in lightness, readable in grayscale.
_ERROR_STOPS = np.array([
    [0.00, 0, 0, 4],
    [0.25, 81, 18, 124],
    [0.50, 183, 55, 121],
    [0.75, 252, 137, 97],
    [1.00, 252, 253, 191],
], dtype=np.float64)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image, H x W (gray) or H x W x 3 (RGB)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image: expected uint8 H x W or H x W x 3, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image: empty, shape {image.shape}")
    h, w = image.shape[:2]
    color_type = 0 if image.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    rows = np.ascontiguousarray(image).reshape(h, -1)
    # Filter type 0 (none) before each row: zlib does the compressing.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 H x W or H x W x 3 image as PNG, atomically."""
    data = encode_png(image)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def to_display(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice indexed [x, y] (NIfTI order) turned for display: rows run from anterior
    (top) to posterior, columns along x, so an RAS-oriented volume shows the usual view."""
    return np.flipud(np.asarray(slice_xy).T)


def gray(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values mapped linearly from [low, high] to 0..255 (clipped), as an RGB image."""
    unit = np.clip((np.asarray(image, np.float64) - low) / (high - low), 0.0, 1.0)
    g = np.round(unit * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def error_colormap(values: np.ndarray, vmax: float) -> np.ndarray:
    """Non-negative errors mapped through the error colormap, saturating at `vmax`, as RGB."""
    unit = np.clip(np.asarray(values, np.float64) / vmax, 0.0, 1.0)
    rgb = [np.interp(unit, _ERROR_STOPS[:, 0], _ERROR_STOPS[:, k]) for k in (1, 2, 3)]
    return np.round(np.stack(rgb, axis=-1)).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary mask: inside it, with a 4-neighbour outside (or at the
    image edge)."""
    m = np.asarray(mask, bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~interior


def draw_contour(rgb: np.ndarray, mask: np.ndarray | None, color=LESION_RGB) -> np.ndarray:
    """A copy of `rgb` with the boundary of `mask` painted in `color` (no-op without a mask)."""
    out = rgb.copy()
    if mask is not None:
        out[contour(mask)] = color
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small slices stay crisp in any browser."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def colorbar(vmax_width: int = 256, height: int = 12) -> np.ndarray:
    """A horizontal strip of the error colormap from 0 (left) to its maximum (right)."""
    ramp = np.linspace(0.0, 1.0, vmax_width)[None, :].repeat(height, axis=0)
    return error_colormap(ramp, 1.0)
