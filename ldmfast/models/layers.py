"""Building blocks shared by the VQGAN and the cLDM UNet: normalization with activation, residual
blocks (with an optional time embedding), resampling and self-attention over feature maps.

Every block works on contiguous or channels-last maps and keeps the input's memory format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmfast.nn import GroupNormAct
from ldmfast.ops import MAX_HEAD_DIM, feature_map_attention


def norm_act(channels: int, activation: str | None = "silu", groups: int = 32, eps: float = 1e-6) -> nn.Module:
    """The one place models get their GroupNorm (+ optional SiLU) from: the fused GroupNormAct,
    whose state_dict is nn.GroupNorm's."""
    if channels % groups:
        raise ValueError(f"norm groups: {groups} groups do not divide {channels} channels")
    if activation not in (None, "silu"):
        raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
    return GroupNormAct(groups, channels, eps=eps, activation=activation)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv3x3 twice with a residual connection (1x1 conv where the width changes).
    With `temb_channels`, a time embedding (N, temb_channels) is projected and added between the
    two convolutions, as in diffusion UNets."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = None,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = norm_act(in_channels, groups=groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = norm_act(out_channels, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("temb: this block was built with temb_channels and needs a time embedding")
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution; the right/bottom zero pad makes odd sizes
    round up the same way as the reference release's encoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual
    connection. q, k and v are channel slices of one 1x1 convolution's output and go to
    `ldmfast.ops.feature_map_attention` as strided views: no transposes, no copies."""

    def __init__(self, channels: int, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention heads: {num_heads} heads do not divide {channels} channels")
        if channels // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"attention heads: head dim {channels // num_heads} (= {channels} channels / "
                             f"{num_heads} heads) exceeds the supported {MAX_HEAD_DIM}")
        self.num_heads = num_heads
        self.norm = norm_act(channels, activation=None, groups=groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
        return x + self.proj_out(feature_map_attention(q, k, v, self.num_heads))
