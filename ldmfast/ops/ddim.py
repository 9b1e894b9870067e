"""Fused DDIM update (Song et al. 2020) on every backend.

    x0_hat = f(x_t, model_output)            by parameterization, optionally clamped
    eps_hat = g(x_t, model_output)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma noise
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)

`ddim_step_reference` is the definition. The kernels read x_t, the model output and the noise once
and write x_prev (and x0_hat) once, with per-sample coefficients computed here in float64.
eps_hat comes from the unclamped model output, as in diffusers' DDIMScheduler by default.

Two entry points share one op. `ddim_step` takes abar as floats or tensors anywhere, checks their
values and builds the coefficient table on the host (numpy, then one small copy to the device).
`ddim_step_capturable` takes abar as tensors already on x_t's device and builds the table there
with torch ops: no host sync, no numpy, no host-to-device copy, so a whole sampling step (denoiser
and update) can be captured in a CUDA graph and replayed with new abar values copied into static
buffers.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .._values import is_number
from . import _backends, _native

PARAMETERIZATIONS = ("eps", "v", "x0")
OP = "ddim_step"

_backends.register(_backends.OpSpec(
    name=OP,
    backends=("reference", "cpu", "triton", "cuda"),
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
))

Abar = Union[float, torch.Tensor]


# ---- the definition ---------------------------------------------------------------------------

def _per_sample_view(a: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return a.to(device=x.device, dtype=dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def ddim_sigma(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma of the DDIM step; 0 where abar_t == 1 (x_t is already clean) or the step goes up in noise."""
    beta_t = 1 - abar_t
    safe_beta_t = torch.where(beta_t > 0, beta_t, torch.ones_like(beta_t))
    variance = torch.where(beta_t > 0, (1 - abar_prev) / safe_beta_t * (1 - abar_t / abar_prev),
                           torch.zeros_like(beta_t))
    return eta * variance.clamp(min=0).sqrt()


def ddim_step_reference(x_t, model_output, abar_t, abar_prev, eta=0.0, noise=None, parameterization="eps",
                        clip_x0=None):
    """Plain-torch DDIM update, computed in float64 for float64 inputs and in float32 otherwise.
    abar_t, abar_prev: tensors of shape (N,). Returns (x_prev, x0_hat) in x_t's dtype."""
    ct = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    x, o = x_t.to(ct), model_output.to(ct)
    a_t, a_prev = _per_sample_view(abar_t, x, ct), _per_sample_view(abar_prev, x, ct)
    if parameterization == "eps":
        eps = o
        x0 = (x - (1 - a_t).sqrt() * o) / a_t.sqrt()
    elif parameterization == "v":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * o
        eps = a_t.sqrt() * o + (1 - a_t).sqrt() * x
    else:
        x0 = o.clone()  # returned: must not alias the model output
        # Where abar_t == 1 there is no noise to recover; its coefficient below is 0 anyway.
        eps = torch.where(a_t < 1, (x - a_t.sqrt() * o) / (1 - a_t).sqrt(), torch.zeros_like(x))
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    sigma = ddim_sigma(a_t, a_prev, eta)
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise.to(ct)
    return x_prev.to(x_t.dtype), x0.to(x_t.dtype)


# ---- per-sample coefficients of the kernels ---------------------------------------------------

def _coefficient_rows(a_t, a_prev, eta: float, parameterization: str, xp):
    """The coefficient columns, written once for both array libraries `xp` (numpy or torch)."""
    sa, sb = xp.sqrt(a_t), xp.sqrt(1 - a_t)
    zero, one = xp.zeros_like(a_t), xp.ones_like(a_t)
    if parameterization == "eps":
        rows = [1 / sa, -sb / sa, zero, one]
    elif parameterization == "v":
        rows = [sa, -sb, sb, sa]
    else:  # where abar_t == 1 there is no noise to recover: the eps row stays 0
        inv_sb = xp.where(sb > 0, 1 / xp.where(sb > 0, sb, one), zero)
        rows = [zero, one, inv_sb, -sa * inv_sb]
    beta_t = 1 - a_t
    variance = xp.where(beta_t > 0, (1 - a_prev) * (1 - a_t / a_prev) / xp.where(beta_t > 0, beta_t, one), zero)
    sigma = eta * xp.sqrt(xp.where(variance > 0, variance, zero))
    direction = 1 - a_prev - sigma ** 2
    rows += [xp.sqrt(a_prev), xp.sqrt(xp.where(direction > 0, direction, zero)), sigma, zero]
    return xp.stack(rows, 1)


