"""The 8-bit AdamW step of ldmfast/train/adamw8bit.py as one Triton kernel per parameter: a program
per block dequantizes its moments, updates them and the parameter in float32, and requantizes
them (block scale, stochastic rounding from the same hash as the plain-torch definition), without
the definition's float32 temporaries or its ~20 launches per chunk. CUDA parameters only (and CPU
ones through Triton's interpreter, where tests ask for it)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ldmfast.ops import _native
from ldmfast.ops._backends import _TRITON_INTERPRET

from .adamw8bit import BLOCK, step_scalars

#: Run the kernel on CPU tensors too (tests, with TRITON_INTERPRET=1).
ON_CPU = False

_TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: an all-zero block's scale
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _hash32(x):
    """adamw8bit._hash32 on uint32 (products wrap as its masked int64 ones)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    return x ^ (x >> 16)


@triton.jit
def _uniform(offs, key):
    return (_hash32((offs + key).to(tl.uint32)) >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _lower_code(table, x):
    """Index (0..254) of the largest of the 256 sorted table values <= x: a branchless binary search
    (table[0] <= x always: x is normalized to the table's range)."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        cand = idx + (128 >> s)
        idx = tl.where(tl.load(table + cand) <= x, cand, idx)
    return tl.minimum(idx, 254)


@triton.jit
def _requantize(x, table, codes_ptr, scale_ptr, b, offs, key, SQUARED: tl.constexpr):
    """Codes and scale of block b from its float32 values x (adamw8bit.quantize)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), _TINY)  # (the stored scale is the one divided by)
    xn = tl.minimum(tl.maximum(x / scale, -1.0), 1.0)
    lo_i = _lower_code(table, xn)
    lo = tl.load(table + lo_i)
    hi = tl.load(table + lo_i + 1)
    if SQUARED:
        p = (xn * xn - lo * lo) / (hi * hi - lo * lo)
    else:
        p = (xn - lo) / (hi - lo)
    code = lo_i + (_uniform(offs, key) < p).to(tl.int32)
    tl.store(codes_ptr + offs, code.to(tl.uint8))
    tl.store(scale_ptr + b, scale)


