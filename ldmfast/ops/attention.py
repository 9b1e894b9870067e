"""Fused (flash-style) attention, non-causal, forward and backward, on every backend.

    out = softmax(scale * q k^T) v,     lse = logsumexp(scale * q k^T) over keys (float32)

q: (B, H, Lq, D); k, v: (B, H, Lk, D); any strides (a (B, L, H, D) view is read in place). Only the
reference materializes the Lq x Lk matrix: the kernels run an online softmax over key tiles and keep
lse for the backward, so memory grows linearly with L. The output is laid out in q's stride order,
so attention over a feature map writes straight into that map's memory format.
Backends: reference, cpu (C++), triton, cuda (forward; its backward is the Triton kernel).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._values import is_number
from . import _backends, _eager, _native

OP = "attention"
MAX_HEAD_DIM = 512

_backends.register(_backends.OpSpec(
    name=OP,
    backends=("reference", "cpu", "triton", "cuda"),
    # Triton's kernel uses tensor cores; the CUDA kernel is a CUDA-core fallback.
    auto_order={"cpu": ("cpu",), "cuda": ("triton", "cuda")},
))


# ---- the definition ---------------------------------------------------------------------------

def attention_reference(q, k, v, scale):
    """Plain torch, float64 for float64 input and float32 otherwise. Returns (out, lse)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.softmax(s, dim=-1), v.to(ct))
    return out.to(q.dtype), lse.float()


def _attention_backward_reference(q, k, v, lse, dout, scale):
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, dout = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    p = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - lse.to(ct).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


# ---- kernels ----------------------------------------------------------------------------------

