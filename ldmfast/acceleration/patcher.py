"""The reversible edits `accelerate` makes: swap a child module, give one module instance a fused
forward, set an attribute. Each records its own undo in the report.

The undos hold the edited modules by weak reference: a report is kept per model, as the value of a
dictionary with weak keys (core._REPORTS), and a strong path from it back to the model would keep
the model alive for ever."""
from __future__ import annotations

import functools
import weakref
from typing import Callable

from torch import nn

from .report import AccelerationReport, Change

FUSED_MARK = "_ldmfast_fused_forward"


def fused_forward(fn: Callable) -> Callable:
    """Mark a function as an ldmfast fused forward, so a second `accelerate` recognizes it."""
    setattr(fn, FUSED_MARK, True)
    return fn


def bind(fn: Callable, obj, *args) -> functools.partial:
    """fn(obj, *args, ...) as an attribute of obj's instance. A functools.partial rather than a
    bound method: both deep-copy onto the copy, but a bound method pickles as getattr(obj, fn's
    name), which obj's class does not have, so an accelerated model or scheduler would save and
    then fail to load; a partial pickles fn by its qualified name."""
    return functools.partial(fn, obj, *args)


def has_fused_forward(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return (isinstance(fwd, functools.partial) and getattr(fwd.func, FUSED_MARK, False)
            and bool(fwd.args) and fwd.args[0] is module)


def forward_patched_elsewhere(module: nn.Module) -> bool:
    """An instance-level forward that is not ours (e.g. an offloading hook): not ours to replace."""
    return "forward" in module.__dict__ and not has_fused_forward(module)


def carry_state(accelerated: nn.Module, original: nn.Module) -> None:
    """Put on `original` the parameters and buffers `accelerated` (which shared them) holds now,
    and its training flag: load_state_dict(assign=True), to_empty() or a train()/eval() while
    accelerated reached only the module in the model, and restoring the original as it was would
    bring back stale (or meta) tensors."""
    for store in ("_parameters", "_buffers"):
        now, before = getattr(accelerated, store), getattr(original, store)
        for key in before.keys() & now.keys():
            before[key] = now[key]
    original.training = accelerated.training


def swap_child(report: AccelerationReport, parent: nn.Module, name: str, new: nn.Module, change: Change) -> None:
    old = parent._modules[name]
    parent._modules[name] = new
    parent_ref, new_ref = weakref.ref(parent), weakref.ref(new)

    def undo():
        parent, new = parent_ref(), new_ref()
        if parent is None or new is None or parent._modules.get(name) is not new:
            return  # the model is gone, or someone else has put another module there since
        carry_state(new, old)
        parent._modules[name] = old

    report.record(change, undo)


def override_method(report: AccelerationReport, obj, name: str, fn: Callable, change: Change) -> None:
    """obj.<name> = fn bound to obj, on this instance only (its class is untouched); the undo
    removes the instance attribute, so the class's method shows again."""
    setattr(obj, name, bind(fn, obj))
    obj_ref = weakref.ref(obj)

    def undo():
        target = obj_ref()
        if target is not None:
            target.__dict__.pop(name, None)

    report.record(change, undo)


def override_forward(report: AccelerationReport, module: nn.Module, fn: Callable, change: Change) -> None:
    """module.forward = fn bound to module, on this instance only: its class, state_dict and hooks
    are untouched (nn.Module.__call__ still runs the hooks around the new forward)."""
    override_method(report, module, "forward", fn, change)


def set_attribute(report: AccelerationReport, obj, name: str, value, change: Change,
                  setter: Callable | None = None) -> None:
    """obj.name = value, or setter(obj, value) where given (the setter takes obj as an argument, so
    that the undo need not hold obj)."""
    put = setter or (lambda target, v: setattr(target, name, v))
    old = getattr(obj, name)
    put(obj, value)
    obj_ref = weakref.ref(obj)

    def undo():
        target = obj_ref()
        if target is not None:
            put(target, old)

    report.record(change, undo)