def ddim_coefficients(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float, parameterization: str
                      ) -> torch.Tensor:
    """(N, 8) float64 CPU rows in the order of DdimCoef (csrc/dtype.h):
    x0 = c0 x + c1 out; eps = c2 x + c3 out; x_prev = c4 x0 + c5 eps + c6 noise.
    Computed with numpy on the host: a few microseconds, where torch's per-op overhead on tiny
    tensors cost ~80 us a step."""
    with np.errstate(divide="ignore", invalid="ignore"):  # masked out by the where()s
        rows = _coefficient_rows(abar_t.detach().cpu().double().numpy(), abar_prev.detach().cpu().double().numpy(),
                                 eta, parameterization, np)
    return torch.from_numpy(rows)


def ddim_coefficients_on_device(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: float,
                                parameterization: str) -> torch.Tensor:
    """The rows of ddim_coefficients, (N, 8) float64, computed with torch ops on abar's device: a
    dozen tiny kernels and no synchronization, which a CUDA graph can capture."""
    return _coefficient_rows(abar_t.double(), abar_prev.double(), eta, parameterization, torch)


def _run_kernel(backend, x_t, model_output, abar_t, abar_prev, eta, noise, parameterization, clip_x0,
                return_x0, coefficients_on_device=False):
    y = _native.batch_major_output(x_t)
    x0 = _native.empty_like_dense(y) if return_x0 else None
    x = _native.in_layout_of(x_t, y)
    o = _native.in_layout_of(model_output, y)
    nz = _native.in_layout_of(noise, y) if noise is not None else None
    n = x_t.shape[0]
    m = x_t.numel() // n if n else 0
    if coefficients_on_device:
        coef = ddim_coefficients_on_device(abar_t, abar_prev, eta, parameterization)
    else:
        coef = ddim_coefficients(abar_t, abar_prev, eta, parameterization)
    coef = coef.to(dtype=torch.float32).contiguous()
    if coef.device != x_t.device:
        # A plain copy from pageable host memory synchronizes the stream: every step would wait for
        # the GPU to drain, and a sampling loop could no longer queue the next denoiser call
        # meanwhile (seen on an H200: fused DDIM 0.15 ms per call at any size, and MONAI's 50-step
        # loop slower with the fused ops than without). Pinned + non_blocking queues the copy.
        if x_t.device.type == "cuda":
            coef = coef.pin_memory()
        coef = coef.to(device=x_t.device, non_blocking=True)
    clip = clip_x0 is not None
    x0_out = x0 if x0 is not None else x_t.new_empty((0,))  # the op always returns two tensors
    if n * m == 0:
        return y, x0_out
    if backend == "cpu":
        _native.cpu_module().ddim_step(
            _native.dtype_code(x), x.data_ptr(), o.data_ptr(), _native.ptr(nz), coef.data_ptr(), y.data_ptr(),
            _native.ptr(x0), n, m, clip, float(clip_x0 or 0.0), torch.get_num_threads())
    elif backend == "cuda":
        _native.cuda_module().ddim_step(
            x.device.index, _native.cuda_stream(x), _native.dtype_code(x), x.data_ptr(), o.data_ptr(),
            _native.ptr(nz), coef.data_ptr(), y.data_ptr(), _native.ptr(x0), n, m, clip, float(clip_x0 or 0.0))
    elif backend == "triton":
        from . import ddim_triton
        with _native.triton_device(x):
            ddim_triton.ddim_step(x, o, nz, coef, y, x0, n, m, clip_x0)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return y, x0_out


# ---- torch.library registration ---------------------------------------------------------------

