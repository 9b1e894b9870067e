"""The eager fast path of the ops that have autograd.

Every op is a `torch.library.custom_op` with its fake and autograd registrations, which is what
torch.compile, export, vmap and the dispatch modes see. In plain eager mode the same kernels are
reached through a `torch.autograd.Function` instead: the custom op's round trip (dispatcher,
Python autograd kernel, redispatch, refilling default arguments for setup_context) cost about
100 us of host time per call on a CPU core, more than the kernel itself at the UNet's small feature
maps on a GPU. Both paths run the same forward, setup_context and backward functions.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


def applies(*tensors) -> bool:
    """Whether the fast path computes exactly what the custom op would: plain tensors (or
    parameters), eager mode, no compile or trace, no functorch transform, no torch-function or
    dispatch mode."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._is_torch_function_mode_enabled():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def records_grad(*tensors) -> bool:
    """Whether autograd would record the op: grad mode on and some input requiring grad. When
    not, the fast path calls the forward alone (the autograd.Function's own bookkeeping is host
    time that inference, e.g. a sampling loop, does not need)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call(op: Callable, function: type, forward: Callable, args: tuple, *tensors):
    """op(*args) where the fast path does not apply (`applies(*tensors)`); else the op's
    autograd.Function (`function`, from `function()` below) where autograd records the call, and
    its forward alone where it does not."""
    if not applies(*tensors):
        return op(*args)
    return function.apply(*args) if records_grad(*tensors) else forward(*args)


# Parameters are plain tensors to the dispatcher (their __torch_function__ is disabled).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# Every op's forward takes its backend's name last, and its "reference" backend is plain torch:
# what a double backward differentiates.
REFERENCE_BACKEND = "reference"


def function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function running `forward(*inputs)`, then the op's registered
    `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)`; ctx.eager tells the backward
    to call its kernels directly rather than through the backward custom op.

    The kernels' backward is not differentiable itself. Where autograd records the backward
    (create_graph=True: gradient penalties, double backward), the gradients come from the forward
    recomputed on the reference backend instead, which autograd can differentiate again. For that,
    setup_context must save the op's tensor inputs first, in their order (None for an absent
    optional one), as the ops' setup_contexts do: the inputs come back from ctx.saved_tensors still
    connected to the graph (and through saved-tensor hooks, as under activation checkpointing), so
    the forward records only the non-tensor inputs (about 1 us of host time per call, where
    matching the saved tensors to the inputs by identity would cost several)."""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True
        ctx.plain_inputs = tuple(None if isinstance(x, torch.Tensor) else x for x in inputs)
        return output

    fast_backward = once_differentiable(backward)

    def bwd(ctx, *grads):
        if all(g is None for g in grads):
            # No gradient reached the outputs (the ops turn materialize_grads off): in a double
            # backward, another op's backward that saved this output can send it none.
            return (None,) * len(ctx.needs_input_grad)
        if torch.is_grad_enabled():  # the engine's grad mode during a backward: create_graph
            return _differentiable_backward(ctx, forward, grads)
        return fast_backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _differentiable_backward(ctx, forward: Callable, grads: tuple) -> tuple:
    """The op's input gradients by autograd through the reference forward, with create_graph:
    themselves differentiable in the inputs and in `grads`."""
    saved = iter(ctx.saved_tensors)  # the tensor inputs first (see `function`)
    inputs = [next(saved) if plain is None else plain for plain in ctx.plain_inputs[:-1]] + [REFERENCE_BACKEND]
    wanted = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        outputs = forward(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
    result: list = [None] * len(inputs)
    if pairs and wanted:
        found = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                    [grad for _, grad in pairs], create_graph=True, allow_unused=True)
        for i, grad in zip(wanted, found):
            result[i] = grad
    return tuple(result)
