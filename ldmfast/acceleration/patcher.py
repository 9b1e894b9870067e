"""The reversible edits `accelerate` makes: swap a child module, give one module instance a fused
forward, set an attribute. Each records its own undo in the report."""
from __future__ import annotations

import types
from typing import Callable

from torch import nn

from .report import AccelerationReport, Change

FUSED_MARK = "_ldmfast_fused_forward"


def fused_forward(fn: Callable) -> Callable:
    """Mark a function as an ldmfast fused forward, so a second `accelerate` recognizes it."""
    setattr(fn, FUSED_MARK, True)
    return fn


def has_fused_forward(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return fwd is not None and getattr(getattr(fwd, "__func__", None), FUSED_MARK, False)


def forward_patched_elsewhere(module: nn.Module) -> bool:
    """An instance-level forward that is not ours (e.g. an offloading hook): not ours to replace."""
    return "forward" in module.__dict__ and not has_fused_forward(module)


def swap_child(report: AccelerationReport, parent: nn.Module, name: str, new: nn.Module, change: Change) -> None:
    old = parent._modules[name]
    parent._modules[name] = new

    def undo():
        parent._modules[name] = old

    report.record(change, undo)


def override_forward(report: AccelerationReport, module: nn.Module, fn: Callable, change: Change) -> None:
    """module.forward = fn bound to module, on this instance only: its class, state_dict and hooks
    are untouched (nn.Module.__call__ still runs the hooks around the new forward)."""
    module.forward = types.MethodType(fn, module)

    def undo():
        module.__dict__.pop("forward", None)

    report.record(change, undo)


def set_attribute(report: AccelerationReport, obj, name: str, value, change: Change,
                  setter: Callable | None = None) -> None:
    old = getattr(obj, name)
    (setter or (lambda v: setattr(obj, name, v)))(value)

    def undo():
        (setter or (lambda v: setattr(obj, name, v)))(old)

    report.record(change, undo)