def _ref(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """A tensor as the C++ side's TensorRef: address and four strides, in elements."""
    return (t.data_ptr(), *t.stride())


def _forward_kernel(backend, q, k, v, scale):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = _native.empty_in_stride_order_of(q)
    lse = _native._maybe_poison(torch.empty((b, h, lq), dtype=torch.float32, device=q.device))
    if backend == "cpu":
        _native.cpu_module().attention_forward(_native.dtype_code(q), _ref(q), _ref(k), _ref(v), _ref(out),
                                               lse.data_ptr(), b, h, lq, lk, d, scale, torch.get_num_threads())
    elif backend == "cuda":
        _native.cuda_module().attention_forward(q.device.index, _native.cuda_stream(q), _native.dtype_code(q),
                                                _ref(q), _ref(k), _ref(v), _ref(out), lse.data_ptr(),
                                                b, h, lq, lk, d, scale)
    else:
        from . import attention_triton
        with _native.triton_device(q):
            attention_triton.forward(q, k, v, out, lse, scale)
    return out, lse


def _backward_kernel(backend, q, k, v, out, lse, dout, scale):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dq = _native.empty_in_stride_order_of(q)
    dk = _native.empty_in_stride_order_of(k)
    dv = _native.empty_in_stride_order_of(v)
    if backend == "cpu":
        _native.cpu_module().attention_backward(
            _native.dtype_code(q), _ref(q), _ref(k), _ref(v), _ref(out), _ref(dout), lse.data_ptr(),
            _ref(dq), _ref(dk), _ref(dv), b, h, lq, lk, d, scale, torch.get_num_threads())
    else:  # triton, and cuda, whose backward is the Triton kernel
        from . import attention_triton
        with _native.triton_device(q):
            attention_triton.backward(q, k, v, out, lse, dout, dq, dk, dv, scale)
    return dq, dk, dv


# ---- torch.library registration ---------------------------------------------------------------

def _forward(q, k, v, scale, backend):
    """The op's forward on any backend (the custom op's body, and the eager fast path's)."""
    if backend == "reference":
        out, lse = attention_reference(q, k, v, scale)
        layout = _native.empty_in_stride_order_of(q)  # same layout as every other backend
        return layout.copy_(out), lse
    return _forward_kernel(backend, q, k, v, scale)


def _backward_kernels(q, k, v, out, lse, dout, scale, backend):
    if backend == "reference":
        grads = _attention_backward_reference(q, k, v, lse, dout, scale)
        return tuple(_native.empty_in_stride_order_of(t).copy_(g) for t, g in zip((q, k, v), grads))
    return _backward_kernel(backend, q, k, v, out, lse, dout, scale)


@torch.library.custom_op("ldmfast::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, backend)


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    b, h, lq, _ = q.shape
    return _native.empty_in_stride_order_of(q), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("ldmfast::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, dout: torch.Tensor, scale: float, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_kernels(q, k, v, out, lse, dout, scale, backend)


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, scale, backend):
    return tuple(_native.empty_in_stride_order_of(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.set_materialize_grads(False)  # lse's gradient is never used: no zero-filled tensor for it


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    kernels = _backward_kernels if getattr(ctx, "eager", False) else _attention_backward_op
    dq, dk, dv = kernels(q, k, v, out, lse, dout, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
_AttentionEager = _eager.function("_AttentionEager", _forward, _setup_context, _backward)


# ---- the public functions ---------------------------------------------------------------------

def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: must have shape (B, H, L, D), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} must equal q's {q.dtype}/{q.device}")
    for name, t in (("k", k), ("v", v)):
        for axis, what in ((0, "batch"), (1, "heads"), (3, "head dim")):
            if t.shape[axis] != q.shape[axis]:
                raise ValueError(f"{name}: {what} {t.shape[axis]} must equal q's {q.shape[axis]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: length {v.shape[2]} must equal k's {k.shape[2]}")
    if k.shape[2] == 0:
        raise ValueError("k: needs at least one key (Lk = 0)")
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D={d} is outside the supported range 1..{MAX_HEAD_DIM}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale q k^T) v for q (B, H, Lq, D) and k, v (B, H, Lk, D); scale defaults to D^-1/2.
    fp32, fp16, bf16 (fp32 accumulation); differentiable in q, k and v."""
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif not is_number(scale) or not math.isfinite(scale):
        raise ValueError(f"scale: must be a finite number, got {scale!r}")
    backend = _backends.resolve(OP, q)
    if backend == "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # The CUDA backend's backward is the Triton kernel: say so now rather than at backward time.
        reason = _backends.unavailable_reason("triton", q.device)
        if reason is not None:
            raise _backends.BackendUnavailableError(f"{OP}: the cuda backend's backward needs Triton: {reason}")
    args = (q, k, v, float(scale), backend)
    return _eager.call(_attention_op, _AttentionEager, _forward, args, q, k, v)[0]


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, heads, H*W, C/heads) as a view in either memory format."""
    n, c, h, w = x.shape
    if x.dim() == 4 and x.stride(1) == 1 and c > 1:  # channels-last: tokens are rows of C
        return x.permute(0, 2, 3, 1).reshape(n, h * w, heads, c // heads).transpose(1, 2)
    return x.reshape(n, heads, c // heads, h * w).transpose(2, 3)


def feature_map_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                          scale: Optional[float] = None) -> torch.Tensor:
    """Multi-head self-attention over the H*W positions of (N, C, H, W) maps q, k, v (e.g. channel
    slices of one qkv convolution), in contiguous or channels-last format, with no transposing
    copies: heads are strided views, and the (N, C, H, W) result has q's memory format."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: must be an (N, C, H, W) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not isinstance(num_heads, int) or num_heads < 1 or q.shape[1] % num_heads:
        raise ValueError(f"num_heads: must be a positive divisor of the channels {q.shape[1]}, got {num_heads!r}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k, v: shapes {tuple(k.shape)}, {tuple(v.shape)} must equal q's {tuple(q.shape)}")
    n, c, h, w = q.shape
    out = attention(*(_heads_view(t, num_heads) for t in (q, k, v)), scale=scale)
    if q.stride(1) == 1 and c > 1:
        return out.transpose(1, 2).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return out.transpose(2, 3).reshape(n, c, h, w)
