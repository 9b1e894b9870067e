"""The fused pieces accelerated modules call: a GroupNorm that takes nn.GroupNorm's place, and
"this norm, then SiLU" as one op wherever the norm is one ldmfast can run."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import GroupNormAct
from ..ops.group_norm import ACTIVATIONS


class AcceleratedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (then `activation`, None or "silu") on the fused op, in an nn.GroupNorm's place
    and sharing its parameters. Still an nn.GroupNorm, with its attributes and state_dict, so code
    that checks the type of its norms (diffusers' Attention with cross_attention_norm="group_norm")
    keeps working. Input the fused op does not take ((N, C) with no spatial dims) goes to torch."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str | None = None, device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: must be None or 'silu', got {activation!r}")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 3 <= x.dim() <= 5:
            return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.activation == "silu" else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def has_any_hooks(module: nn.Module) -> bool:
    """Hooks around the module's call, which a fused op in its place would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


# The state_dict hooks of nn.Module (names as of torch 2.x; getattr: absent ones count as none).
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def has_state_dict_hooks(module: nn.Module) -> bool:
    """Hooks that rename or convert the module's checkpoint entries: a replacement module would
    drop them, and the model's checkpoints would change keys."""
    return any(getattr(module, name, None) for name in _STATE_DICT_HOOKS)


def _why_not_plain_group_norm(module: nn.Module) -> str | None:
    """The reasons to leave a GroupNorm alone that cost nothing to check (those the fused forwards
    check again on every call); a subclass's own forward is for why_not_group_norm."""
    if not isinstance(module, nn.GroupNorm):
        return f"not an nn.GroupNorm ({type(module).__name__})"
    if isinstance(module, AcceleratedGroupNorm):
        return "already ldmfast's fused GroupNorm"
    if has_any_hooks(module):
        return "has forward/backward hooks, which a replacement would drop"
    if has_state_dict_hooks(module):
        return "has state_dict or load_state_dict hooks, which a replacement would drop"
    if "forward" in module.__dict__:
        return "its forward is already patched by someone else (e.g. an offloading hook)"
    if not module.eps > 0:
        return f"eps={module.eps} (the fused op needs eps > 0)"
    if getattr(module, "parametrizations", None):
        return "has parametrizations"
    return None


def why_not_group_norm(module: nn.Module) -> str | None:
    """None when `module` is an nn.GroupNorm the fused op computes exactly, else the reason. A
    subclass with a forward of its own qualifies only where that forward computes GroupNorm, on a
    probe input (the reference release's GroupNorm32 does; GLIDE's, which applies SiLU itself,
    does not)."""
    reason = _why_not_plain_group_norm(module)
    if reason is None and type(module).forward is not nn.GroupNorm.forward:
        reason = _why_not_own_forward(module)
        if reason is not None:
            reason = f"{type(module).__name__} overrides GroupNorm.forward{reason}"
    return reason


def _why_not_own_forward(module: nn.GroupNorm) -> str | None:
    """None where the module's own forward computes F.group_norm to float32 rounding, checked on a
    shallow copy of it (its own attributes, such as GLIDE's `swish`) with random float32 CPU
    weights: the module's tensors may be on a GPU or the meta device, and unit weights would hide a
    forward that ignores them. GroupNorm computed in float32 and cast back, as the reference
    release's GroupNorm32, passes: the fused op keeps its statistics in float32 anyway."""
    if set(module._parameters) != {"weight", "bias"} or module._buffers or module._modules:
        return ", and holds parameters, buffers or modules of its own"
    gen = torch.Generator().manual_seed(0)
    c = module.num_channels

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cpu", dtype=torch.float32)

    probe = copy.copy(module)  # shallow: replacing its parameter dict leaves the module's alone
    probe._parameters = ({"weight": nn.Parameter(1 + 0.5 * randn(c)), "bias": nn.Parameter(0.5 * randn(c))}
                         if module.affine else {"weight": None, "bias": None})
    x = 0.5 + 2 * randn(2, c, 3, 4)
    with torch.no_grad():
        try:
            got = type(probe).forward(probe, x)  # not probe(x): global hooks need not see the probe
        except Exception as err:  # noqa: BLE001 - any failure means: not a GroupNorm to replace
            return f", which fails on a float32 CPU probe input ({type(err).__name__})"
        want = F.group_norm(x, probe.num_groups, probe.weight, probe.bias, probe.eps)
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape and got.is_floating_point()
            and torch.allclose(got.float(), want, rtol=1e-4, atol=1e-4)):
        return " with something other than GroupNorm (checked on a probe input)"
    return None


def accelerated_group_norm(module: nn.GroupNorm, activation: str | None = None) -> AcceleratedGroupNorm:
    """The fused module computing activation(module(x)), sharing module's parameters."""
    new = AcceleratedGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine, activation,
                               device="meta")
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.train(module.training)
    return new


def fusable_norm_params(norm: nn.Module):
    """(num_groups, weight, bias, eps) of a norm the fused op computes, else None. Checked on every
    call of a fused forward, so only what is cheap: a GroupNorm subclass with a forward of its own
    counts only once `accelerate` has checked and replaced it."""
    if has_any_hooks(norm):
        return None
    if isinstance(norm, (AcceleratedGroupNorm, GroupNormAct)):
        return None if norm.activation else (norm.num_groups, norm.weight, norm.bias, norm.eps)
    if type(norm).forward is nn.GroupNorm.forward and _why_not_plain_group_norm(norm) is None:
        return norm.num_groups, norm.weight, norm.bias, norm.eps
    return None


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)), as one fused op where `norm` is a GroupNorm ldmfast runs; otherwise exactly
    the two calls (so a norm swapped for something else after `accelerate` still works)."""
    params = fusable_norm_params(norm) if 3 <= x.dim() <= 5 else None
    if params is None:
        return F.silu(norm(x))
    groups, weight, bias, eps = params
    return ops.group_norm(x, groups, weight, bias, eps, activation="silu")


def is_plain_silu(act: nn.Module) -> bool:
    return type(act) is nn.SiLU and not has_any_hooks(act)


def norm_act(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(norm(x)), fused where act is a plain nn.SiLU and norm a GroupNorm ldmfast runs."""
    if is_plain_silu(act):
        return norm_silu(norm, x)
    return act(norm(x))


def token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Multi-head attention on token tensors: q (B, Lq, heads*D), k and v (B, Lk, heads*D), heads
    split as consecutive channel blocks; returns (B, Lq, heads*D). Heads are strided views and the
    fused op writes its output in q's (B, L, H, D) order, so no transposing copy is made."""
    def split(t):
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    out = ops.attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).flatten(2)
