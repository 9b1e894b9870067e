"""Triton kernels of the fused attention: forward with log-sum-exp, and the backward as dq blocks
over query blocks, which also write delta = rowsum(dO * O), then dk/dv blocks over key blocks (no
atomics), in one launch for short query sequences (ONE_LAUNCH_MAX_LQ). 16-bit heads over 256 wide
run attention_wide's GEMMs instead (its `applies`), the backward after a delta pre-pass here."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _grid, _native, attention_wide
from ._backends import _TRITON_INTERPRET

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # (the kernels' copy: a jit function reads only constexpr globals)


def _upcast(t: torch.Tensor) -> bool:
    """Whether tiles are converted to fp32 right after loading: only for bf16 in Triton's CPU
    interpreter, whose bf16 dot products return garbage (GPUs keep bf16 tensor-core dots)."""
    return _TRITON_INTERPRET and t.dtype == torch.bfloat16


def _precision(t: torch.Tensor) -> str:
    """float32 dots in three tf32 passes (the split-operand trick): tensor cores at about fp32
    accuracy, where plain tf32 misses the numerics contract (relative error ~1.5e-3 measured on an
    H200). 16-bit operands ignore it."""
    return "tf32x3" if t.dtype == torch.float32 else "tf32"


def _wide_16bit(block_d: int, dtype: torch.dtype) -> bool:
    """Head dim 512 in 16 bits (the VQGAN's middle block): its own measured launch settings."""
    return block_d > 256 and dtype != torch.float32


@functools.lru_cache(maxsize=4096)
def _blocks(d: int, lq: int, lk: int, dtype: torch.dtype, which: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tiles shrink as the head dim grows so that they fit on chip.
    (Cached: a model calls it with a few shapes, three times per forward+backward.)"""
    block_d = max(16, _grid.next_power_of_2(d))
    if _wide_16bit(block_d, dtype):
        # From bench/sweep_attention_triton.py on an H200 at B=6 L=2688 bf16: 64x64 tiles run the
        # forward 3.5x faster than 16x16 (0.48 against 1.69 ms), 32x32 the backward 1.5x (4.9
        # against 7.4 ms). (Since then 16-bit heads this wide run attention_wide's GEMMs, and only
        # the backward's delta pre-pass uses these.)
        block_m, block_n = (64, 64) if which == "forward" else (32, 32)
    else:
        # (On an H100 the sweep had the backward kernels 7 % faster at L=4096 D=64 with tiles
        # narrow along the dimension each walks, dk/dv 32 x 64 and dq 64 x 32, but the benchmark on
        # another machine 14 % slower: kept 64 x 64 until one machine measures both.)
        block_m = 64 if block_d <= 64 else 32 if block_d <= 128 else 16
        block_n = 64 if block_d <= 64 else 32 if block_d <= 256 else 16
    return (min(block_m, max(16, _grid.next_power_of_2(lq))),
            min(block_n, max(16, _grid.next_power_of_2(lk))), block_d)


def _launch_kwargs(block_d: int, dtype: torch.dtype) -> dict:
    kwargs = {"num_warps": 4 if block_d <= 64 else 8}
    if _wide_16bit(block_d, dtype):
        kwargs["num_stages"] = 1  # two stages of 512-wide K and V tiles do not fit in shared memory
    return kwargs


# Launch settings that replace the defaults: dicts of BLOCK_M, BLOCK_N, num_warps, num_stages,
# keyed "forward", "backward" (both backward kernels), or "backward_dkdv" / "backward_dq" (one of
# them, before "backward"). For tuning sweeps (bench/sweep_attention_triton.py) only: the dk/dv
# kernel holds a key block and walks query blocks, the dq kernel the other way round, so each may
# want its own tile shape (Triton's fused-attention tutorial uses 32 x 128 and 128 x 32).
OVERRIDES: dict[str, dict] = {}


def _launch(which: str, q: torch.Tensor, lk: int) -> tuple[int, int, int, dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, launch kwargs) of one kernel: "forward", "backward_dkdv" or
    "backward_dq"."""
    lq, d = q.shape[2], q.shape[3]
    bm, bn, bd = _blocks(d, lq, lk, q.dtype, which)
    kwargs = _launch_kwargs(bd, q.dtype)
    o = OVERRIDES.get(which) or (OVERRIDES.get("backward") if which != "forward" else None)
    if o:
        bm, bn = o.get("BLOCK_M", bm), o.get("BLOCK_N", bn)
        kwargs.update({k: o[k] for k in ("num_warps", "num_stages") if k in o})
    return bm, bn, bd, kwargs


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols, UPCAST: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _batch_head(H):
    """This program's (batch * heads + head, batch, head): axis 1 of every grid."""
    bh = tl.program_id(1)
    return bh, bh // H, bh % H


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                sob, soh, sol, sod, H, LQ, LK, D, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, cols, sql, sqd, LQ, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * skb + h * skh, keys, cols, skl, skd, LK, D, UPCAST)
        v = _load_tile(V + b * svb + h * svh, keys, cols, svl, svd, LK, D, UPCAST)
        # Scores in base 2 (qk_scale includes log2 e): exp2 is the fast path on GPUs.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if not EVEN_N:  # (a select per score: skipped where every key block is full)
            s = tl.where(keys[None, :] < LK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    mask = (rows[:, None] < LQ) & (cols[None, :] < D)
    tl.store(O + b * sob + h * soh + rows[:, None] * sol + cols[None, :] * sod, acc.to(O.dtype.element_ty), mask=mask)
    # lse in natural log, as the reference defines it.
    tl.store(LSE + bh * LQ + rows, (m_i + tl.log2(l_i)) / _LOG2E, mask=rows < LQ)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sol, sod, sdb, sdh, sdl, sdd, H, LQ, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * sob + h * soh, rows, cols, sol, sod, LQ, D, UPCAST).to(tl.float32)
    do = _load_tile(DO + b * sdb + h * sdh, rows, cols, sdl, sdd, LQ, D, UPCAST).to(tl.float32)
    tl.store(DELTA + bh * LQ + rows, tl.sum(o * do, 1), mask=rows < LQ)


@triton.jit
def _row_deltas(O, DO, do, rows, cols, b, h, sob, soh, sol, sod, LQ, D, UPCAST: tl.constexpr):
    """delta = rowsum(dO * O) (float32) of `rows`, given their dO tile."""
    o = _load_tile(O + b * sob + h * soh, rows, cols, sol, sod, LQ, D, UPCAST).to(tl.float32)
    return tl.sum(o * do.to(tl.float32), 1)


@triton.jit
def _dkdv_block(pid_n, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DK, DV,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                sdb, sdh, sdl, sdd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, LQ, LK, D, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr,
                DELTA_FROM_O: tl.constexpr):
    """dk and dv of key block pid_n, walking every query block. delta is read from DELTA, or
    computed from O and dO per query block where DELTA_FROM_O (when nothing wrote it first)."""
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * skb + h * skh, keys, cols, skl, skd, LK, D, UPCAST)
    v = _load_tile(V + b * svb + h * svh, keys, cols, svl, svd, LK, D, UPCAST)
    scale_log2 = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(Q + b * sqb + h * sqh, rows, cols, sql, sqd, LQ, D, UPCAST)
        do = _load_tile(DO + b * sdb + h * sdh, rows, cols, sdl, sdd, LQ, D, UPCAST)
        lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0) * _LOG2E
        if DELTA_FROM_O:
            delta = _row_deltas(O, DO, do, rows, cols, b, h, sob, soh, sol, sod, LQ, D, UPCAST)
        else:
            delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
        # Transposed scores (keys x rows), as Triton's fused-attention tutorial computes them: p^T and
        # ds^T come out of their dots in the layout the dv and dk dots take, where p and ds would
        # each be transposed in registers (through shared memory) every iteration.
        # p^T = exp(scale k.q - lse) as exp2 of one multiply-add per score (scale_log2 = scale log2 e).
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2 - lse[None, :])
        if not EVEN:
            pt = tl.where((keys[:, None] < LK) & (rows[None, :] < LQ), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    mask = (keys[:, None] < LK) & (cols[None, :] < D)
    tl.store(DK + b * sdkb + h * sdkh + keys[:, None] * sdkl + cols[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * sdvb + h * sdvh + keys[:, None] * sdvl + cols[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_block(pid_m, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DQ,
              sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
              sdb, sdh, sdl, sdd, sdqb, sdqh, sdql, sdqd, LQ, LK, D, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_N: tl.constexpr):
    """dq of query block pid_m, walking every key block; also writes the block's delta =
    rowsum(dO * O) to DELTA (computed here rather than in a pre-pass of its own: one launch less,
    and at the UNet's small maps the launches' host time exceeds the kernels')."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, cols, sql, sqd, LQ, D, UPCAST)
    do = _load_tile(DO + b * sdb + h * sdh, rows, cols, sdl, sdd, LQ, D, UPCAST)
    lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=0.0) * _LOG2E
    delta = _row_deltas(O, DO, do, rows, cols, b, h, sob, soh, sol, sod, LQ, D, UPCAST)
    tl.store(DELTA + bh * LQ + rows, delta, mask=rows < LQ)
    scale_log2 = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * skb + h * skh, keys, cols, skl, skd, LK, D, UPCAST)
        v = _load_tile(V + b * svb + h * svh, keys, cols, svl, svd, LK, D, UPCAST)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 - lse[:, None])
        if not EVEN_N:  # (padded keys: p = exp(-lse) could overflow, and inf * 0 is NaN)
            p = tl.where(keys[None, :] < LK, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    mask = (rows[:, None] < LQ) & (cols[None, :] < D)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdql + cols[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV,
                sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                sdb, sdh, sdl, sdd, sdqb, sdqh, sdql, sdqd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
                H, LQ, LK, D, scale, K_BLOCKS,
                BLOCK_MQ: tl.constexpr, BLOCK_NQ: tl.constexpr, BLOCK_MK: tl.constexpr, BLOCK_NK: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                EVEN_NQ: tl.constexpr, EVEN_K: tl.constexpr, PART: tl.constexpr):
    """The backward, by PART: "dq", a dq block per program (each writing its rows' delta); "dkdv",
    a dk/dv block per program (reading delta, launched after "dq"); "both", for short query
    sequences, the two in one launch: programs below K_BLOCKS do a dk/dv block (first: they walk
    every query block, the longer work) computing delta themselves, since no program of a launch
    can wait for another's (one O tile more per query block, a few at these lengths), the others
    a dq block."""
    bh, b, h = _batch_head(H)
    pid = tl.program_id(0)
    if PART == "dq":
        _dq_block(pid, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DQ,
                  sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                  sdb, sdh, sdl, sdd, sdqb, sdqh, sdql, sdqd, LQ, LK, D, scale,
                  BLOCK_MQ, BLOCK_NQ, BLOCK_D, UPCAST, PRECISION, EVEN_NQ)
    elif PART == "dkdv":
        _dkdv_block(pid, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DK, DV,
                    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                    sdb, sdh, sdl, sdd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, LQ, LK, D, scale,
                    BLOCK_MK, BLOCK_NK, BLOCK_D, UPCAST, PRECISION, EVEN_K, False)
    elif pid < K_BLOCKS:
        _dkdv_block(pid, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DK, DV,
                    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                    sdb, sdh, sdl, sdd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd, LQ, LK, D, scale,
                    BLOCK_MK, BLOCK_NK, BLOCK_D, UPCAST, PRECISION, EVEN_K, True)
    else:
        _dq_block(pid - K_BLOCKS, bh, b, h, Q, K, V, O, DO, LSE, DELTA, DQ,
                  sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                  sdb, sdh, sdl, sdd, sdqb, sdqh, sdql, sdqd, LQ, LK, D, scale,
                  BLOCK_MQ, BLOCK_NQ, BLOCK_D, UPCAST, PRECISION, EVEN_NQ)


def forward(q, k, v, out, lse, scale: float) -> None:
    if attention_wide.run(attention_wide.forward, q, k, v, out, lse, scale):
        return
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, bd, launch = _launch("forward", q, lk)
    _fwd_kernel[(_grid.cdiv(lq, bm), b * h)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), h, lq, lk, d, scale * LOG2E,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=_upcast(q), PRECISION=_precision(q), EVEN_N=lk % bn == 0,
        **launch)


# Query lengths up to which the backward is one launch (_bwd_kernel PART "both") rather than two:
# its dk/dv programs load an O tile more per query block, which a long sequence would feel, while a
# short one is host-bound (an H100 at the UNet's L=168: 313 us of kernels per fwd+bwd in 1138 us of
# wall time). 0 turns it off (for sweeps).
ONE_LAUNCH_MAX_LQ = 256


def backward(q, k, v, out, lse, dout, dq, dk, dv, scale: float) -> None:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, bd, launch = _launch("backward_dq", q, lk)
    # (Poisoned in tests: Triton's interpreter runs a launch's programs in order, dk/dv first in the
    # one launch, so a dk/dv block reading delta there instead of computing it would read NaN.)
    delta = _native._maybe_poison(torch.empty((b, h, lq), dtype=torch.float32, device=q.device))
    if attention_wide.applies(q):  # (its GEMMs take delta from the pre-pass)
        _bwd_delta_kernel[(_grid.cdiv(lq, bm), b * h)](
            out, dout, delta, *out.stride(), *dout.stride(), h, lq, d,
            BLOCK_M=bm, BLOCK_D=bd, UPCAST=_upcast(q), num_warps=launch["num_warps"])
        if attention_wide.run(attention_wide.backward, q, k, v, dout, lse, delta, dq, dk, dv, scale):
            return
    bm_k, bn_k, _, launch_k = _launch("backward_dkdv", q, lk)
    q_blocks, k_blocks = _grid.cdiv(lq, bm), _grid.cdiv(lk, bn_k)
    args = (q, k, v, out, dout, lse, delta, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *dout.stride(), *dq.stride(), *dk.stride(), *dv.stride(), h, lq, lk, d, scale, k_blocks)
    settings = dict(BLOCK_MQ=bm, BLOCK_NQ=bn, BLOCK_MK=bm_k, BLOCK_NK=bn_k, BLOCK_D=bd, UPCAST=_upcast(q),
                    PRECISION=_precision(q), EVEN_NQ=lk % bn == 0, EVEN_K=lq % bm_k == 0 and lk % bn_k == 0)
    # (Not for head dims over 256: float32 at D=512 would need both parts' shared memory in one
    # program, 262 KB on an H100 against its 227.)
    if lq <= ONE_LAUNCH_MAX_LQ and bd <= 256 and launch == launch_k:
        _bwd_kernel[(k_blocks + q_blocks, b * h)](*args, PART="both", **settings, **launch)
        return
    _bwd_kernel[(q_blocks, b * h)](*args, PART="dq", **settings, **launch)  # (writes delta: first)
    _bwd_kernel[(k_blocks, b * h)](*args, PART="dkdv", **settings, **launch_k)
