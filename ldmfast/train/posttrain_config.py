"""The configuration of `ldmfast train posttrain`: top-level `output_dir`, `init` (a trained cLDM
folder, e.g. runs/ldm_demo/ldm, whose UNet, diffusion settings and autoencoder are taken as they
are), `seed`, `device`, and tables [data], [posttrain] (the loss), [optim], [train]."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, check_device
from .data import DataSection
from .ldm_config import AdamWSection, LDMTrainSection
from .posttrain_loss import PostTrainLossConfig

EARLY_STOP_METRICS = ("latent_loss", "x0_mae", "x0_lesion_mae", "mae", "lesion_mae")


@dataclass
class PostTrainSection(LDMTrainSection):
    """As `train ldm`'s, plus early stopping: after `early_stop_patience` validations without a
    better `early_stop_metric` (lower is better; "x0_mae" and "x0_lesion_mae": the decoded one-step
    prediction's; "mae" and "lesion_mae": DDIM syntheses', which need val_sample_steps > 0),
    training stops; the exported model is then the best one (0 = no early stopping: the latest).
    `unet_checkpoint` checkpoints the UNet's blocks too (memory for compute)."""

    batch_size: int = 6
    early_stop_metric: str = "latent_loss"
    early_stop_patience: int = 0
    unet_checkpoint: bool = False

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.early_stop_metric not in EARLY_STOP_METRICS:
            raise ConfigError(f"{prefix}.early_stop_metric",
                              f"must be one of {', '.join(EARLY_STOP_METRICS)}, got {self.early_stop_metric!r}")
        if self.early_stop_metric in ("mae", "lesion_mae") and self.val_sample_steps == 0:
            raise ConfigError(f"{prefix}.early_stop_metric", f"{self.early_stop_metric} is measured on syntheses: "
                                                             "set train.val_sample_steps > 0")
        if self.early_stop_patience < 0:
            raise ConfigError(f"{prefix}.early_stop_patience", f"must be >= 0, got {self.early_stop_patience}")


@dataclass
class PostTrainConfig:
    output_dir: str
    init: str
    data: DataSection
    seed: int = 0
    device: str = "auto"
    posttrain: PostTrainLossConfig = field(default_factory=PostTrainLossConfig)
    optim: AdamWSection = field(default_factory=AdamWSection)
    train: PostTrainSection = field(default_factory=PostTrainSection)

    def check(self, prefix: str = "") -> None:
        config = Path(self.init) / "config.json"
        if not config.is_file() or json.loads(config.read_text()).get("model") != "ConditionalLDM":
            raise ConfigError("init", f"{self.init} is not a cLDM folder (no ConditionalLDM config.json); train one "
                                      "with `ldmfast train ldm`")
        if not (Path(self.init) / "autoencoder" / "config.json").is_file():
            raise ConfigError("init", f"{self.init} has no autoencoder/ folder: post-training decodes through it")
        check_device(self.device)
