"""Triton kernel of the fused DDIM update (imported only when the triton backend runs)."""
from __future__ import annotations

import triton
import triton.language as tl

from . import _grid
from ._backends import _TRITON_INTERPRET


@triton.jit
def _ddim_kernel(x_ptr, o_ptr, noise_ptr, coef_ptr, y_ptr, x0_ptr, M, chunks_per_sample, clip_value,
                 HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (sample, chunk): the sample's seven coefficients are scalars in registers.
    pid = tl.program_id(0)
    sample = pid // chunks_per_sample
    offs = (pid % chunks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = sample.to(tl.int64) * M
    c = coef_ptr + sample * 8  # DDIM_COEF_STRIDE in csrc/dtype.h
    c_x0_x = tl.load(c + 0)
    c_x0_out = tl.load(c + 1)
    c_eps_x = tl.load(c + 2)
    c_eps_out = tl.load(c + 3)
    c_prev_x0 = tl.load(c + 4)
    c_prev_eps = tl.load(c + 5)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    o = tl.load(o_ptr + base + offs, mask=mask).to(tl.float32)
    x0 = c_x0_x * x + c_x0_out * o
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_value), clip_value)
    prev = c_prev_x0 * x0 + c_prev_eps * (c_eps_x * x + c_eps_out * o)
    if HAS_NOISE:
        c_prev_noise = tl.load(c + 6)
        prev += c_prev_noise * tl.load(noise_ptr + base + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + base + offs, prev.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddim_step(x, out, noise, coef, y, x0, n: int, m: int, clip_value: float | None) -> None:
    """Launch on flat batch-major operands (see ldmfast.ops.ddim._run_kernel)."""
    # The interpreter runs one program at a time in numpy: fewer, larger blocks are faster there.
    block = 8192 if _TRITON_INTERPRET else 2048
    block = min(block, max(_grid.next_power_of_2(m), 16))
    chunks = _grid.cdiv(m, block)
    _ddim_kernel[(n * chunks,)](
        x, out, noise if noise is not None else x, coef, y, x0 if x0 is not None else y, m, chunks,
        float(clip_value or 0.0), HAS_NOISE=noise is not None, CLIP=clip_value is not None,
        WRITE_X0=x0 is not None, BLOCK=block, num_warps=4)


__all__ = ["ddim_step"]
