"""ldmfast's ops: each with reference, cpu, triton and cuda backends behind one dispatcher."""
from ._backends import (BACKENDS, BackendUnavailableError, availability, get_backend, resolve,
                        unavailable_reason, use_backend)
from ._native import poison_outputs
from .attention import MAX_HEAD_DIM, attention, attention_reference, feature_map_attention
from .ddim import PARAMETERIZATIONS, ddim_step, ddim_step_capturable, ddim_step_reference
from .group_norm import group_norm, group_norm_reference

__all__ = [
    "BACKENDS", "BackendUnavailableError", "MAX_HEAD_DIM", "PARAMETERIZATIONS", "attention",
    "attention_reference", "availability", "ddim_step", "ddim_step_capturable", "ddim_step_reference",
    "feature_map_attention", "get_backend", "group_norm", "group_norm_reference", "poison_outputs", "resolve",
    "unavailable_reason", "use_backend",
]
