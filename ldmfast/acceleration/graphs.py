"""accelerate(..., cuda_graphs=True): the model's inference forward captured as CUDA graphs.

A denoiser of a few hundred modules launches 500-800 kernels per call; with the fused ops the GPU
runs them faster than Python can launch them (MONAI's DiffusionModelUNet at batch 16 on an H100:
18.5 ms of kernels, 24.7 ms per call), so a sampling loop waits on the host. A CUDA graph records
the launches of one call and replays them with one: the host cost of the whole forward becomes a
few input copies and a replay.

Replay is for inference: a call with grad mode on, with tensors off CUDA or on several devices,
inside another capture or under torch.compile runs the forward as before. A graph is kept per input
signature (shapes, strides, dtypes, devices, the non-tensor arguments, and the modes a forward
depends on: training, inference mode, autocast), the two most recent; graphs are dropped when a
parameter or buffer moves (model.to(), a reloaded state dict that replaced tensors); in-place
updates of the parameters are seen by the next replay. Outputs are copied out of the graph's
memory, so a result stays valid after the next call. A model whose signature changes every call
(a Python number as the timestep, say) stops capturing after a few tries, with one warning.
Replays are ordered across streams; concurrent calls from several threads are not supported.
"""
from __future__ import annotations

import itertools
import types
import warnings
import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..diffusion.cuda_graph import GraphCache, capture, static_like, warm_up
from .patcher import bind, fused_forward, has_fused_forward
from .report import AccelerationReport, Change

# Non-tensor leaves that may be part of a signature and of an output (immutable values).
_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _CapturedCall:
    """forward(*args, **kwargs) captured for the example inputs' signature."""

    def __init__(self, forward: Callable, leaves: list, spec, warmup: int = 2):
        # forward is only called here: a replay runs the recorded kernels (and holding the bound
        # method would keep the model alive through _STATES, whose keys are weak).
        self.static = [static_like(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        self.spec = spec
        self.device = next(x for x in leaves if isinstance(x, torch.Tensor)).device
        self.last_stream = None  # the stream of the latest replay
        with torch.cuda.device(self.device):  # the inputs' device, whichever is current
            warm_up(lambda: self._run(forward), self.device, warmup)
            self.graph = torch.cuda.CUDAGraph()
            out = capture(self.graph, lambda: self._run(forward), self.device)
        self.out_leaves, self.out_spec = pytree.tree_flatten(out)
        odd = [type(x).__name__ if not isinstance(x, torch.Tensor) else f"a {x.device.type} tensor"
               for x in self.out_leaves
               if not (isinstance(x, _PLAIN_VALUES) or (isinstance(x, torch.Tensor) and x.device.type == "cuda"))]
        if odd:
            raise TypeError(f"the output holds {', '.join(sorted(set(odd)))}, which a replay would not update")

    def _run(self, forward: Callable):
        args, kwargs = pytree.tree_unflatten(self.static, self.spec)
        return forward(*args, **kwargs)

    def __call__(self, leaves: list):
        stream = torch.cuda.current_stream(self.device)
        if self.last_stream is not None and self.last_stream != stream:
            stream.wait_stream(self.last_stream)  # the buffers are the earlier replay's until it ends
        self.last_stream = stream
        for buf, x in zip(self.static, leaves):
            if isinstance(buf, torch.Tensor):
                buf.copy_(x)
        self.graph.replay()
        return pytree.tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in self.out_leaves],
                                     self.out_spec)


class _GraphState:
    """A module's graphs, the parameter addresses they were captured with, and the signatures
    whose capture failed (those run eagerly, with one warning each)."""

    def __init__(self, max_graphs: int = 2):
        self.cache = GraphCache(max_graphs)
        self.failed: dict = {}
        self.addresses: tuple = ()  # of the module's parameters and buffers at capture
        self.captures = self.hits = 0
        self.thrashing = False  # signatures change call after call: captures cost more than they save


def _tensor_addresses(module: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers()))


def why_not_graphed(leaves: list) -> str | None:
    """Why a call with these argument leaves runs eagerly, or None when it can replay a graph."""
    if torch.is_grad_enabled():
        return "grad mode is on (graphs replay inference only)"
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "inside torch.compile or a trace"
    if any(not isinstance(x, (torch.Tensor, *_PLAIN_VALUES)) for x in leaves):
        return "a non-tensor argument that is not a plain value"
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors or any(x.device.type != "cuda" for x in tensors):
        return "not every tensor argument is on a CUDA device"
    if len({x.device for x in tensors}) > 1:
        return "tensor arguments on several devices"
    if torch.cuda.is_current_stream_capturing():
        return "already inside a CUDA-graph capture"
    return None


