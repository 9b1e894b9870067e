"""Attention for wide heads (D > 256: the VQGAN's one-head middle block has 512) as tensor-core
GEMMs over chunks of query rows, with one Triton pass for the softmax (forward) or its gradient
(backward) between them. The forward is matmul-softmax-matmul a chunk at a time; the backward is
below.

The flash-style Triton backward keeps a (key block x D) pair of dk/dv accumulators on chip; at
D = 512 only 32 x 32 tiles fit and it ran at 0.26x the speed of torch's matmul-softmax-matmul
backward on an H100 (3.3 ms against 0.6 ms at B=6, L=2688). Here, for all batch-heads at once and
a chunk of query rows at a time:

    S = scale q k^T, dP = do v^T
    P = exp(S - lse), dS = P (dP - delta)              (one pass: _softmax_grad_kernel)
    dv += P^T do, dk += scale dS^T q, dq = scale dS k   (float32 accumulation across chunks; dq,
                                                       and dk, dv of one chunk, straight from
                                                       the GEMM in the input dtype)

Five GEMMs per chunk, where matmul-softmax-matmul's backward does four from its stored P.
Score precision: bfloat16 heads keep S and dP in bfloat16, as matmul-softmax-matmul does (its
precision, which the numerics contract measures against; the exp and sums in float32), with the
scale applied in the GEMM's float32 epilogue, and P and dS overwrite them in place: the score-sized
buffers are the bytes that bound these passes (on an H100, float32 S and dP made the GEMMs that
write them 1.7x slower than torch's and the gradient pass read 2x the bytes). float16 heads keep
float32 S and dP: float16's range is too small for an unscaled dP when a GradScaler has multiplied
the gradients by up to 2^16.
Memory: the chunk's score buffers (a budget fixes the rows per chunk) and dk, dv accumulators:
linear in L; the Lq x Lk matrix is never formed whole.
"""
from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from . import _grid

# Bytes of a chunk's score-sized buffers (score_bytes below): at B=6, L=2688 in bfloat16 the forward
# and the backward in one chunk each. Each chunk costs ~60 us of host time (launches), and 128 MiB
# with float32 scores (4 backward chunks) left that B=6 call host-bound on an H100 (2.6 ms of wall
# time for 1.4 ms of kernels); a transient that post-training's peak memory sees, constant in the
# batch size.
CHUNK_BUDGET = 256 << 20
_COLS = 1024  # columns per program of the softmax-gradient kernel


