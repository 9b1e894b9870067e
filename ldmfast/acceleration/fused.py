"""The fused pieces accelerated modules call: a GroupNorm that takes nn.GroupNorm's place, and
"this norm, then SiLU" as one op wherever the norm is one ldmfast can run."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import GroupNormAct

# nn.GroupNorm subclasses whose forward is GroupNorm computed in float32 and cast back to the
# input's dtype, as the reference release's `GroupNorm32`: the fused op computes its statistics in
# float32 anyway, so it takes their place like a plain nn.GroupNorm.
FLOAT32_GROUP_NORMS = ("GroupNorm32",)


class AcceleratedGroupNorm(GroupNormAct):
    """GroupNormAct in nn.GroupNorm's place, sharing its parameters. Input the fused op does not
    take ((N, C) with no spatial dims) goes to torch, so every input nn.GroupNorm accepts works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 3 <= x.dim() <= 5:
            return super().forward(x)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.activation == "silu" else y


def why_not_group_norm(module: nn.Module) -> str | None:
    """None when `module` is an nn.GroupNorm the fused op computes exactly, else the reason."""
    if not isinstance(module, nn.GroupNorm):
        return f"not an nn.GroupNorm ({type(module).__name__})"
    cls = type(module)
    if cls.forward is not nn.GroupNorm.forward and cls.__name__ not in FLOAT32_GROUP_NORMS:
        return f"{cls.__name__} overrides GroupNorm.forward"
    if has_any_hooks(module):
        return "has forward/backward hooks, which a replacement would drop"
    if not module.eps > 0:
        return f"eps={module.eps} (the fused op needs eps > 0)"
    if getattr(module, "parametrizations", None):
        return "has parametrizations"
    return None


def has_any_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def accelerated_group_norm(module: nn.GroupNorm, activation: str | None = None) -> AcceleratedGroupNorm:
    """The fused module computing activation(module(x)), sharing module's parameters."""
    new = AcceleratedGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine, activation,
                               device="meta")
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.train(module.training)
    return new


def fusable_norm_params(norm: nn.Module):
    """(num_groups, weight, bias, eps) of a norm the fused op computes, else None."""
    if has_any_hooks(norm):
        return None
    if isinstance(norm, GroupNormAct):
        return None if norm.activation else (norm.num_groups, norm.weight, norm.bias, norm.eps)
    if why_not_group_norm(norm) is None:
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
