"""Shared check for `ldmfast.accelerate` on a peer model: with fresh random weights and inputs,
the accelerated model agrees with the untouched one, forward and backward, and `undo` restores it.

- float64 (the reference backend): the accelerated model computes the same function, to rounding
  (this is where a wrong scale, head split, residual or rescale would show);
- float32 (the CPU kernels): output within the numerics contract's fp32 tolerance of the float64
  model, gradients too (or within twice plain torch's float32 error, where a deep network's exceeds
  it), and torch's own GroupNorm / SDPA are not called any more;
- the state_dict keeps its keys and tensors, and undo gives back the original modules.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import ldmfast
import ldmfast.ops as ops
from numerics import FP32_TOL, rel_err

# Semantics in float64: both sides compute in float64, so only summation order differs. The
# attention op keeps its logsumexp in float32 (the op's schema, on every backend), so gradients
# through attention are float64 only up to ~1e-7 (key-bias gradients, zero up to rounding, to ~1e-6).
FP64_TOL = 1e-10
FP64_GRAD_TOL = 1e-5
# A whole network's float32 gradients carry the rounding of every op on their path (dozens, in
# the autoencoders' encoders): seen up to 1.3e-5 for the fused model over 30+ seeds, with plain
# torch's own error on the same parameter sometimes far lower. 5x the per-op bound, or twice plain
# torch's error where that is larger; a wrong kernel is off by orders of magnitude more.
FP32_NET_GRAD_TOL = 5e-5
_NORMS = (nn.GroupNorm, nn.LayerNorm)


def fresh_seed() -> int:
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    return seed


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Every parameter random (zero-initialized output convolutions and unit norms would hide a
    wrong branch): norm scales around 1, other matrices at 1/sqrt(fan-in), biases small."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS):
                p.normal_(1.0 if name == "weight" else 0.0, 0.5)
            elif p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            else:
                p.normal_(0.0, 0.2)
    return model


@contextlib.contextmanager
def counting_calls(monkeypatch):
    """Count calls of ldmfast's fused ops and of the torch functions they replace."""
    calls = {"group_norm": 0, "attention": 0, "torch_group_norm": 0, "torch_sdpa": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        m.setattr(ops, "group_norm", counted("group_norm", ops.group_norm))
        m.setattr(ops, "attention", counted("attention", ops.attention))
        m.setattr(F, "group_norm", counted("torch_group_norm", F.group_norm))
        m.setattr(F, "scaled_dot_product_attention", counted("torch_sdpa", F.scaled_dot_product_attention))
        yield calls


def _run(model, forward, inputs, weight):
    """Output, input grads and parameter grads of sum(output * weight)."""
    model.zero_grad(set_to_none=True)
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = forward(model, *leaves)
    (out.double() * weight).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), [t.grad for t in leaves if t.requires_grad], grads


def _grad_errors(got, want):
    """Relative error of each input grad and each parameter grad: {name: error}."""
    in_got, par_got = got
    in_want, par_want = want
    assert set(par_got) == set(par_want), "parameters with grads differ"
    errors = {f"input {i}": rel_err(g, w) for i, (g, w) in enumerate(zip(in_got, in_want))}
    # Some gradients are zero up to rounding (a key bias shifts every score of a row equally):
    # gradients under 1% of the largest are measured against that 1% instead of their own norm.
    floor = 1e-2 * max(w.double().norm().item() for w in par_want.values())
    for name, w in par_want.items():
        errors[name] = (par_got[name].double() - w.double()).norm().item() / max(w.double().norm().item(), floor)
    return errors


def _assert_grads(got, want, tol, what, baseline=None):
    """Every gradient within tol of the float64 one; with `baseline` (plain torch's gradients in
    the same precision), within twice torch's own error where that is larger: a whole network's
    float32 gradients can exceed the per-op 1e-5 for plain torch too."""
    errors = _grad_errors(got, want)
    allowed = dict.fromkeys(errors, tol)
    if baseline is not None:
        allowed = {k: max(tol, 2 * e) for k, e in _grad_errors(baseline, want).items()}
    for name, err in errors.items():
        assert err < allowed[name], f"{what}: grad of {name} relative error {err:.3g} (allowed {allowed[name]:.3g})"


