"""Fused GroupNorm (+ SiLU) on every backend, forward and backward.

    z = (x - mean_{n,g}) * rstd_{n,g} * weight_c + bias_c,   y = act(z)

for x of shape (N, C, *spatial) with 1 to 3 spatial dims; mean and rstd = 1 / sqrt(var + eps) per
(sample, group of C / num_groups consecutive channels), biased variance, as torch.nn.GroupNorm.
`group_norm_reference` is the definition (torch GroupNorm then SiLU, in float32, float64 for
float64 input). The kernels compute statistics in float32 (float64 where they combine partial
sums), keep the input's memory format (contiguous or channels-last) and save mean and rstd for
the backward, which recomputes the normalized value and the activation's derivative from x.

Backward, with g = dy * act'(z), xhat = (x - mean) * rstd, M = (C / G) * spatial size:
    dbias_c = sum_{n,s} g,   dweight_c = sum_{n,s} g * xhat
    dx = rstd * (g * weight_c - a_{n,g} / M - xhat * b_{n,g} / M),
    a_{n,g} = sum_{c in g, s} g * weight_c,   b_{n,g} = sum_{c in g, s} g * weight_c * xhat
Every backend reduces first per (sample, channel), then over channels of a group and over samples
in a fixed order, so results are deterministic.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._values import is_integer, is_number
from . import _backends, _eager, _native

ACTIVATIONS = (None, "silu")
OP = "group_norm"

_backends.register(_backends.OpSpec(
    name=OP,
    backends=("reference", "cpu", "triton", "cuda"),
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
))


# ---- layouts ----------------------------------------------------------------------------------

def _is_channels_last(t: torch.Tensor) -> bool:
    """Dense with the channel dimension innermost in storage: (N, *spatial, C) order."""
    perm = (0,) + tuple(range(2, t.dim())) + (1,)
    return t.permute(perm).is_contiguous()


def output_like(x: torch.Tensor) -> torch.Tensor:
    """The output of the op for input x: x's memory format when x is contiguous or channels-last
    (dense with C innermost), else contiguous. Used by the kernels and the fake alike."""
    out = torch.empty_like(x)
    if not out.is_contiguous() and not _is_channels_last(out):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


def _layout(y: torch.Tensor) -> bool:
    """True for channels-last storage of y (an output of output_like), False for contiguous."""
    return not y.is_contiguous()


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- the definition ---------------------------------------------------------------------------

def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """torch.nn.functional.group_norm then SiLU, computed in float32 (float64 for float64 input);
    the output has x's dtype and memory format."""
    ct = _stats_dtype(x)
    # Contiguous: torch's channels-last CPU kernel loses precision when |mean| >> std (relative
    # error ~3e-5 in float32 at mean 100, std 1, torch 2.13).
    z = F.group_norm(x.to(ct).contiguous(), num_groups, None if weight is None else weight.to(ct),
                     None if bias is None else bias.to(ct), eps)
    if activation == "silu":
        z = F.silu(z)
    out = output_like(x)
    out.copy_(z)
    return out