@torch.library.custom_op("ldmfast::ddim_step", mutates_args=())
def _ddim_step_op(x_t: torch.Tensor, model_output: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
                  eta: float, noise: Optional[torch.Tensor], parameterization: str, clip_x0: Optional[float],
                  return_x0: bool, backend: str, coefficients_on_device: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # coefficients_on_device: abar lives on x_t's device and the kernels' table is built there
    # (ddim_step_capturable); otherwise abar is a float64 CPU tensor and the table is built in numpy.
    if backend == "reference":
        y, x0 = ddim_step_reference(x_t, model_output, abar_t, abar_prev, eta, noise, parameterization, clip_x0)
        return y, (x0 if return_x0 else x_t.new_empty((0,)))
    return _run_kernel(backend, x_t, model_output, abar_t, abar_prev, eta, noise, parameterization, clip_x0,
                       return_x0, coefficients_on_device)


@_ddim_step_op.register_fake
def _(x_t, model_output, abar_t, abar_prev, eta, noise, parameterization, clip_x0, return_x0, backend,
      coefficients_on_device=False):
    return torch.empty_like(x_t), (torch.empty_like(x_t) if return_x0 else x_t.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x_t, model_output, abar_t, abar_prev, eta, noise, parameterization, clip_x0 = inputs[:8]
    ctx.save_for_backward(x_t, model_output, abar_t, abar_prev)
    ctx.eta, ctx.parameterization, ctx.clip_x0 = eta, parameterization, clip_x0
    ctx.has_noise = noise is not None


def _backward(ctx, grad_prev, grad_x0):
    # The step is linear in (x_t, model_output, noise) up to the clamp of x0_hat.
    x_t, model_output, abar_t, abar_prev = ctx.saved_tensors
    ct = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    # torch, not numpy: the backward is traced by torch.compile and AOTAutograd.
    c = _coefficient_rows(abar_t.double(), abar_prev.double(), ctx.eta, ctx.parameterization, torch)
    c = c.to(device=x_t.device, dtype=ct)
    c = c.reshape(c.shape[:1] + (1,) * (x_t.dim() - 1) + c.shape[1:])
    c = [c[..., i] for i in range(7)]
    g = grad_prev.to(ct)
    g_x0 = c[4] * g
    if grad_x0 is not None and grad_x0.numel():
        g_x0 = g_x0 + grad_x0.to(ct)
    if ctx.clip_x0 is not None:
        x0 = c[0] * x_t.to(ct) + c[1] * model_output.to(ct)
        g_x0 = g_x0 * (x0.abs() <= ctx.clip_x0)
    g_x = (c[0] * g_x0 + c[2] * c[5] * g).to(x_t.dtype)
    g_out = (c[1] * g_x0 + c[3] * c[5] * g).to(model_output.dtype)
    g_noise = (c[6] * g).to(x_t.dtype) if ctx.has_noise else None
    return g_x, g_out, None, None, None, g_noise, None, None, None, None, None


_ddim_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function ----------------------------------------------------------------------

def _check_abar(value: Abar, name: str, x_t: torch.Tensor) -> torch.Tensor:
    """abar as a float64 CPU tensor of shape (N,): the kernels' coefficients are computed on the host."""
    n = x_t.shape[0]
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"{name}: must be a float or a floating-point tensor, got {value.dtype}")
        if value.numel() == 1:
            a = value.detach().cpu().double().reshape(1).expand(n)
        elif value.dim() >= 1 and value.shape[0] == n and value.numel() == n:
            a = value.detach().cpu().double().reshape(n)
        else:
            raise ValueError(f"{name}: must hold 1 or N={n} values (one per sample), got shape {tuple(value.shape)}")
    elif is_number(value):
        if not torch.compiler.is_compiling() and not 0 < value <= 1:
            raise ValueError(f"{name}: must lie in (0, 1], got {value}")
        a = torch.full((n,), float(value), dtype=torch.float64)
    else:
        raise ValueError(f"{name}: must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor) and not torch.compiler.is_compiling():
        bad = ~((a > 0) & (a <= 1))
        if bool(bad.any()):
            raise ValueError(f"{name}: every value must lie in (0, 1], got {a[bad][0].item()}")
    return a.contiguous()


def _check_tensors(x_t, model_output, noise):
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
        raise ValueError(f"x_t: must be a floating-point tensor, got {getattr(x_t, 'dtype', type(x_t).__name__)}")
    if x_t.dim() < 1:
        raise ValueError("x_t: must have a batch dimension (shape (N, ...)), got a 0-d tensor")
    for name, t in (("model_output", model_output), ("noise", noise)):
        if t is None and name == "noise":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: must be a tensor, got {type(t).__name__}")
        if t.shape != x_t.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} must equal x_t's {tuple(x_t.shape)}")
        if t.dtype != x_t.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} must equal x_t's {x_t.dtype}")
        if t.device != x_t.device:
            raise ValueError(f"{name}: device {t.device} must equal x_t's {x_t.device}")


def ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, abar_t: Abar, abar_prev: Abar, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None, parameterization: str = "eps",
              clip_x0: Optional[float] = None, return_x0: bool = False,
              generator: Optional[torch.Generator] = None):
    """One DDIM step from x_t to x_prev.

    x_t, model_output: (N, ...) tensors of one float dtype and device, any layout.
    abar_t, abar_prev: cumulative alpha products in (0, 1]; a float or one value per sample.
    eta: 0 gives deterministic DDIM; 1 gives DDPM-like ancestral variance.
    noise: the standard normal draw for eta > 0 (drawn with `generator` when None); ignored at eta 0.
    parameterization: what the model predicts: "eps", "v" or "x0".
    clip_x0: clamp x0_hat to [-clip_x0, clip_x0]. return_x0: also return x0_hat.
    Returns x_prev, or (x_prev, x0_hat). Differentiable in x_t, model_output and noise.
    """
    _check_options(x_t, model_output, noise, eta, parameterization, clip_x0)
    a_t = _check_abar(abar_t, "abar_t", x_t)
    a_prev = _check_abar(abar_prev, "abar_prev", x_t)
    return _step(x_t, model_output, a_t, a_prev, eta, noise, parameterization, clip_x0, return_x0, generator,
                 coefficients_on_device=False)


def ddim_step_capturable(x_t: torch.Tensor, model_output: torch.Tensor, abar_t: torch.Tensor,
                         abar_prev: torch.Tensor, eta: float = 0.0, noise: Optional[torch.Tensor] = None,
                         parameterization: str = "eps", clip_x0: Optional[float] = None, return_x0: bool = False,
                         generator: Optional[torch.Generator] = None):
    """ddim_step with abar_t and abar_prev as floating-point tensors on x_t's device (1 or N values),
    whose coefficient table is computed on that device: no host synchronization, numpy or
    host-to-device copy, so the call can be captured in a CUDA graph (the abar tensors then act
    as static inputs). Their values are not checked, as that would need a sync: they must lie in
    (0, 1], as ddim_step requires. Same outputs and gradients as ddim_step otherwise."""
    _check_options(x_t, model_output, noise, eta, parameterization, clip_x0)
    a_t = _check_device_abar(abar_t, "abar_t", x_t)
    a_prev = _check_device_abar(abar_prev, "abar_prev", x_t)
    return _step(x_t, model_output, a_t, a_prev, eta, noise, parameterization, clip_x0, return_x0, generator,
                 coefficients_on_device=True)


def _check_options(x_t, model_output, noise, eta, parameterization, clip_x0) -> None:
    _check_tensors(x_t, model_output, noise)
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization: must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")
    if not is_number(eta) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
    if clip_x0 is not None and (not is_number(clip_x0) or not clip_x0 > 0):
        raise ValueError(f"clip_x0: must be None or a number > 0, got {clip_x0!r}")


def _check_device_abar(value, name: str, x_t: torch.Tensor) -> torch.Tensor:
    """abar as an (N,) tensor on x_t's device; checks only what needs no look at the values."""
    n = x_t.shape[0]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: must be a tensor on x_t's device ({x_t.device}), got {type(value).__name__}; "
                         "ddim_step takes floats")
    if value.is_complex() or not value.is_floating_point():
        raise ValueError(f"{name}: must be a floating-point tensor, got {value.dtype}")
    if value.device != x_t.device:
        raise ValueError(f"{name}: must be on x_t's device {x_t.device}, got {value.device}")
    if value.numel() == 1:
        return value.reshape(1).expand(n)
    if value.dim() >= 1 and value.shape[0] == n and value.numel() == n:
        return value.reshape(n)
    raise ValueError(f"{name}: must hold 1 or N={n} values (one per sample), got shape {tuple(value.shape)}")


def _step(x_t, model_output, a_t, a_prev, eta, noise, parameterization, clip_x0, return_x0, generator,
          coefficients_on_device):
    backend = _backends.resolve(OP, x_t)
    if eta == 0:
        noise = None  # sigma is 0: skip reading it
    elif noise is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    x_prev, x0 = _ddim_step_op(x_t, model_output, a_t, a_prev, float(eta), noise, parameterization,
                               None if clip_x0 is None else float(clip_x0), bool(return_x0), backend,
                               coefficients_on_device)
    return (x_prev, x0) if return_x0 else x_prev