@triton.jit
def _softmax_grad_kernel(S, DP, LSE, DELTA, P_OUT, DS_OUT, n_cols, rows_per_bh, lse_bh_stride, scale,
                         BLOCK: tl.constexpr):
    """P and dS of row bh * rows_per_bh + i of the chunk; its lse and delta at bh * lse_bh_stride + i
    (the chunk's rows of the (B, H, L) tensors, read in place). P_OUT and DS_OUT may be S and DP
    themselves: each element is read before it is written, by the same program."""
    row = tl.program_id(0)
    stat = (row // rows_per_bh) * lse_bh_stride + row % rows_per_bh
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(s * scale - tl.load(LSE + stat))
    ds = p * (dp - tl.load(DELTA + stat))
    tl.store(P_OUT + offs, p.to(P_OUT.dtype.element_ty), mask=mask)
    tl.store(DS_OUT + offs, ds.to(DS_OUT.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_rows_kernel(S, P_OUT, LSE, n_cols, rows_per_bh, lse_bh_stride, scale, BLOCK: tl.constexpr):
    """P = softmax(scale S) of one row, and its log-sum-exp, stored at LSE + bh * lse_bh_stride + i
    for row bh * rows_per_bh + i (the chunk's rows of the (B, H, L) lse, in place): an online pass
    for max and sum over column blocks, then one writing P (P_OUT may be S: the second pass reads
    each element before writing it)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_cols
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        s = tl.load(S + base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(s, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        s = tl.load(S + base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(P_OUT + base + cols, tl.exp(s * scale - lse).to(P_OUT.dtype.element_ty), mask=cols < n_cols)
    tl.store(LSE + (row // rows_per_bh) * lse_bh_stride + row % rows_per_bh, lse)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with a float32 result: 16-bit operands stay on the tensor cores on CUDA (bmm's
    out_dtype); on the CPU they are upcast first."""
    if a.dtype != torch.float32 and a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)  # (applies() checked that it exists)
    return torch.bmm(a.float(), b.float())


def _mm_f32_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool, alpha: float = 1.0) -> None:
    """acc (float32) = alpha * a @ b, plus acc where `accumulate`: the sum and scale in the GEMM's
    epilogue (on an H100 the separate `acc += a @ b` adds and scalings took a quarter of the
    backward's GPU time). Without accumulate acc is not read (beta = 0: it may be uninitialized)."""
    beta = 1.0 if accumulate else 0.0
    if a.dtype != torch.float32 and a.is_cuda:
        if _F32_OUT_BADDBMM.get((a.device, a.dtype)):
            torch.baddbmm(acc, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=acc)
        else:
            product = torch.bmm(a, b, out_dtype=torch.float32)
            if accumulate:
                acc.add_(product, alpha=alpha)
            else:
                torch.mul(product, alpha, out=acc)
        return
    torch.baddbmm(acc, a.float(), b.float(), beta=beta, alpha=alpha, out=acc)


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """dst (B, H, n, D), any strides, = alpha * a @ b (a: (B*H, n, K), b: (B*H, K, D)) in dst's
    dtype: the GEMM accumulates in float32 and rounds once, as a float32 product cast afterwards
    would, without that float32 buffer and the casting copy (a launch, and a pass over a buffer
    twice dst's size). In place where dst's batch and head dims merge, else through a buffer."""
    shape = (a.shape[0], a.shape[1], b.shape[2])
    try:
        out = dst.view(shape)
    except RuntimeError:  # ((B, L, H, D) storage: heads do not merge with the batch)
        out = torch.empty(shape, dtype=dst.dtype, device=dst.device)
    torch.baddbmm(out, a, b, beta=0.0, alpha=alpha, out=out)
    if out.data_ptr() != dst.data_ptr():
        dst.copy_(out.view(dst.shape))


_F32_OUT_BMM: dict = {}
# (device, dtype) -> whether baddbmm accumulates 16-bit products into float32 in place
_F32_OUT_BADDBMM: dict = {}
_FAILED: dict = {}  # device -> why these GEMMs failed there (then the flash-style kernels run)
# (device, shape) whose chunk buffers ran out of memory: the kernels run for it without another
# try (each failed allocation makes the caching allocator synchronize and empty its cache).
_OUT_OF_MEMORY: set = set()


def run(fn, q: torch.Tensor, *args) -> bool:
    """fn(q, *args) (forward or backward) where `applies(q)`; False when the caller's flash-style
    kernels must run instead: out of memory for the chunk buffers (from then on for that shape), or any other
    failure (a Triton compilation, say: from then on, with one warning). Either leaves nothing the
    kernels do not overwrite."""
    if not applies(q):
        return False
    shape = (q.device, fn.__name__, tuple(q.shape), tuple(args[0].shape))
    if shape in _OUT_OF_MEMORY:
        return False
    try:
        # The GEMMs pick their own output dtypes (module docstring); an enclosing autocast would
        # recast them.
        with torch.autocast(q.device.type, enabled=False):
            fn(q, *args)
        return True
    except torch.cuda.OutOfMemoryError:
        _OUT_OF_MEMORY.add(shape)
        return False
    except Exception as err:  # noqa: BLE001 - any failure here has the kernels as a fallback
        _FAILED[q.device] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"ldmfast attention: the chunked GEMMs for wide heads failed on {q.device} "
                      f"({_FAILED[q.device]}); the flash-style kernels run instead", stacklevel=3)
        return False


