"""Backend registry and dispatch (DESIGN.md, "Backends and dispatch").

Every op has a `reference` implementation (plain torch, the definition) and some of `cpu` (C++),
`triton` and `cuda`. `auto` picks, per op and per tensor, the first available backend of the op's
preference list for that device. A backend forced through `LDMFAST_BACKEND` or `use_backend()`
that cannot run raises BackendUnavailableError saying why; it never falls back silently.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading

import torch

from . import _native

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the op on the given tensors."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What the dispatcher knows of one op: its backends and, per device type, the order in which
    `auto` tries them (fastest first)."""

    name: str
    backends: tuple[str, ...]
    auto_order: dict[str, tuple[str, ...]]
    kernel_dtypes: tuple[torch.dtype, ...] = _native.KERNEL_DTYPES


OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


# ---- the forced backend -----------------------------------------------------------------------

def _check_choice(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


_env_choice = os.environ.get("LDMFAST_BACKEND", "auto").strip().lower() or "auto"
# The process-wide choice: LDMFAST_BACKEND, or a plain use_backend(...) call.
_state = {"backend": _env_choice, "source": "LDMFAST_BACKEND" if _env_choice != "auto" else "default"}
# The choices of open `with use_backend(...)` blocks, per thread (innermost last), and how many are
# open in all threads: while none is, the ops read only _state (a plain dict, which torch.compile
# traces without a break).
_blocks = threading.local()
_open_blocks = [0]


class use_backend:
    """Force a backend for every ldmfast op: `use_backend("triton")` sets it for the process until
    changed, and `with use_backend("cpu"): ...` for the block only, in this thread only (other
    threads keep their choice). "auto" restores automatic choice."""

    def __init__(self, name: str):
        self._name = _check_choice(str(name).lower(), "use_backend")
        self._previous = dict(_state)
        self._set = {"backend": self._name, "source": "use_backend()"}
        _state.update(self._set)

    def __enter__(self):
        # A block: the process-wide choice goes back to what it was (unless changed since), and the
        # block's holds in this thread, however long after its creation the block opens.
        if _state == self._set:
            _state.update(self._previous)
        stack = getattr(_blocks, "stack", None)
        if stack is None:
            stack = _blocks.stack = []
        stack.append((self._name, "use_backend()"))
        _open_blocks[0] += 1
        return self

    def __exit__(self, *exc):
        _blocks.stack.pop()
        _open_blocks[0] -= 1
        return False


def _forced() -> tuple[str, str]:
    """(backend, what set it) in force in this thread."""
    if _open_blocks[0]:
        stack = getattr(_blocks, "stack", None)
        if stack:
            return stack[-1]
    return _state["backend"], _state["source"]


def get_backend() -> str:
    """The forced backend in this thread, or "auto"."""
    return _forced()[0]


# ---- availability -----------------------------------------------------------------------------

# Decided once at import, without importing Triton (slow) or the compiled modules lazily inside
# code that torch.compile traces. Triton itself reads TRITON_INTERPRET when kernels are defined.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _find_triton() -> str | None:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or one marked unimportable
        found = False
    return None if found else "Triton is not installed (pip install triton)"


_TRITON_MISSING = _find_triton()
_native.cpu_module()
_native.cuda_module()


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None when it can."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        if kind != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {kind} tensor"
        if _native.cpu_module() is None:
            return f"ldmfast._C is not built or failed to import: {_native.import_error('_C')}"
        return None
    if backend == "cuda":
        if kind != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {kind} tensor"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if _native.cuda_module() is None:
            return ("ldmfast was built without its CUDA module (no CUDA compiler at build time, or "
                    f"LDMFAST_CUDA=off): {_native.import_error('_cuda')}")
        return None
    if backend == "triton":
        if _TRITON_MISSING:
            return _TRITON_MISSING
        if kind == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"
        if kind == "cpu":
            return None if _TRITON_INTERPRET else (
                "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
                "before importing ldmfast")
        return f"Triton does not run on {kind} tensors"
    raise ValueError(f"unknown backend {backend!r}")


def resolve(op: str, t: torch.Tensor) -> str:
    """The backend that runs `op` on tensor `t` now."""
    spec = OPS[op]
    forced, source = _forced()
    if forced != "auto":
        _check_choice(forced, source)
        if forced not in spec.backends:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} (set by {source}) is not implemented for this op; "
                f"it has {', '.join(spec.backends)}")
        reason = unavailable_reason(forced, t.device)
        if reason is None and forced != "reference" and t.dtype not in spec.kernel_dtypes:
            reason = f"it supports {', '.join(str(d) for d in spec.kernel_dtypes)}, got {t.dtype}"
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} (set by {source}) is unavailable: {reason}")
        return forced
    if t.dtype in spec.kernel_dtypes:
        for backend in spec.auto_order.get(t.device.type, ()):
            if unavailable_reason(backend, t.device) is None:
                return backend
    return "reference"


def availability(device: torch.device) -> dict[str, dict[str, str]]:
    """For `ldmfast info`: per op, per backend, "yes" or the reason it is unavailable on device."""
    return {name: {b: (unavailable_reason(b, device) or "yes") if b in spec.backends else "not implemented"
                   for b in BACKENDS}
            for name, spec in OPS.items()}