def _group_size(x, num_groups) -> int:
    """Elements per (sample, group): given, not inferred, so that batch 0 reshapes too."""
    return (x.shape[1] // num_groups) * math.prod(x.shape[2:])


def _reference_stats(x, num_groups, eps):
    ct = _stats_dtype(x)
    xg = x.to(ct).reshape(x.shape[0], num_groups, _group_size(x, num_groups))
    if xg.numel() == 0:  # no sample, or empty groups: the kernels' statistics of nothing
        mean = xg.new_zeros(xg.shape[:2])
        return mean, torch.full_like(mean, 1.0 / math.sqrt(eps))
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    return mean, (var + eps).rsqrt()


def _affine_views(x, weight, bias, ct):
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    w = torch.ones(c, dtype=ct, device=x.device) if weight is None else weight.to(ct)
    b = torch.zeros(c, dtype=ct, device=x.device) if bias is None else bias.to(ct)
    return w.reshape(shape), b.reshape(shape)


def _reference_backward(dy, x, weight, bias, mean, rstd, num_groups, activation):
    """The backward formulas of the module docstring in plain torch (float32, float64 for float64)."""
    ct = _stats_dtype(x)
    n, c = x.shape[:2]
    m = _group_size(x, num_groups)
    xg = x.to(ct).reshape(n, num_groups, m)
    xhat = ((xg - mean.to(ct)[..., None]) * rstd.to(ct)[..., None]).reshape(x.shape)
    w, b = _affine_views(x, weight, bias, ct)
    g = dy.to(ct)
    if activation == "silu":
        z = xhat * w + b
        s = torch.sigmoid(z)
        g = g * (s * (1 + z * (1 - s)))
    reduce_dims = [0] + list(range(2, x.dim()))
    dbias = g.sum(reduce_dims)
    dweight = (g * xhat).sum(reduce_dims)
    gw = (g * w).reshape(n, num_groups, m)
    xh = xhat.reshape(n, num_groups, m)
    a = gw.mean(-1, keepdim=True)
    bb = (gw * xh).mean(-1, keepdim=True)
    dx = (rstd.to(ct)[..., None] * (gw - a - xh * bb)).reshape(x.shape)
    out = output_like(x)
    out.copy_(dx)
    return out, dweight.float() if ct != torch.float64 else dweight, dbias.float() if ct != torch.float64 else dbias


# ---- kernels ----------------------------------------------------------------------------------

def _affine_f32(x, weight, bias):
    c = x.shape[1]
    w = (torch.ones(c, dtype=torch.float32, device=x.device) if weight is None
         else weight.to(torch.float32).contiguous())
    b = (torch.zeros(c, dtype=torch.float32, device=x.device) if bias is None
         else bias.to(torch.float32).contiguous())
    return w, b


def _affine_native(weight, bias):
    """The affine parameters as the CUDA kernels and the CPU binding take them: (address, dtype code)
    each, 0 for an absent one; they convert 16-bit or absent ones themselves (two conversions here
    cost host time on every call: ~5 us each on a CPU core, a launch each on a GPU). Returns the
    tensors to keep alive until the call, and the four arguments. (Written out, without generators:
    host time on every call.)"""
    w, b = _affine_kept(weight), _affine_kept(bias)
    return (w, b), (_native.ptr(w), _affine_code(w), _native.ptr(b), _affine_code(b))


def _affine_kept(t):
    return None if t is None else (t if t.dtype in _native.KERNEL_DTYPES else t.float()).contiguous()


def _affine_code(t) -> int:
    return _native.DTYPE_CODES[torch.float32 if t is None else t.dtype]


def _cuda_call_parts(xk, weight, bias, n, c, s, g, cl, backward):
    """The CUDA module, a workspace for this call, and _affine_native's tensors and arguments."""
    mod = _native.cuda_module()
    ws = torch.empty(mod.group_norm_workspace(_native.dtype_code(xk), n, c, s, g, cl, backward),
                     dtype=torch.float32, device=xk.device)
    return (mod, ws) + _affine_native(weight, bias)


def _sizes(x, num_groups):
    n, c = x.shape[:2]
    s = x.numel() // (n * c) if n * c else 0
    return n, c, s, num_groups


def _run_forward(backend, x, weight, bias, num_groups, eps, activation):
    y = output_like(x)
    xk = _native.in_layout_of(x, y)
    n, c, s, g = _sizes(x, num_groups)
    mean = _native._maybe_poison(torch.empty((n, g), dtype=torch.float32, device=x.device))
    rstd = _native._maybe_poison(torch.empty((n, g), dtype=torch.float32, device=x.device))
    if n * c * s == 0:
        mean.zero_()
        rstd.fill_(1.0 / math.sqrt(eps))
        return y, mean, rstd
    silu = activation == "silu"
    cl = _layout(y)
    if backend == "cuda":
        mod, ws, _kept, affine = _cuda_call_parts(xk, weight, bias, n, c, s, g, cl, False)
        mod.group_norm_forward(
            x.device.index, _native.cuda_stream(x), _native.dtype_code(xk), xk.data_ptr(), *affine, y.data_ptr(),
            mean.data_ptr(), rstd.data_ptr(), ws.data_ptr(), n, c, s, g, float(eps), silu, cl)
        return y, mean, rstd
    if backend == "cpu":
        _kept, affine = _affine_native(weight, bias)
        _native.cpu_module().group_norm_forward(
            _native.dtype_code(xk), xk.data_ptr(), *affine, y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, c, s, g,
            float(eps), silu, cl, torch.get_num_threads())
    elif backend == "triton":
        from . import group_norm_triton
        w, b = _affine_f32(x, weight, bias)
        with _native.triton_device(xk):
            group_norm_triton.forward(xk, w, b, y, mean, rstd, n, c, s, g, float(eps), silu, cl)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return y, mean, rstd


def _run_backward(backend, dy, x, weight, bias, mean, rstd, num_groups, activation):
    dx = output_like(x)
    xk = _native.in_layout_of(x, dx)
    dyk = _native.in_layout_of(dy, dx)
    n, c, s, g = _sizes(x, num_groups)
    dweight = _native._maybe_poison(torch.empty(c, dtype=torch.float32, device=x.device))
    dbias = _native._maybe_poison(torch.empty(c, dtype=torch.float32, device=x.device))
    if n * c * s == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias
    silu = activation == "silu"
    cl = _layout(dx)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    if backend == "cuda":
        mod, ws, _kept, affine = _cuda_call_parts(xk, weight, bias, n, c, s, g, cl, True)
        mod.group_norm_backward(
            x.device.index, _native.cuda_stream(x), _native.dtype_code(xk), dyk.data_ptr(), xk.data_ptr(), *affine,
            mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), ws.data_ptr(),
            n, c, s, g, silu, cl)
        return dx, dweight, dbias
    if backend == "cpu":
        _kept, affine = _affine_native(weight, bias)
        _native.cpu_module().group_norm_backward(
            _native.dtype_code(xk), dyk.data_ptr(), xk.data_ptr(), *affine, mean.data_ptr(), rstd.data_ptr(),
            dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), n, c, s, g, silu, cl, torch.get_num_threads())
    elif backend == "triton":
        from . import group_norm_triton
        w, b = _affine_f32(x, weight, bias)
        with _native.triton_device(xk):
            group_norm_triton.backward(dyk, xk, w, b, mean, rstd, dx, dweight, dbias, n, c, s, g, silu, cl)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return dx, dweight, dbias


