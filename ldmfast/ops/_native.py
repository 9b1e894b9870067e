"""The compiled modules and the glue that hands tensors to them as raw pointers.

`ldmfast._C` (CPU) and `ldmfast._cuda` (CUDA) are optional at import: a build without a CUDA
compiler, or a source checkout that was never built, still imports ldmfast; the dispatcher
then reports those backends as unavailable, with the import error as the reason.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

# Must match ldmfast::DType in csrc/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_DTYPES = tuple(DTYPE_CODES)

_modules: dict[str, object] = {}
_import_errors: dict[str, str] = {}


def _load(name: str):
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(f"ldmfast.{name}")
        except ImportError as err:  # not built, or built for another Python
            _import_errors[name] = str(err)
    return _modules.get(name)


def cpu_module():
    """ldmfast._C, or None when it cannot be imported (see import_error)."""
    return _load("_C")


def cuda_module():
    """ldmfast._cuda, or None when ldmfast was built without CUDA (see import_error)."""
    return _load("_cuda")


def import_error(name: str) -> str | None:
    _load(name)
    return _import_errors.get(name)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """Address of a tensor's first element, 0 for an absent tensor (a null pointer in C++)."""
    return 0 if t is None else t.data_ptr()


def triton_device(t: torch.Tensor):
    """A context that makes t's GPU the current device while Triton kernels launch (Triton launches
    on the current device, not the tensors'), or nothing where it already is (the usual case)."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def cuda_stream(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of t's device (the call Triton's launcher makes:
    no Stream object is built, a few microseconds less per launch)."""
    return torch._C._cuda_getCurrentRawStream(t.device.index)


# ---- output allocation and layouts ------------------------------------------------------------

_poison = False


@contextlib.contextmanager
def poison_outputs():
    """Within this context, kernel outputs are allocated filled with NaN, so that a test can tell
    that every element was written."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty_like_dense(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor with t's shape whose storage order is t's when t is dense (channels-last
    stays channels-last), else contiguous; NaN-filled under poison_outputs()."""
    return _maybe_poison(torch.empty_like(t, dtype=dtype))


def _maybe_poison(out: torch.Tensor) -> torch.Tensor:
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (same shape) have their elements at the same storage offsets."""
    sa = a.stride()
    if sa == b.stride():  # the usual case, without the generator (host time per call)
        return True
    return all(x == y or n == 1 for x, y, n in zip(sa, b.stride(), a.shape))


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t itself when it already has like's layout, else one packed copy in that layout. Kernels
    then walk every operand as one flat array in storage order."""
    if same_layout(t, like):
        return t
    packed = torch.empty_like(like, dtype=t.dtype)
    packed.copy_(t)
    return packed


def batch_major_output(x: torch.Tensor) -> torch.Tensor:
    """A dense output for a per-sample kernel: x's layout when the batch dimension is outermost in
    storage (so sample i occupies one contiguous run), else contiguous."""
    out = empty_like_dense(x)
    n = x.shape[0]
    if n > 1 and out.stride(0) != out.numel() // n:
        out = _maybe_poison(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return out


def empty_in_stride_order_of(t: torch.Tensor, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor (of `shape`, default t's) whose dimensions lie in memory in the order of t's
    strides: a (B, H, L, D) view of a (B, L, H*D) buffer gives a (B, L, H, D)-ordered output, so a
    kernel writes straight into the layout its caller reshapes for free."""
    if t.is_contiguous():  # (the usual case, without the sort and permute: host time per call)
        return _maybe_poison(torch.empty(t.shape if shape is None else shape, dtype=dtype or t.dtype, device=t.device))
    shape = tuple(t.shape if shape is None else shape)
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))  # outermost first
    out = torch.empty([shape[i] for i in order], dtype=dtype or t.dtype, device=t.device)
    inverse = [order.index(i) for i in range(t.dim())]
    return _maybe_poison(out.permute(inverse))
