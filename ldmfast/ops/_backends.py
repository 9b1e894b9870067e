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
_state = {"backend": _env_choice, "source": "LDMFAST_BACKEND" if _env_choice != "auto" else "default"}


class use_backend:
    """Force a backend for every ldmfast op: `use_backend("triton")` sets it until changed, and
    `with use_backend("cpu"): ...` sets it for the block only. "auto" restores automatic choice."""

    def __init__(self, name: str):
        self._previous = dict(_state)
        _state["backend"] = _check_choice(str(name).lower(), "use_backend")
        _state["source"] = "use_backend()"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.update(self._previous)
        return False


def get_backend() -> str:
    """The forced backend, or "auto"."""
    return _state["backend"]


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
    forced = _state["backend"]
    if forced != "auto":
        _check_choice(forced, _state["source"])
        if forced not in spec.backends:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} (set by {_state['source']}) is not implemented for this op; "
                f"it has {', '.join(spec.backends)}")
        reason = unavailable_reason(forced, t.device)
        if reason is None and forced != "reference" and t.dtype not in spec.kernel_dtypes:
            reason = f"it supports {', '.join(str(d) for d in spec.kernel_dtypes)}, got {t.dtype}"
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {forced!r} (set by {_state['source']}) is unavailable: {reason}")
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
