"""torch.nn modules built on ldmfast.ops."""
from .group_norm import GroupNormAct

__all__ = ["GroupNormAct"]