# ---- torch.library registration ---------------------------------------------------------------

def _forward(x, weight, bias, num_groups, eps, activation, backend):
    """The op's forward on any backend (the custom op's body, and the eager fast path's)."""
    act = activation or None
    if backend == "reference":
        mean, rstd = _reference_stats(x, num_groups, eps)
        return group_norm_reference(x, num_groups, weight, bias, eps, act), mean, rstd
    return _run_forward(backend, x, weight, bias, num_groups, eps, act)


def _backward_kernels(grad_out, x, weight, bias, mean, rstd, num_groups, activation, backend):
    act = activation or None
    if backend == "reference":
        return _reference_backward(grad_out, x, weight, bias, mean, rstd, num_groups, act)
    return _run_backward(backend, grad_out, x, weight, bias, mean, rstd, num_groups, act)


@torch.library.custom_op("ldmfast::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                   eps: float, activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, num_groups, eps, activation, backend)


@_group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, activation, backend):
    st = _stats_dtype(x) if backend == "reference" else torch.float32
    return (output_like(x), x.new_empty((x.shape[0], num_groups), dtype=st),
            x.new_empty((x.shape[0], num_groups), dtype=st))


@torch.library.custom_op("ldmfast::group_norm_backward", mutates_args=())
def _group_norm_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                            activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype and the output's memory format, dweight, dbias in float32 (float64 for
    float64 x on the reference backend))."""
    return _backward_kernels(grad_out, x, weight, bias, mean, rstd, num_groups, activation, backend)


@_group_norm_backward_op.register_fake
def _(grad_out, x, weight, bias, mean, rstd, num_groups, activation, backend):
    st = _stats_dtype(x) if backend == "reference" else torch.float32
    c = x.shape[1]
    return output_like(x), x.new_empty((c,), dtype=st), x.new_empty((c,), dtype=st)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.backend = num_groups, activation, backend
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of mean and rstd (two launches)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    kernels = _backward_kernels if getattr(ctx, "eager", False) else _group_norm_backward_op
    dx, dweight, dbias = kernels(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation, ctx.backend)
    dw = dweight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = dbias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None, None, None


_group_norm_op.register_autograd(_backward, setup_context=_setup_context)
_GroupNormEager = _eager.function("_GroupNormEager", _forward, _setup_context, _backward)


# ---- the public function ----------------------------------------------------------------------

def _check_affine(t, name, x):
    if t is None:
        return
    c = x.shape[1]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: must be None or a tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise ValueError(f"{name}: must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != (c,):
        raise ValueError(f"{name}: must have shape (C,) = ({c},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: device {t.device} must equal x's {x.device}")


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, activation: Optional[str] = None
               ) -> torch.Tensor:
    """GroupNorm over `num_groups` groups of consecutive channels, optionally followed by SiLU.

    x: (N, C, *spatial) with 1 to 3 spatial dims; float32, float16, bfloat16 (float64 on the
    reference backend); contiguous or channels-last (the output keeps x's memory format; other
    layouts are packed and give a contiguous output).
    weight, bias: None or (C,) floating tensors (float32 weights with fp16/bf16 x, as under autocast,
    are fine). eps: > 0. activation: None or "silu".
    Differentiable in x, weight and bias; statistics in float32.
    """
    if not isinstance(x, torch.Tensor) or x.is_complex() or not x.is_floating_point():
        raise ValueError(f"x: must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"x: must have shape (N, C, *spatial) with 1 to 3 spatial dims, got {tuple(x.shape)}")
    if not is_integer(num_groups) or num_groups < 1:
        raise ValueError(f"num_groups: must be a positive int, got {num_groups!r}")
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups: C={x.shape[1]} must be divisible by num_groups={num_groups}")
    _check_affine(weight, "weight", x)
    _check_affine(bias, "bias", x)
    if not is_number(eps) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be None or 'silu', got {activation!r}")
    backend = _backends.resolve(OP, x)
    args = (x, weight, bias, int(num_groups), float(eps), activation or "", backend)
    return _eager.call(_group_norm_op, _GroupNormEager, _forward, args, x, weight, bias)[0]
