"""Autocast's 16-bit weight copies made again in the backward instead of kept from the forward.

Under autocast a convolution or linear layer computes with a 16-bit copy of its float32 weight
and saves that copy for its backward (the input gradient needs it), so a forward with gradients
holds a 16-bit copy of every weight until the backward reaches its layer: 1.5 GB for the release
UNet (739 M parameters), whatever the batch. UNet checkpointing drops them with the activations,
at the cost of running the UNet's forward twice. This keeps the activations and drops only the
copies: a saved tensor that is a 16-bit cast of a float32 leaf (its autograd node a ToCopy whose
one input is that leaf's gradient accumulator) is saved as a reference to the leaf and cast again
when the backward unpacks it, one cast per weight. Bitwise the same copy: the leaf has not changed
in between (an optimizer stepping inside the backward, train.step_in_backward, updates a weight
only once every layer that used it has run its backward, and the optimizer after the backward
later still).
"""
from __future__ import annotations

import contextlib

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Recast:
    """A saved 16-bit copy of `leaf` (transposed where `transposed`: a linear layer saves its
    weight's transpose), kept as the leaf itself."""

    __slots__ = ("leaf", "dtype", "transposed")

    def __init__(self, leaf: torch.Tensor, dtype: torch.dtype, transposed: bool):
        self.leaf, self.dtype, self.transposed = leaf, dtype, transposed

    def make(self) -> torch.Tensor:
        copy = self.leaf.detach().to(self.dtype)
        return copy.t() if self.transposed else copy


def _only_input(node):
    inputs = node.next_functions
    return inputs[0][0] if len(inputs) == 1 else None


def _as_recast(t: torch.Tensor) -> _Recast | None:
    """`t` as a _Recast where it is a plain 16-bit cast of a float32 leaf (autocast's weight copy),
    or that cast transposed; else None."""
    node = t.grad_fn
    if node is None or t.dtype not in _LOW_PRECISION:
        return None
    transposed = node.name() == "TBackward0"
    if transposed:
        node = _only_input(node)
    if node is None or node.name() != "ToCopyBackward0":
        return None
    leaf = getattr(_only_input(node), "variable", None)  # (only AccumulateGrad nodes have one)
    if leaf is None or leaf.dtype != torch.float32 or (transposed and leaf.dim() != 2):
        return None
    like = leaf.t() if transposed else leaf
    # (the same geometry as the copy it stands for: autocast's casts keep the leaf's strides)
    if like.shape != t.shape or like.stride() != t.stride():
        return None
    return _Recast(leaf, t.dtype, transposed)


def _pack(t: torch.Tensor):
    recast = _as_recast(t)
    return t if recast is None else recast


def _unpack(saved):
    return saved.make() if isinstance(saved, _Recast) else saved


def training_autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to `dtype` for a training step (a null context for None): without autocast's weight
    cache, which would keep a 16-bit copy of every weight that requires gradients until the region
    ends, after the whole forward. With UNet checkpointing that is most of the forward's memory
    (the release UNet's copies are 1.5 GB), and each weight is used once per forward, so there is
    nothing to reuse (the ops that need a copy for their backward save it themselves; a
    checkpointed block casts again when it recomputes)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def recast_weight_copies(enabled: bool = True):
    """A context in which the backward casts autocast's weight copies again rather than keeping
    them from the forward (module docstring); a null context when not `enabled`. Wrap the forward
    (the tensors are saved there); the backward may run outside it. Inside a checkpointed region
    torch.utils.checkpoint's own hooks take over (they keep nothing either)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
