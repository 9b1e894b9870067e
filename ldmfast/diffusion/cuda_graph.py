"""One sampling step (denoiser call + DDIM update) captured as a CUDA graph and replayed.

A DDIM step of the cLDM launches hundreds of small kernels; at small batches and in few-step
sampling the host cannot launch them as fast as the GPU runs them. A CUDA graph records the
launches once for a static batch shape and replays them with one call. Everything a step reads
(the state x, the timestep, abar_t, abar_prev, the step's noise, the condition) lives in static
buffers that the caller fills before each replay; the captured step writes the next state back
into the static x, so the state never leaves the graph's memory between steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Step = Callable[..., torch.Tensor]


class GraphedStep:
    """`step(x, t, abar_t, abar_prev, noise, condition) -> x_next` captured for the shapes, dtypes,
    devices and memory formats of the example tensors (None stays None: no noise at eta 0, no
    condition for a closure denoiser)."""

    def __init__(self, step: Step, x: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor,
                 abar_prev: torch.Tensor, noise: Optional[torch.Tensor], condition: Optional[torch.Tensor],
                 warmup: int = 2):
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph: CUDA-graph capture needs CUDA tensors, got a {x.device.type} tensor")
        self.step_fn = step  # held: keeps the denoiser and its tensors alive while the graph lives
        self.static = {name: (None if v is None else static_like(v)) for name, v in (
            ("x", x), ("t", t), ("abar_t", abar_t), ("abar_prev", abar_prev), ("noise", noise),
            ("condition", condition))}
        # The warm-up's results are discarded; the buffers hold the examples' values.
        warm_up(lambda: step(**self.static), x.device, warmup)
        self.graph = torch.cuda.CUDAGraph()
        capture(self.graph, lambda: self.static["x"].copy_(step(**self.static)), x.device)

    def set_state(self, x: torch.Tensor, condition: Optional[torch.Tensor] = None) -> None:
        """Start a new batch: copy its starting state (and condition) into the static buffers."""
        self.static["x"].copy_(x)
        if condition is not None:
            self.static["condition"].copy_(condition)

    def step(self, t: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
             noise: Optional[torch.Tensor] = None) -> None:
        """One replay: device-to-device copies of this step's inputs, then the captured kernels."""
        self.static["t"].copy_(t)
        self.static["abar_t"].copy_(abar_t)
        self.static["abar_prev"].copy_(abar_prev)
        if noise is not None:
            self.static["noise"].copy_(noise)
        self.graph.replay()

    @property
    def state(self) -> torch.Tensor:
        """The static x: after step(), the state after that step (overwritten by the next replay)."""
        return self.static["x"]


def warm_up(fn: Callable[[], object], device: torch.device, times: int) -> None:
    """fn() `times` times before a capture, on a side stream as torch.cuda.graph requires: first
    calls compile Triton kernels, pick cuDNN algorithms and grow the allocator, none of which a
    capture may do. (Under the caller's autocast state, its cast cache off, as in capture.)"""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), _autocast_without_cache():
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


class CaptureError(RuntimeError):
    """A CUDA-graph capture failed (the message is the first error's); capture() put the process's
    CUDA state back first."""


def capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], object], device: torch.device):
    """fn() recorded into `graph` on a new stream of `device`, its result returned. (torch's default
    capture stream is made once, on whichever device is current at the first capture: a later
    capture for another device would record there.)

    When the capture fails, torch's graph context, whose capture_end raises before it restores
    anything, leaves the capture stream current, the caching allocator routing that stream's
    allocations into the graph's pool, and the device's default generator registered with the
    capture (every later random op on the device then fails: "offset increment outside graph
    capture"). All three are put back before CaptureError is raised.

    fn runs under the caller's autocast state with the cast cache off: with the cache on (the
    default, even under no_grad), the graph would read autocast's cast copies of the weights, which
    autocast frees when its block ends."""
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    with torch.cuda.device(device):
        previous = torch.cuda.current_stream(device)
        try:
            with _autocast_without_cache(), torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                return fn()
        except Exception as err:
            torch.cuda.set_stream(previous)
            _end_allocate_to_pool(device, graph)
            _release_generator(device)
            first = err
            while first.__context__ is not None:  # the forward's own error, not capture_end's
                first = first.__context__
            raise CaptureError(str(first).splitlines()[0] if str(first) else type(first).__name__) from err


def _end_allocate_to_pool(device: torch.device, graph: torch.cuda.CUDAGraph) -> None:
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)  # (torch 2.3+)
    if end is None:
        return
    try:
        end(device.index, graph.pool())
    except Exception:  # (capture_end got past it, or no pool was begun)
        pass


def _release_generator(device: torch.device) -> None:
    """A clone of the default generator's state (same seed and offset, not capturing) takes the
    place of the one a failed capture left registered."""
    gen = torch.cuda.default_generators[device.index]
    gen.graphsafe_set_state(gen.clone_state())


def _autocast_without_cache():
    """The current CUDA autocast state with its cast cache off (see capture)."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


def static_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer of t's shape, dtype, device and memory format holding t's values."""
    buf = torch.empty_like(t, memory_format=torch.preserve_format)
    buf.copy_(t)
    return buf


class GraphCache:
    """The most recently used graphs by key (denoiser, shapes, options). Each graph keeps its
    activations in a private memory pool, so only a few are kept."""

    def __init__(self, max_graphs: int = 2):
        self.max_graphs = max_graphs
        self._graphs: dict = {}

    def get(self, key, build: Callable[[], GraphedStep]) -> GraphedStep:
        graph = self._graphs.pop(key, None)
        if graph is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))  # the least recently used
            graph = build()
        self._graphs[key] = graph
        return graph

    def clear(self) -> None:
        self._graphs.clear()

    def __contains__(self, key) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)