def applies(q: torch.Tensor) -> bool:
    """Whether a head as wide as q's takes these GEMMs rather than the flash-style kernels: 16-bit
    heads over 256, where the GPU's batched GEMM can return float32 scores from 16-bit operands
    (else the scores would need float32 GEMMs, slower than the kernels); on the CPU (Triton's
    interpreter, for tests) the same choice."""
    if q.shape[3] <= 256 or q.dtype == torch.float32 or q.device in _FAILED:
        return False
    if not q.is_cuda:
        return True
    if q.device not in _F32_OUT_BMM:
        try:
            one = torch.ones((1, 1, 1), dtype=q.dtype, device=q.device)
            _F32_OUT_BMM[q.device] = torch.bmm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _F32_OUT_BMM[q.device] = False
    key = (q.device, q.dtype)
    # (The probe reads its result back, a synchronization a CUDA graph capture must not see: during
    # one the separate adds run, and the probe waits for an eager call.)
    if key not in _F32_OUT_BADDBMM and not torch.cuda.is_current_stream_capturing():
        _F32_OUT_BADDBMM[key] = _accumulates_in_place(q.dtype, q.device)
    return _F32_OUT_BMM[q.device]


def _accumulates_in_place(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether baddbmm(acc, a, b, out_dtype=float32, out=acc) works here and gives beta * acc +
    alpha * a @ b (checked on numbers, since it writes its own input)."""
    try:
        acc = torch.full((1, 2, 2), 2.0, dtype=torch.float32, device=device)
        a = torch.ones((1, 2, 3), dtype=dtype, device=device)
        torch.baddbmm(acc, a, a.transpose(1, 2), out_dtype=torch.float32, beta=1.0, alpha=0.5, out=acc)
        return bool((acc == 3.5).all())  # 2 + 0.5 * 3
    except (TypeError, RuntimeError):
        return False


def _low_precision_scores(q: torch.Tensor) -> bool:
    """Whether S and dP stay in q's dtype (bfloat16), P and dS overwriting them (module docstring)."""
    return q.dtype == torch.bfloat16


def score_bytes(q: torch.Tensor, backward: bool) -> int:
    """Bytes per score of a chunk's buffers: bfloat16 S (forward), S and dP (backward), each
    overwritten by P and dS; else float32 S (and dP) besides P (and dS) in q's dtype."""
    per = q.element_size() if _low_precision_scores(q) else 4 + q.element_size()
    return 2 * per if backward else per


def chunk_rows(bh: int, lq: int, lk: int, bytes_per_score: int) -> int:
    """Query rows per chunk: as many as CHUNK_BUDGET holds, in chunks of equal size (each chunk's
    launches cost ~60 us of host time, which at the VQGAN's B=6, L=2688 was as long as its GPU
    work on an H100)."""
    per_row = max(1, bh * lk * bytes_per_score)
    n_chunks = max(1, math.ceil(lq / max(1, min(lq, CHUNK_BUDGET // per_row))))
    return max(1, math.ceil(lq / n_chunks))


def _chunks(q: torch.Tensor, k: torch.Tensor, backward: bool):
    """(r0, r1) of each chunk of query rows, sized by chunk_rows. With bfloat16 scores the forward
    takes the backward's chunks: the same GEMM shapes round S the same way in both, so that the
    backward's P matches the forward's lse (other shapes may pick other GEMM kernels)."""
    b, h, lq, _ = q.shape
    rows = chunk_rows(b * h, lq, k.shape[2], score_bytes(q, backward or _low_precision_scores(q)))
    return [(r0, min(lq, r0 + rows)) for r0 in range(0, lq, rows)]


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a (B, H, L, ...) tensor, batch and heads merged: (B*H, r1 - r0, ...) (a copy
    where the strides do not allow a view)."""
    return t[:, :, r0:r1].reshape(-1, r1 - r0, *t.shape[3:])


def _scores(a: torch.Tensor, b: torch.Tensor, alpha: float, low: bool) -> tuple[torch.Tensor, float]:
    """(a score-sized product (S, or dP with alpha 1), the scale the Triton pass still applies): a @ b
    in a's dtype with alpha applied in the GEMM's float32 epilogue where `low`, else float32 a @ b
    and alpha left to the pass."""
    if not low:
        return _mm_f32(a, b), alpha
    s = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    return torch.baddbmm(s, a, b, beta=0.0, alpha=alpha, out=s), 1.0


def forward(q, k, v, out, lse, scale: float) -> None:
    """out (preallocated, any strides) = softmax(scale q k^T) v and lse (B, H, Lq) float32, a chunk
    of query rows at a time: S, one Triton pass for P (input dtype) and lse, then P v summed in
    float32 (the flash kernels' online rescaling is not needed with whole rows)."""
    b, h, lq, d = q.shape
    lk, bh = k.shape[2], b * h
    kf, vf = k.reshape(bh, lk, d), v.reshape(bh, lk, d)
    low = _low_precision_scores(q)
    block = min(4096, _grid.next_power_of_2(lk))
    for r0, r1 in _chunks(q, k, backward=False):
        n = r1 - r0
        s, pass_scale = _scores(_rows(q, r0, r1), kf.transpose(1, 2), scale, low)
        p = s if low else torch.empty((bh, n, lk), dtype=q.dtype, device=q.device)
        lse_rows = lse.view(bh, lq)[:, r0:]  # (a view: the kernel writes the chunk's lse in place)
        _softmax_rows_kernel[(bh * n,)](s, p, lse_rows, lk, n, lse_rows.stride(0), pass_scale, BLOCK=block)
        del s
        _mm_into(out[:, :, r0:r1], p, vf)


def backward(q, k, v, dout, lse, delta, dq, dk, dv, scale: float) -> None:
    """dq, dk, dv (preallocated, any strides) of softmax(scale q k^T) v; lse and delta (B, H, Lq)
    float32 from the forward and the delta pre-pass."""
    b, h, lq, d = q.shape
    lk, bh = k.shape[2], b * h
    kf, vf = k.reshape(bh, lk, d), v.reshape(bh, lk, d)
    # (Row stride lq for both: the kernel takes one; both are contiguous as the op allocates them.)
    lse_rows, delta_rows = lse.contiguous().view(bh, lq), delta.contiguous().view(bh, lq)
    chunks = _chunks(q, k, backward=True)
    # dk and dv sum over chunks in float32; one chunk (the VQGAN's B=6, L=2688) writes them directly
    one = len(chunks) == 1
    if not one:
        dk_acc = torch.empty((bh, lk, d), dtype=torch.float32, device=q.device)
        dv_acc = torch.empty_like(dk_acc)
    low = _low_precision_scores(q)
    for r0, r1 in chunks:
        n = r1 - r0
        qc, doc = _rows(q, r0, r1), _rows(dout, r0, r1)
        s, pass_scale = _scores(qc, kf.transpose(1, 2), scale, low)
        dp, _ = _scores(doc, vf.transpose(1, 2), 1.0, low)
        if low:
            p16, ds16 = s, dp  # (overwritten in place)
        else:
            p16 = torch.empty((bh, n, lk), dtype=q.dtype, device=q.device)
            ds16 = torch.empty_like(p16)
        _softmax_grad_kernel[(bh * n, _grid.cdiv(lk, _COLS))](
            s, dp, lse_rows[:, r0:], delta_rows[:, r0:], p16, ds16, lk, n, lq, pass_scale, BLOCK=_COLS)
        del s, dp
        if one:
            _mm_into(dv, p16.transpose(1, 2), doc)
            _mm_into(dk, ds16.transpose(1, 2), qc, scale)
        else:
            _mm_f32_into(dv_acc, p16.transpose(1, 2), doc, accumulate=r0 > 0)
            _mm_f32_into(dk_acc, ds16.transpose(1, 2), qc, accumulate=r0 > 0, alpha=scale)
        _mm_into(dq[:, :, r0:r1], ds16, kf, scale)
    if not one:
        dk.copy_(dk_acc.view(b, h, lk, d))
        dv.copy_(dv_acc.view(b, h, lk, d))
