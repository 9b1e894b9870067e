"""GroupNormAct: a drop-in for torch.nn.GroupNorm (optionally followed by SiLU) on ldmfast's fused op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from .._values import is_integer, is_number
from ..ops.group_norm import ACTIVATIONS


class GroupNormAct(nn.Module):
    """nn.GroupNorm(num_groups, num_channels, eps, affine), then `activation` (None or "silu"), fused.

    The parameters are named and shaped as nn.GroupNorm's (weight, bias of shape (C,)), so state
    dicts load from and into nn.GroupNorm. The output keeps the input's memory format.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = "silu", device=None, dtype=None):
        super().__init__()
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not is_number(eps) or not 0 < eps < float("inf"):
            raise ValueError(f"eps: must be a positive number, got {eps!r}")  # (the op refuses it at each call)
        if num_channels % num_groups:
            raise ValueError(f"num_groups: num_channels={num_channels} must be divisible by num_groups={num_groups}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: must be None or 'silu', got {activation!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, module: nn.GroupNorm, activation: Optional[str] = "silu") -> "GroupNormAct":
        """The fused module computing activation(module(x)), sharing module's parameters."""
        if not isinstance(module, nn.GroupNorm):
            raise ValueError(f"module: must be an nn.GroupNorm, got {type(module).__name__}")
        new = cls(module.num_groups, module.num_channels, module.eps, module.affine, activation, device="meta")
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        return new

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}")