def check_accelerate(model: nn.Module, make_inputs, forward=None, monkeypatch=None, **accelerate_kwargs):
    """Run the checks of this module on `model` (randomized here); make_inputs(dtype) gives fresh
    inputs of that float dtype. Returns the float64 model's report."""
    forward = forward or (lambda m, *a: m(*a))
    seed = torch.initial_seed()
    randomize(model)
    inputs64 = make_inputs(torch.float64)
    plain64 = copy.deepcopy(model).double()
    out64 = forward(plain64, *inputs64)
    weight = torch.randn(out64.shape, dtype=torch.float64)
    want_out, *want_grads = _run(plain64, forward, inputs64, weight)
    n_group_norms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())

    fused64 = copy.deepcopy(model).double()
    before = fused64.state_dict()
    params = list(fused64.parameters())
    report = ldmfast.accelerate(fused64, **accelerate_kwargs)
    after = fused64.state_dict()
    assert list(fused64.parameters()) == params, f"parameters replaced (seed {seed})"
    if accelerate_kwargs.get("channels_last"):  # conv weights re-stored: same values, new storage order
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        assert report.counts()["channels_last"] == sum(isinstance(m, nn.Conv2d) for m in fused64.modules())
    else:
        assert {k: v.data_ptr() for k, v in after.items()} == {k: v.data_ptr() for k, v in before.items()}, \
            f"state_dict keys or tensors changed (seed {seed})"
    got_out, *got_grads = _run(fused64, forward, inputs64, weight)
    assert rel_err(got_out, want_out) < FP64_TOL, f"float64 output: {rel_err(got_out, want_out):.3g} (seed {seed})"
    _assert_grads(got_grads, want_grads, FP64_GRAD_TOL, f"float64 (seed {seed})")

    plain32 = copy.deepcopy(model).float()
    fused32 = copy.deepcopy(model).float()
    report32 = ldmfast.accelerate(fused32, **accelerate_kwargs)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    with counting_calls(monkeypatch) as calls:
        got_out, *got_grads = _run(fused32, forward, inputs32, weight)
    _, *torch_grads = _run(plain32, forward, inputs32, weight)
    assert rel_err(got_out, want_out) < FP32_TOL, f"float32 output: {rel_err(got_out, want_out):.3g} (seed {seed})"
    _assert_grads(got_grads, want_grads, FP32_NET_GRAD_TOL, f"float32 (seed {seed})", baseline=torch_grads)
    counts = report32.counts()
    if accelerate_kwargs.get("group_norm", True):
        assert calls["group_norm"] == n_group_norms and calls["torch_group_norm"] == 0, calls
    if accelerate_kwargs.get("attention", True):
        assert calls["attention"] == counts.get("attention", 0) and calls["torch_sdpa"] == 0, calls

    report32.undo()
    assert all(p.is_contiguous() for p in fused32.parameters())
    assert [type(m) for m in fused32.modules()] == [type(m) for m in plain32.modules()]
    assert not any("forward" in m.__dict__ for m in fused32.modules())
    torch.testing.assert_close(forward(fused32, *inputs32), forward(plain32, *inputs32), rtol=0, atol=0)
    return report


def check_low_precision_on_cuda(model: nn.Module, make_inputs, forward=None, dtype=torch.bfloat16, device="cuda",
                                autocast: bool = False, **accelerate_kwargs):
    """The accelerated model in `dtype` on the GPU against the float64 model on the CPU: no worse
    than twice the error of the plain model in the same dtype (the numerics contract's rule for
    low precision; a whole network's error can exceed the per-op 1e-2 for plain torch too).
    autocast: keep float32 weights and run under torch.autocast (as the reference release does,
    whose GroupNorm32 needs float32 weights), instead of casting the weights to `dtype`."""
    forward = forward or (lambda m, *a: m(*a))
    randomize(model)
    inputs64 = make_inputs(torch.float64)
    with torch.no_grad():
        want = forward(copy.deepcopy(model).double(), *inputs64)
        low = [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs64]
        plain = copy.deepcopy(model).to(device, torch.float32 if autocast else dtype)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
            torch_err = rel_err(forward(plain, *low).cpu(), want)
            ldmfast.accelerate(plain, **accelerate_kwargs)
            err = rel_err(forward(plain, *low).cpu(), want)
    assert math.isfinite(err) and err <= 2 * torch_err + 1e-4, f"{dtype}: {err:.3g} vs plain torch {torch_err:.3g}"
