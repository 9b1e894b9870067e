"""The configuration of `ldmfast train vqgan`: TOML tables [data], [model], [loss], [optim],
[train] and top-level `output_dir`, `seed`, `device`. Checked as a whole before training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ldmfast.models import VQGANConfig

from .config import ConfigError, check_device, check_finite_at_least, check_model_section
from .data import DataSection
from .lr_schedule import LR_SCHEDULES

AMP_CHOICES = ("auto", "bf16", "off")
SWITCH_CHOICES = ("auto", "on", "off")


@dataclass
class LossSection:
    """L1 reconstruction + codebook_weight x quantizer loss + adaptive GAN term after
    `disc_start` steps (+ perceptual_weight x LPIPS-style distance, only with a weights file)."""

    codebook_weight: float = 1.0
    disc_start: int = 30000
    disc_weight: float = 0.2
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None

    def check(self, prefix: str) -> None:
        for key in ("codebook_weight", "disc_weight", "perceptual_weight"):
            check_finite_at_least(f"{prefix}.{key}", getattr(self, key), 0.0)
        if self.disc_start < 0:
            raise ConfigError(f"{prefix}.disc_start", f"must be >= 0, got {self.disc_start}")
        for key in ("disc_channels", "disc_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.perceptual_weight > 0:
            if not self.perceptual_weights:
                raise ConfigError(f"{prefix}.perceptual_weights", "perceptual_weight > 0 needs a VGG16 weights file "
                                                                  "(nothing is downloaded)")
            if not Path(self.perceptual_weights).is_file():
                raise ConfigError(f"{prefix}.perceptual_weights", f"{self.perceptual_weights} not found")


@dataclass
class OptimSection:
    """Adam for the autoencoder and the discriminator; `lr` defaults to base_lr x effective
    batch (batch_size x grad_accum x processes), as in the paper."""

    lr: float | None = None
    base_lr: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)
    schedule: str = "constant"   # or "cosine": decays to min_lr_ratio x lr at train.steps
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def check(self, prefix: str) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"{prefix}.schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio", f"must be within [0, 1], got {self.min_lr_ratio}")
        if self.lr is not None:
            check_finite_at_least(f"{prefix}.lr", self.lr, 0.0, strict=True)
        check_finite_at_least(f"{prefix}.base_lr", self.base_lr, 0.0, strict=True)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas", f"must be within [0, 1), got {list(self.betas)}")


@dataclass
class TrainSection:
    """Steps count optimizer updates; every `*_every` is in steps (0 = never, except at the end)."""

    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100000
    log_every: int = 50
    val_every: int = 2000
    ckpt_every: int = 2000
    keep_checkpoints: int = 2
    preview_slices: int = 4
    amp: str = "auto"
    channels_last: str = "auto"

    def check(self, prefix: str) -> None:
        for key in ("batch_size", "grad_accum", "steps", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("log_every", "val_every", "ckpt_every", "preview_slices"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"{prefix}.amp", f"must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.channels_last not in SWITCH_CHOICES:
            raise ConfigError(f"{prefix}.channels_last", f"must be one of {', '.join(SWITCH_CHOICES)}, "
                                                         f"got {self.channels_last!r}")


@dataclass
class VQGANTrainConfig:
    output_dir: str
    data: DataSection
    seed: int = 0
    device: str = "auto"
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def check(self, prefix: str = "") -> None:
        check_model_section("model", self.model.validate)
        check_device(self.device)
        m = self.model
        if m.in_channels != 2 or m.out_channels != 2:
            key = "model.in_channels" if m.in_channels != 2 else "model.out_channels"
            raise ConfigError(key, "the VQGAN encodes the 2-channel DWI/ADC target: in and out channels must be 2")
        f = m.downsampling
        h, w = self.data.size
        if h % f or w % f:
            raise ConfigError("data.size", f"{h} x {w} slices give no whole latent: the model downsamples by {f} "
                                           f"(2^(len(model.channel_mult) - 1)); use multiples of {f}")
