"""The attention backward for wide heads (D > 256: the VQGAN's one-head middle block has 512), as
tensor-core GEMMs over chunks of query rows, with one Triton kernel for the softmax's gradient.

The flash-style Triton backward keeps a (key block x D) pair of dk/dv accumulators on chip; at
D = 512 only 32 x 32 tiles fit and it ran at 0.26x the speed of torch's matmul-softmax-matmul
backward on an H100 (3.3 ms against 0.6 ms at B=6, L=2688). Here, for all batch-heads at once and
a chunk of query rows at a time:

    S = q k^T, dP = do v^T          (float32 outputs: the flash kernels' precision)
    P = exp(scale S - lse), dS = P (dP - delta)        (one pass: _softmax_grad_kernel)
    dv += P^T do, dk += dS^T q, dq = dS k               (float32 accumulation across chunks)

Five GEMMs per chunk, where matmul-softmax-matmul's backward does four from its stored P.
Memory: the chunk's S, dP and their 16-bit copies (a budget fixes the rows per chunk) and dk, dv
accumulators: linear in L; the Lq x Lk matrix is never formed whole.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Bytes of a chunk's score-sized buffers (S and dP in float32, P and dS in the input's dtype): at
# B=6, L=2688 four chunks of 672 rows, GEMMs still large enough; a transient of the backward that
# post-training's peak memory sees.
CHUNK_BUDGET = 128 << 20
_COLS = 1024  # columns per program of the softmax-gradient kernel


@triton.jit
def _softmax_grad_kernel(S, DP, LSE, DELTA, P_OUT, DS_OUT, n_cols, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    s = tl.load(S + offs, mask=mask, other=0.0)
    dp = tl.load(DP + offs, mask=mask, other=0.0)
    p = tl.exp(s * scale - tl.load(LSE + row))
    ds = p * (dp - tl.load(DELTA + row))
    tl.store(P_OUT + offs, p.to(P_OUT.dtype.element_ty), mask=mask)
    tl.store(DS_OUT + offs, ds.to(DS_OUT.dtype.element_ty), mask=mask)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with a float32 result: 16-bit operands stay on the tensor cores where torch's
    bmm takes out_dtype (CUDA); elsewhere they are upcast first."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without bmm's out_dtype
            pass
    return torch.bmm(a.float(), b.float())


def chunk_rows(bh: int, lq: int, lk: int, elem_bytes: int) -> int:
    """Query rows per chunk: as many as CHUNK_BUDGET holds (S, dP in float32 and P, dS in the
    input's dtype per score), in chunks of equal size."""
    per_row = bh * lk * (2 * 4 + 2 * elem_bytes)
    budget = CHUNK_BUDGET
    n_chunks = math.ceil(lq / max(1, min(lq, budget // per_row)))
    return math.ceil(lq / n_chunks)


def backward(q, k, v, dout, lse, delta, dq, dk, dv, scale: float) -> None:
    """dq, dk, dv (preallocated, any strides) of softmax(scale q k^T) v; lse and delta (B, H, Lq)
    float32 from the forward and the delta pre-pass."""
    b, h, lq, d = q.shape
    lk, bh = k.shape[2], b * h
    kf, vf = k.reshape(bh, lk, d), v.reshape(bh, lk, d)
    dk_acc = torch.zeros((bh, lk, d), dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros((bh, lk, d), dtype=torch.float32, device=q.device)
    rows = chunk_rows(bh, lq, lk, q.element_size())
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        n = r1 - r0
        qc = q[:, :, r0:r1].reshape(bh, n, d)
        doc = dout[:, :, r0:r1].reshape(bh, n, d)
        s = _mm_f32(qc, kf.transpose(1, 2))
        dp = _mm_f32(doc, vf.transpose(1, 2))
        p16 = torch.empty((bh, n, lk), dtype=q.dtype, device=q.device)
        ds16 = torch.empty_like(p16)
        _softmax_grad_kernel[(bh * n, triton.cdiv(lk, _COLS))](
            s, dp, lse[:, :, r0:r1].reshape(bh * n).contiguous(), delta[:, :, r0:r1].reshape(bh * n).contiguous(),
            p16, ds16, lk, scale, BLOCK=_COLS)
        del s, dp
        dv_acc += _mm_f32(p16.transpose(1, 2), doc)
        dk_acc += _mm_f32(ds16.transpose(1, 2), qc)
        dq[:, :, r0:r1] = (_mm_f32(ds16, kf) * scale).view(b, h, n, d)
    dk.copy_((dk_acc * scale).view(b, h, lk, d))
    dv.copy_(dv_acc.view(b, h, lk, d))
