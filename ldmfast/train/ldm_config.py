"""The configuration of `ldmfast train ldm`: top-level `output_dir`, `autoencoder` (a trained
autoencoder folder, e.g. runs/vqgan_demo/vqgan), `seed`, `device`, and tables [data], [unet],
[diffusion], [optim], [train]. Checked as a whole before training."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ldmfast.models import DiffusionConfig, UNetConfig

from .config import ConfigError, check_device, check_finite_at_least, check_model_section
from .data import DataSection
from .vqgan_config import OptimSection, TrainSection


@dataclass
class AdamWSection(OptimSection):
    """AdamW for the UNet and the condition; `lr` defaults to base_lr x effective batch
    (PAPER.md: 2e-6 x 48 in the release). `state_bits` 8 keeps its moments in 8 bits (2 bytes of
    state per parameter instead of 8: ldmfast/train/adamw8bit.py; not PAPER.md's optimizer, which
    is the default 32)."""

    base_lr: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    state_bits: int = 32

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_finite_at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        if self.state_bits not in (8, 32):
            raise ConfigError(f"{prefix}.state_bits", f"must be 8 or 32, got {self.state_bits}")


@dataclass
class LDMTrainSection(TrainSection):
    """As the VQGAN's, plus: `ema_decay` (0 = no EMA; the exported model is the EMA one when on),
    `latent_cache` (encode the targets once; image augmentation is then off, since an augmented
    image has no cached latent), validation by sampling: `val_sample_steps` DDIM steps on up
    to `val_sample_slices` held-out slices (0 = latent loss only), `step_in_backward`: AdamW
    updates each parameter inside the backward and frees its gradient at once (the same update,
    without the whole model's gradients in memory; not with grad_accum > 1 or DDP), and
    `recast_weight_copies`: under autocast, the backward casts each weight to 16 bits again rather
    than keeping the forward's copy (ldmfast.train.recast: the same gradients without a 16-bit copy
    of every weight in memory, for one cast per weight)."""

    batch_size: int = 48
    ema_decay: float = 0.0
    latent_cache: bool = True
    val_sample_steps: int = 0
    val_sample_slices: int = 16
    step_in_backward: bool = False
    recast_weight_copies: bool = False

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.step_in_backward and self.grad_accum > 1:
            raise ConfigError(f"{prefix}.step_in_backward", f"updates need every micro-batch's gradient: not with "
                                                            f"grad_accum = {self.grad_accum} (use 1)")
        if not (self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0):
            raise ConfigError(f"{prefix}.ema_decay", f"must be 0 (off) or within (0, 1), got {self.ema_decay}")
        for key in ("val_sample_steps", "val_sample_slices"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.val_sample_steps > 0 and self.val_sample_slices == 0:
            # No slice to synthesize would log made-up image metrics (that early stopping can use).
            raise ConfigError(f"{prefix}.val_sample_slices", f"must be >= 1 when validation samples "
                                                             f"(val_sample_steps = {self.val_sample_steps})")


@dataclass
class LDMTrainConfig:
    output_dir: str
    autoencoder: str
    data: DataSection
    seed: int = 0
    device: str = "auto"
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: AdamWSection = field(default_factory=AdamWSection)
    train: LDMTrainSection = field(default_factory=LDMTrainSection)

    def check(self, prefix: str = "") -> None:
        if not (Path(self.autoencoder) / "config.json").is_file():
            raise ConfigError("autoencoder", f"{self.autoencoder} is not an autoencoder folder (no config.json); "
                                             "train one with `ldmfast train vqgan`")
        check_device(self.device)
        check_model_section("unet", self.unet.validate)
        check_model_section("diffusion", self.diffusion.validate)
