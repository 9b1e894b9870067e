"""The cLDM denoiser: a UNet over latents with a sinusoidal time embedding, residual blocks
(GroupNorm+SiLU, fused) and multi-head self-attention at chosen levels and in the middle block,
configured by default as PAPER.md's release (base width 224, multipliers [1, 4, 8], 2 residual
blocks a level, attention with 32 channels per head at the two lower levels and the middle,
input 3 latent + 15 condition channels, output 3)."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmfast._values import is_integer

from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, norm_act
from .vqgan import ModelConfigError, check_positive_ints


@dataclasses.dataclass
class UNetConfig:
    in_channels: int = 18
    out_channels: int = 3
    base_channels: int = 224
    channel_mult: tuple[int, ...] = (1, 4, 8)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # 0 is the input resolution
    head_channels: int = 32
    norm_groups: int = 32
    dropout: float = 0.0

    @classmethod
    def demo(cls) -> "UNetConfig":
        """A small UNet that trains on the CPU in minutes."""
        return cls(base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, head_channels=32, norm_groups=8)

    def validate(self) -> None:
        # Positive first: the divisibility checks below divide by norm_groups and head_channels.
        check_positive_ints(self, ("in_channels", "out_channels", "base_channels", "num_res_blocks", "head_channels",
                                   "norm_groups"))
        for key in ("channel_mult", "attention_levels"):
            values = getattr(self, key)
            if not isinstance(values, (tuple, list)) or not all(is_integer(v) for v in values):
                raise ModelConfigError(key, f"must be a list of integers, got {values!r}")
        from ldmfast.ops import MAX_HEAD_DIM
        if self.head_channels > MAX_HEAD_DIM:
            raise ModelConfigError("head_channels", f"must be <= {MAX_HEAD_DIM} (the attention's head dim), got "
                                                    f"{self.head_channels}")
        if not 0.0 <= self.dropout < 1.0:  # (false for NaN too)
            raise ModelConfigError("dropout", f"must be within [0, 1), got {self.dropout}")
        if self.base_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ModelConfigError("base_channels", f"base_channels and channel_mult must be positive, got "
                                   f"{self.base_channels} and {list(self.channel_mult)}")
        for level, mult in enumerate(self.channel_mult):
            width = self.base_channels * mult
            if width % self.norm_groups:
                raise ModelConfigError("norm_groups",
                                       f"{self.norm_groups} groups do not divide {width} channels (level {level})")
            if level in self.attention_levels and width % self.head_channels:
                raise ModelConfigError("head_channels",
                                       f"{self.head_channels} does not divide {width} channels (level {level})")
        middle = self.base_channels * self.channel_mult[-1]  # the middle block always attends
        if middle % self.head_channels:
            raise ModelConfigError("head_channels", f"{self.head_channels} does not divide the middle block's "
                                                    f"{middle} channels")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ModelConfigError("attention_levels",
                                   f"{bad} are not levels of channel_mult {list(self.channel_mult)}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) sinusoidal features (cos, sin), as in DDPM/LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class UNet(nn.Module):
    """gradient_checkpointing: when True, training-mode forwards that record gradients recompute
    each block (a residual block with its attention, a downsampling, the middle) in the backward
    instead of keeping its activations (torch.utils.checkpoint, use_reentrant=False: the same
    gradients for less memory and about one more forward of time)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        config.validate()
        self.gradient_checkpointing = False
        base, groups = config.base_channels, config.norm_groups
        temb = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def attn(width: int) -> AttnBlock:
            return AttnBlock(width, num_heads=width // config.head_channels, groups=groups)

        def res(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, temb_channels=temb, dropout=config.dropout, groups=groups)

        self.down = nn.ModuleList()
        skips, width = [base], base
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                blocks = [res(width, base * mult)]
                width = base * mult
                if level in config.attention_levels:
                    blocks.append(attn(width))
                self.down.append(nn.ModuleList(blocks))
                skips.append(width)
            if level + 1 < len(config.channel_mult):
                self.down.append(nn.ModuleList([Downsample(width)]))
                skips.append(width)
        self.middle = nn.ModuleList([res(width, width), attn(width), res(width, width)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                blocks = [res(width + skips.pop(), base * mult)]
                width = base * mult
                if level in config.attention_levels:
                    blocks.append(attn(width))
                if level > 0 and i == config.num_res_blocks:
                    blocks.append(Upsample(width))
                self.up.append(nn.ModuleList(blocks))
        self.norm_out = norm_act(width, groups=groups)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResnetBlock) else block(h)
        return h

    @classmethod
    def _run_up(cls, blocks: nn.ModuleList, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The concatenation is inside, so a checkpointed up block keeps h and skip, not their concat.
        return cls._run(blocks, torch.cat([h, skip], dim=1), emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) with H, W divisible by 2^(levels-1); t: (N,) timesteps."""
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            def call(fn, *args):
                return checkpoint(fn, *args, use_reentrant=False)
        else:
            def call(fn, *args):
                return fn(*args)
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = call(self._run, blocks, h, emb)
            skips.append(h)
        h = call(self._run, self.middle, h, emb)
        for blocks in self.up:
            h = call(self._run_up, blocks, h, skips.pop(), emb)
        return self.conv_out(self.norm_out(h))
