"""Triton kernels of the fused GroupNorm (+ SiLU) op (imported only when the triton backend runs).

One set of kernels serves both layouts: a group of sample n is the tile
x[n, g*CG + c, s] at n*C*S + (g*CG + c)*stride_c + s*stride_s, with (stride_c, stride_s) = (S, 1)
for contiguous and (1, C) for channels-last storage.

Forward: `_stats_kernel` writes shifted partial sums per (sample, group, spatial split);
`_norm_kernel` combines them (the split-0 program stores mean and rstd) and normalizes and
activates its spatial chunk. Backward: `_bwd_sums_kernel` writes per-(sample, split, channel)
partial sums of g and g * xhat; torch sums them (deterministically) to per-channel and per-group
totals; `_bwd_dx_kernel` writes dx. See ldmfast/ops/group_norm.py for the formulas.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _grid
from ._backends import _TRITON_INTERPRET


@triton.jit
def _channel_affine(w_ptr, b_ptr, g, CG, cc, cm, rstd):
    """(sc, b) of z = (x - mean) * sc + b for channels g * CG + cc of the group (cm: those that
    exist); not x * sc + (b - mean * sc), which cancels when |mean| >> std."""
    w = tl.load(w_ptr + g * CG + cc, mask=cm, other=0.0)
    b = tl.load(b_ptr + g * CG + cc, mask=cm, other=0.0)
    return rstd * w, b


@triton.jit
def _tile(offset, cc, cm, s0, s_end, stride_c, stride_s, BLOCK_S: tl.constexpr):
    """Offsets and mask of the tile of channels cc and positions s0 .. s0 + BLOCK_S (below s_end)."""
    ss = s0 + tl.arange(0, BLOCK_S)
    return offset + cc[:, None] * stride_c + ss[None, :] * stride_s, cm[:, None] & (ss[None, :] < s_end)


@triton.jit
def _stats_kernel(x_ptr, part_ptr, C, S, G, CG, stride_c, stride_s, rows_per_split, SPLIT,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    ng = pid // SPLIT
    p = pid % SPLIT
    n = ng // G
    g = ng % G
    offset = n.to(tl.int64) * C * S + (g * CG).to(tl.int64) * stride_c
    k = tl.load(x_ptr + offset).to(tl.float32)  # shift: the group's first element
    s_begin = p * rows_per_split
    s_end = tl.minimum(s_begin + rows_per_split, S)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CG
        for s0 in range(s_begin, s_end, BLOCK_S):
            idx, mask = _tile(offset, cc, cm, s0, s_end, stride_c, stride_s, BLOCK_S)
            v = tl.load(x_ptr + idx, mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - k, 0.0)
            acc1 += d
            acc2 += d * d
    tl.store(part_ptr + pid * 2, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, mean_ptr, rstd_ptr, C, S, G, CG, stride_c, stride_s,
                 rows_per_chunk, CHUNKS, SPLIT, count, eps, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    ng = pid // CHUNKS
    q = pid % CHUNKS
    n = ng // G
    g = ng % G
    offset = n.to(tl.int64) * C * S + (g * CG).to(tl.int64) * stride_c
    pp = tl.arange(0, BLOCK_P)
    pm = pp < SPLIT
    s1 = tl.sum(tl.load(part_ptr + (ng * SPLIT + pp) * 2, mask=pm, other=0.0), axis=0)
    s2 = tl.sum(tl.load(part_ptr + (ng * SPLIT + pp) * 2 + 1, mask=pm, other=0.0), axis=0)
    k = tl.load(x_ptr + offset).to(tl.float32)
    md = s1 / count
    var = tl.maximum(s2 / count - md * md, 0.0)
    mean = k + md
    rstd = 1.0 / tl.sqrt(var + eps)
    if q == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    s_begin = q * rows_per_chunk
    s_end = tl.minimum(s_begin + rows_per_chunk, S)
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CG
        sc, bc = _channel_affine(w_ptr, b_ptr, g, CG, cc, cm, rstd)
        for s0 in range(s_begin, s_end, BLOCK_S):
            idx, mask = _tile(offset, cc, cm, s0, s_end, stride_c, stride_s, BLOCK_S)
            v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            z = (v - mean) * sc[:, None] + bc[:, None]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + idx, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_grad(dy, z, SILU: tl.constexpr):
    if SILU:
        sg = tl.sigmoid(z)
        dy = dy * (sg * (1.0 + z * (1.0 - sg)))
    return dy


@triton.jit
def _bwd_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, C, S, G, CG, stride_c, stride_s,
                     rows_per_split, SPLIT, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    ng = pid // SPLIT
    p = pid % SPLIT
    n = ng // G
    g = ng % G
    offset = n.to(tl.int64) * C * S + (g * CG).to(tl.int64) * stride_c
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    s_begin = p * rows_per_split
    s_end = tl.minimum(s_begin + rows_per_split, S)
    out = part_ptr + (n * SPLIT + p).to(tl.int64) * 2 * C + g * CG
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CG
        sc, bc = _channel_affine(w_ptr, b_ptr, g, CG, cc, cm, rstd)
        acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            idx, mask = _tile(offset, cc, cm, s0, s_end, stride_c, stride_s, BLOCK_S)
            v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            gv = tl.where(mask, _act_grad(dy, (v - mean) * sc[:, None] + bc[:, None], SILU), 0.0)
            acc1 += gv
            acc2 += gv * ((v - mean) * rstd)
        tl.store(out + cc, tl.sum(acc1, axis=1), mask=cm)
        tl.store(out + C + cc, tl.sum(acc2, axis=1), mask=cm)


@triton.jit
def _bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, gsum_ptr, C, S, G, CG, stride_c,
                   stride_s, rows_per_chunk, CHUNKS, count, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    ng = pid // CHUNKS
    q = pid % CHUNKS
    n = ng // G
    g = ng % G
    offset = n.to(tl.int64) * C * S + (g * CG).to(tl.int64) * stride_c
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    ga = tl.load(gsum_ptr + (n * 2) * G + g)      # sum over the group of weight * g
    gb = tl.load(gsum_ptr + (n * 2 + 1) * G + g)  # sum over the group of weight * g * xhat
    cb = -rstd * rstd * gb / count
    cd = -rstd * ga / count  # dx = sc * g + cb * (x - mean) + cd: cb * x - cb * mean would cancel
    s_begin = q * rows_per_chunk
    s_end = tl.minimum(s_begin + rows_per_chunk, S)
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < CG
        sc, bc = _channel_affine(w_ptr, b_ptr, g, CG, cc, cm, rstd)
        for s0 in range(s_begin, s_end, BLOCK_S):
            idx, mask = _tile(offset, cc, cm, s0, s_end, stride_c, stride_s, BLOCK_S)
            v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            gv = _act_grad(dy, (v - mean) * sc[:, None] + bc[:, None], SILU)
            dx = sc[:, None] * gv + cb * (v - mean) + cd
            tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration -------------------------------------------------------------------------

def _config(n: int, c: int, s: int, g: int, channels_last: bool):
    cg = c // g
    # The interpreter runs one program at a time in numpy: small tiles and few programs, but
    # still more than one split and chunk per group on test shapes so that those paths run.
    tile = 1024 if _TRITON_INTERPRET else 4096
    target_programs = 4 if _TRITON_INTERPRET else 1024
    block_c = min(_grid.next_power_of_2(cg), 256)
    block_s = min(max(tile // block_c, 16), max(_grid.next_power_of_2(s), 16))
    s_blocks = _grid.cdiv(s, block_s)
    splits = max(1, min(s_blocks, _grid.cdiv(target_programs, n * g)))
    rows = _grid.cdiv(s_blocks, splits) * block_s
    splits = _grid.cdiv(s, rows)
    strides = (1, c) if channels_last else (s, 1)
    return cg, block_c, block_s, splits, rows, strides


def forward(x, weight, bias, y, mean, rstd, n: int, c: int, s: int, g: int, eps: float, silu: bool,
            channels_last: bool) -> None:
    """x, y: dense (N, C, S) elements in the given layout; weight, bias: float32 (C,); mean, rstd: (N, G)."""
    cg, block_c, block_s, splits, rows, (stride_c, stride_s) = _config(n, c, s, g, channels_last)
    part = torch.empty((n * g * splits, 2), dtype=torch.float32, device=x.device)
    _stats_kernel[(n * g * splits,)](x, part, c, s, g, cg, stride_c, stride_s, rows, splits,
                                     BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    _norm_kernel[(n * g * splits,)](x, y, weight, bias, part, mean, rstd, c, s, g, cg, stride_c, stride_s, rows,
                                    splits, splits, float(cg * s), eps, SILU=silu, BLOCK_C=block_c,
                                    BLOCK_S=block_s, BLOCK_P=max(_grid.next_power_of_2(splits), 2), num_warps=4)


def backward(dy, x, weight, bias, mean, rstd, dx, dweight, dbias, n: int, c: int, s: int, g: int, silu: bool,
             channels_last: bool) -> None:
    cg, block_c, block_s, splits, rows, (stride_c, stride_s) = _config(n, c, s, g, channels_last)
    part = torch.empty((n, splits, 2, c), dtype=torch.float32, device=x.device)
    _bwd_sums_kernel[(n * g * splits,)](dy, x, weight, bias, mean, rstd, part, c, s, g, cg, stride_c, stride_s,
                                        rows, splits, SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    sums = part.sum(1)  # (N, 2, C): per-(sample, channel) sums of g and g * xhat, in a fixed order
    torch.sum(sums[:, 0], 0, out=dbias)
    torch.sum(sums[:, 1], 0, out=dweight)
    gsum = (sums * weight).reshape(n, 2, g, cg).sum(-1).contiguous()  # (N, 2, G)
    _bwd_dx_kernel[(n * g * splits,)](dy, x, dx, weight, bias, mean, rstd, gsum, c, s, g, cg, stride_c, stride_s,
                                      rows, splits, float(cg * s), SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
                                      num_warps=4)


__all__ = ["backward", "forward"]
