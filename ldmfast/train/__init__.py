"""ldmfast.train: configuration loading, checkpoints, distributed set-up and data shared by the
training commands, the stage 1 (VQGAN) training loop, and the memory savers for one's own loops:
AdamW with 8-bit moments, optimizer steps inside the backward, and autocast's weight copies cast
again in the backward instead of kept (recast_weight_copies)."""
from .adamw8bit import AdamW8bit
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, from_dict, load_config
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .posttrain_loss import PostTrainLoss, PostTrainLossConfig, posttrain_loss
from .recast import recast_weight_copies
from .step_in_backward import StepInBackward
from .vqgan import VQGANTrainer, train_vqgan
from .vqgan_config import VQGANTrainConfig

__all__ = [
    "ConfigError", "DistInfo", "VQGANTrainConfig", "VQGANTrainer", "from_dict", "init_distributed",
    "latest_checkpoint", "load_checkpoint", "load_config", "save_checkpoint", "shutdown_distributed", "train_vqgan",
    "PostTrainLoss", "PostTrainLossConfig", "posttrain_loss", "AdamW8bit", "StepInBackward",
    "recast_weight_copies",
]