def _signature(module: nn.Module, leaves: list, spec) -> tuple:
    modes = (module.training, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
             torch.get_autocast_dtype("cuda"))
    return (str(spec), modes) + tuple((tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor)
                                      else (type(x), x) for x in leaves)


# Captures after which a module whose graphs are mostly not replayed stops capturing.
_THRASH_CAPTURES = 8


# Made on a module's first call: a deepcopy (or an unpickled copy) of a graphed model gets its
# graphed forward, bound to the copy, but no state of its own, and must not share the original's.
_STATES: "weakref.WeakKeyDictionary[nn.Module, _GraphState]" = weakref.WeakKeyDictionary()


def _state(module: nn.Module) -> _GraphState:
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = _GraphState()
    return state


@fused_forward
def _graphed_forward(self, inner_function: Callable, *args, **kwargs):
    """The module's forward, replayed from a CUDA graph where the call allows (see the module doc).
    inner_function: the function of the forward the graphs replay, bound to self at each call."""
    state = _state(self)
    inner = inner_function.__get__(self)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    if why_not_graphed(leaves) is not None:
        return inner(*args, **kwargs)
    addresses = _tensor_addresses(self)
    if addresses != state.addresses:  # moved or replaced parameters: the graphs read old memory
        state.cache.clear()
        state.failed.clear()
        state.addresses = addresses
    key = _signature(self, leaves, spec)
    if key in state.failed or state.thrashing:
        return inner(*args, **kwargs)
    if key in state.cache:
        state.hits += 1
    elif state.captures >= _THRASH_CAPTURES and state.hits < state.captures:
        state.thrashing = True
        warnings.warn(f"ldmfast.accelerate(cuda_graphs=True): {type(self).__name__}'s input signature keeps "
                      f"changing ({state.captures} captures, {state.hits} replays of an earlier one: a Python "
                      "number argument?); it runs eagerly from now on", stacklevel=2)
        return inner(*args, **kwargs)
    else:
        state.captures += 1
    try:
        call = state.cache.get(key, lambda: _CapturedCall(inner, leaves, spec))
    except Exception as err:  # a forward that cannot be captured (host sync, CPU tensors inside...)
        state.failed[key] = str(err).splitlines()[0] if str(err) else type(err).__name__
        warnings.warn(f"ldmfast.accelerate(cuda_graphs=True): {type(self).__name__}'s forward could not be "
                      f"captured for this input signature; it runs eagerly ({state.failed[key]})", stacklevel=2)
        return inner(*args, **kwargs)
    return call(leaves)


def _forward_function(model: nn.Module):
    """(function, rebind) of the forward the model runs now: its class's (rebind None), an ldmfast
    fused forward a rule set, or a method bound to it; rebind(function, model) puts the latter two
    back. None where the forward is some other instance attribute."""
    previous = model.__dict__.get("forward")
    if previous is None:
        return type(model).forward, None
    if has_fused_forward(model):
        return previous.func, bind
    if isinstance(previous, types.MethodType) and previous.__self__ is model:
        return previous.__func__, types.MethodType
    return None


def graph_forward(model: nn.Module, report: AccelerationReport) -> None:
    """Give `model` (the root) the graphed forward, over whatever forward it has now (an ldmfast
    fused forward a rule set, or its class's)."""
    found = _forward_function(model)
    if found is None:
        kind = type(model.__dict__["forward"]).__name__
        report.leave("", model, f"cuda_graphs: the root's forward is an instance attribute ({kind}), not a "
                                "method of it, which the graphs cannot wrap without keeping the model alive")
        return
    inner, rebind = found
    _STATES[model] = _GraphState()
    model.forward = bind(_graphed_forward, model, inner)
    model_ref = weakref.ref(model)  # the report is kept per model with a weak key: no strong path back

    def undo():
        module = model_ref()
        if module is None:
            return
        if rebind is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = rebind(inner, module)
        _STATES.pop(module, None)

    report.record(Change("", "cuda_graphs", f"{type(model).__name__}: inference forward replayed from CUDA "
                                            "graphs (per input signature)"), undo)
