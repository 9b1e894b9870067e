"""The VQGAN autoencoder of stage 1: convolutional encoder, vector quantizer, decoder."""
from __future__ import annotations

import math

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldmfast._values import is_integer

from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, norm_act
from .model_folder import read_model_config, read_model_weights, write_model_folder
from .quantizer import QuantizerOutput, VectorQuantizer


class ModelConfigError(ValueError):
    """A model configuration that cannot be built; `key` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def check_positive_ints(config, keys) -> None:
    """Raise ModelConfigError naming the first of `keys` whose value in `config` is not an int >= 1
    (bools refused: True is an int to Python)."""
    for key in keys:
        value = getattr(config, key)
        if not is_integer(value) or value < 1:
            raise ModelConfigError(key, f"must be a positive integer, got {value!r}")


class ConfigDict:
    """to_dict, and a from_dict that refuses an unknown key by name (ModelConfigError) and
    validates, for the model configuration dataclasses; `kind` names the model in the message."""

    kind = "model"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(unknown[0], f"unknown {cls.kind} setting; known: {', '.join(sorted(names))}")
        return cls(**data).validate()


@dataclass
class VQGANConfig(ConfigDict):
    """Hyper-parameters of the VQGAN; the defaults are the release configuration of PAPER.md.

    attn_resolutions: downsampling factors (1, 2, 4, ...) of the encoder/decoder levels that get
        self-attention after every residual block; the release has none (attention only in the
        middle blocks, see `mid_attention`). Factors rather than pixel sizes, so that one
        configuration serves any slice size, square or not.
    """

    kind = "VQGAN"  # (a class attribute: no annotation, so not a field)
    in_channels: int = 2
    out_channels: int = 2
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    mid_attention: bool = True
    attn_heads: int = 1
    dropout: float = 0.0
    norm_groups: int = 32
    latent_channels: int = 3
    num_codes: int = 8192
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.0

    @classmethod
    def release(cls) -> "VQGANConfig":
        """PAPER.md's stage 1: downsampling 4, base width 128, 8192 codes of dimension 3."""
        return cls()

    @classmethod
    def demo(cls) -> "VQGANConfig":
        """Small enough to train on 64 x 64 phantom slices on a laptop CPU in minutes."""
        return cls(base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attn_heads=1,
                   num_codes=512, dead_code_threshold=1.0)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(channels, H, W) of the latent of an H x W slice."""
        return (self.latent_channels, size[0] // self.downsampling, size[1] // self.downsampling)

    def validate(self) -> "VQGANConfig":
        """Raise ModelConfigError naming the first field that cannot build a model."""
        check_positive_ints(self, ("in_channels", "out_channels", "base_channels", "num_res_blocks", "attn_heads",
                                   "norm_groups", "latent_channels", "num_codes"))
        if not self.channel_mult or any(not is_integer(m) or m < 1
                                        for m in self.channel_mult):
            raise ModelConfigError("channel_mult", f"must be a non-empty list of positive integers, got "
                                                   f"{self.channel_mult!r}")
        widths = {self.base_channels * m for m in self.channel_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ModelConfigError("norm_groups", f"{self.norm_groups} groups do not divide the block widths {bad} "
                                                  "(base_channels x channel_mult)")
        factors = [2 ** i for i in range(len(self.channel_mult))]
        for r in self.attn_resolutions:
            if r not in factors:
                raise ModelConfigError("attn_resolutions", f"{r} is not a level's downsampling factor; the levels "
                                                           f"have {factors}")
        attn_widths = {self.base_channels * self.channel_mult[factors.index(r)] for r in self.attn_resolutions}
        if self.mid_attention:
            attn_widths.add(self.base_channels * self.channel_mult[-1])
        from ldmfast.ops import MAX_HEAD_DIM
        for width in sorted(attn_widths):
            if width % self.attn_heads or width // self.attn_heads > MAX_HEAD_DIM:
                raise ModelConfigError("attn_heads", f"{self.attn_heads} heads over {width} channels: heads must "
                                                     f"divide the width, with head dim <= {MAX_HEAD_DIM}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError("dropout", f"must be within [0, 1), got {self.dropout}")
        for key in ("beta", "dead_code_threshold"):  # (written so that NaN and inf fail too)
            if not 0.0 <= getattr(self, key) < math.inf:
                raise ModelConfigError(key, f"must be a finite number >= 0, got {getattr(self, key)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ModelConfigError("ema_decay", f"must be within (0, 1), got {self.ema_decay}")
        return self


class Encoder(nn.Module):
    """Image (N, in_channels, H, W) to latent (N, latent_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = c.base_channels
        for level, mult in enumerate(c.channel_mult):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.blocks.append(ResnetBlock(width, c.base_channels * mult, dropout=c.dropout, groups=g))
                width = c.base_channels * mult
                if 2 ** level in c.attn_resolutions:
                    stage.attn.append(AttnBlock(width, c.attn_heads, groups=g))
            stage.downsample = Downsample(width) if level < len(c.channel_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = _MiddleBlock(width, c)
        self.norm_out = norm_act(width, groups=g)
        self.conv_out = nn.Conv2d(width, c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.blocks):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            h = stage.downsample(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """Latent (N, latent_channels, h, w) to image (N, out_channels, h*f, w*f)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        g = c.norm_groups
        width = c.base_channels * c.channel_mult[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, width, 3, padding=1)
        self.mid = _MiddleBlock(width, c)
        # Built from the deepest level up; stored in that order.
        self.up = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.blocks.append(ResnetBlock(width, c.base_channels * c.channel_mult[level],
                                                dropout=c.dropout, groups=g))
                width = c.base_channels * c.channel_mult[level]
                if 2 ** level in c.attn_resolutions:
                    stage.attn.append(AttnBlock(width, c.attn_heads, groups=g))
            stage.upsample = Upsample(width) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = norm_act(width, groups=g)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for i, block in enumerate(stage.blocks):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            h = stage.upsample(h)
        return self.conv_out(self.norm_out(h))


class _MiddleBlock(nn.Module):
    """Residual block, self-attention (if configured), residual block, at the deepest level."""

    def __init__(self, width: int, c: VQGANConfig):
        super().__init__()
        self.block1 = ResnetBlock(width, dropout=c.dropout, groups=c.norm_groups)
        self.attn = AttnBlock(width, c.attn_heads, groups=c.norm_groups) if c.mid_attention else nn.Identity()
        self.block2 = ResnetBlock(width, dropout=c.dropout, groups=c.norm_groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(h)))


class VQGAN(nn.Module):
    """Encoder, 1x1 projections around the vector quantizer, decoder.

    `forward(x)` returns (reconstruction, QuantizerOutput) and is what training (and DDP) calls;
    `encode`, `quantize` and `decode` expose the stages for the latent diffusion model.
    """

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = (config or VQGANConfig()).validate()
        c = self.config
        self.encoder = Encoder(c)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        self.quantizer = VectorQuantizer(c.num_codes, c.latent_channels, beta=c.beta, ema=c.ema,
                                         ema_decay=c.ema_decay, dead_code_threshold=c.dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        self.decoder = Decoder(c)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent (before quantization) of images x (N, in_channels, H, W), H and W
        divisible by the downsampling factor."""
        f = self.config.downsampling
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected (N, {self.config.in_channels}, H, W) with H and W divisible by {f}, "
                             f"got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Nearest codes of a latent, with a straight-through gradient (`.z_q`) and the losses."""
        return self.quantizer(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Images of quantized latents."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images of code numbers (N, h, w)."""
        z_q = self.quantizer.codebook[indices].permute(0, 3, 1, 2)
        return self.decode(z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q), q

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output convolution: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `path/config.json` and `path/model.safetensors`, each atomically."""
        return write_model_folder(path, self.state_dict(), self.config.to_dict(), "VQGAN")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "VQGAN":
        """A VQGAN from a folder written by `save_pretrained` (or a training run's export), in eval mode."""
        model = cls(VQGANConfig.from_dict(read_model_config(path, "VQGAN")))
        model.load_state_dict(read_model_weights(path, device))
        # In eval mode, as loaded models are (Hugging Face's too): in training mode a VQGAN's
        # dead-code restarts rewrite its codebook during inference. `.train()` to train it.
        return model.to(device).eval()
