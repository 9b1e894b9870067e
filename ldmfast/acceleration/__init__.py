"""ldmfast as a fast backend for other projects' models: `accelerate(model)` makes MONAI's,
diffusers' and openaimodel-style networks run ldmfast's fused GroupNorm(+SiLU) and attention, in
place and reversibly (`restore(model)` or `report.undo()`). The DDIM step of MONAI's and
diffusers' schedulers is in `ldmfast.schedulers`."""
from .core import accelerate, restore
from .diffusers import LdmfastAttnProcessor
from .fused import AcceleratedGroupNorm
from .report import AccelerationReport, Change, LeftAlone

__all__ = ["AccelerationReport", "AcceleratedGroupNorm", "Change", "LdmfastAttnProcessor", "LeftAlone", "accelerate",
           "restore"]