@triton.jit
def _strided(offs, size1, size2, size3, stride0, stride1, stride2, stride3):
    """Memory offsets of the elements at logical (row-major) positions `offs` of a 4-D tensor of
    sizes (*, size1, size2, size3) and the given strides."""
    i3 = offs % size3
    rest = offs // size3
    i2 = rest % size2
    rest = rest // size2
    return (rest // size1) * stride0 + (rest % size1) * stride1 + i2 * stride2 + i3 * stride3


@triton.jit
def _adamw8bit_kernel(P, G, MC, MS, RC, RS, SIGNED, UNSIGNED, n, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      eps, decay_factor, bc1, bc2, key_m, key_v, size1, size2, size3,
                      sp0, sp1, sp2, sp3, sg0, sg1, sg2, sg3, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    """One block of adamw8bit_update per program (1 - beta and 1 - lr * weight_decay as the
    definition rounds them). The state's blocks follow the parameter's logical order; STRIDED: p
    and g are (up to) 4-D tensors of any strides (a channels-last weight and its gradient are read
    and written in place), else flat and contiguous."""
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if STRIDED:
        p_offs = _strided(offs, size1, size2, size3, sp0, sp1, sp2, sp3)
        g_offs = _strided(offs, size1, size2, size3, sg0, sg1, sg2, sg3)
    else:
        p_offs = offs
        g_offs = offs
    g = tl.load(G + g_offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(SIGNED + tl.load(MC + offs).to(tl.int32)) * tl.load(MS + b)
    r = tl.load(UNSIGNED + tl.load(RC + offs).to(tl.int32)) * tl.load(RS + b)
    m = m * beta1 + one_minus_beta1 * g
    v = tl.minimum(r * r * beta2 + one_minus_beta2 * g * g, _FLOAT32_MAX)  # (as the definition)
    update = (m / bc1) / (tl.sqrt_rn(v / bc2) + eps)
    p = tl.load(P + p_offs, mask=mask, other=0.0)
    tl.store(P + p_offs, p * decay_factor - lr * update, mask=mask)
    _requantize(m, SIGNED, MC, MS, b, offs, key_m, False)
    _requantize(tl.sqrt_rn(v), UNSIGNED, RC, RS, b, offs, key_v, True)


@triton.jit
def _adamw_f32_kernel(P, G, M, V, n, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt, BLOCK: tl.constexpr):
    """AdamW8bit._step_float32 (torch's AdamW) for the small parameters' float32 moments."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
    v = tl.load(V + offs, mask=mask, other=0.0) * beta2 + (1.0 - beta2) * g * g
    p = tl.load(P + offs, mask=mask, other=0.0) * (1.0 - lr * decay)
    tl.store(P + offs, p - step_size * m / (tl.sqrt_rn(v) / bc2_sqrt + eps), mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)


def _runs_here(p: torch.Tensor) -> bool:
    return p.is_cuda or (ON_CPU and _TRITON_INTERPRET)


def update_float32(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
                   eps: float, weight_decay: float) -> bool:
    """The float32-moment step of a small parameter (flat p, g and state's exp_avg, exp_avg_sq) in
    one launch, where torch's ops take eight: StepInBackward runs one per parameter, and a UNet has
    hundreds of biases and norms. False (nothing done) where it does not run."""
    if not _runs_here(p):
        return False
    step = state["step"]
    with _native.triton_device(p):
        _adamw_f32_kernel[(triton.cdiv(p.numel(), 1024),)](
            p, g, state["exp_avg"], state["exp_avg_sq"], p.numel(), lr, beta1, beta2, eps, weight_decay,
            lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), BLOCK=1024)
    return True


#: Most dimensions of a parameter that `update` steps in place whatever its strides.
MAX_STRIDED_DIMS = 4


def _sizes_strides(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """t's sizes and strides, padded in front to MAX_STRIDED_DIMS dimensions."""
    pad = MAX_STRIDED_DIMS - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def update(p: torch.Tensor, g: torch.Tensor, state: dict, tables: tuple[torch.Tensor, torch.Tensor], *, lr: float,
           beta1: float, beta2: float, eps: float, weight_decay: float, seed: int) -> bool:
    """adamw8bit.adamw8bit_update's step in one launch, the state in p's logical order; p and g flat
    and contiguous, or of the same shape with up to MAX_STRIDED_DIMS dimensions and any strides
    (channels-last: no copy in or out). False (nothing done) where it does not run: a CPU
    parameter, unless ON_CPU under Triton's interpreter."""
    if not _runs_here(p):
        return False
    k = step_scalars(state["step"], lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, seed=seed)
    strided = not (p.is_contiguous() and g.is_contiguous())
    if strided and (p.dim() > MAX_STRIDED_DIMS or g.shape != p.shape):
        raise ValueError(f"p, g: non-contiguous ones need one shape of at most {MAX_STRIDED_DIMS} dims, got "
                         f"{tuple(p.shape)} and {tuple(g.shape)}")
    sizes, p_strides = _sizes_strides(p) if strided else ([1] * MAX_STRIDED_DIMS, [0] * MAX_STRIDED_DIMS)
    g_strides = _sizes_strides(g)[1] if strided else p_strides
    with _native.triton_device(p):
        _adamw8bit_kernel[(state["m_scale"].numel(),)](
            p, g, state["m_codes"], state["m_scale"], state["r_codes"], state["r_scale"], tables[0], tables[1],
            p.numel(), lr, beta1, k.one_minus_beta1, beta2, k.one_minus_beta2, eps, k.decay_factor, k.bc1, k.bc2,
            k.key_m, k.key_v, *sizes[1:], *p_strides, *g_strides, BLOCK=BLOCK, STRIDED=strided)
    return True
