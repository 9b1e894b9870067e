"""accelerate(model) and restore(model): the walk that applies the rules."""
from __future__ import annotations

import weakref

from torch import nn

from . import diffusers, generic, graphs, memory_format, monai, openaimodel
from .fused import AcceleratedGroupNorm
from .patcher import has_fused_forward
from .report import AccelerationReport

# The report of each accelerated model, for restore(model). Weak keys: a report never keeps a
# model alive, and nothing is stored on the model (its state_dict, pickling and deepcopy stay as
# they were; a deepcopy of an accelerated model runs accelerated but has no report to restore).
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, AccelerationReport]" = weakref.WeakKeyDictionary()


def _rules():
    return monai.rules() + diffusers.rules() + openaimodel.rules()


def accelerate(model: nn.Module, *, group_norm: bool = True, attention: bool = True,
               channels_last: bool = False, cuda_graphs: bool = False) -> AccelerationReport:
    """Make `model` run ldmfast's fused ops, in place and reversibly.

    - every nn.GroupNorm becomes the fused GroupNorm, sharing its parameters (state_dict keys and
      tensors unchanged); where a known block applies SiLU right after it (MONAI's and diffusers'
      residual blocks, an nn.Sequential of GroupNorm then SiLU, diffusers' output norm) the two run
      as one op;
    - attention blocks of MONAI (SABlock, CrossAttentionBlock), diffusers (`Attention` with its
      default processor) and openaimodel-style UNets (QKVAttention, QKVAttentionLegacy) run
      ldmfast's fused attention, with the block's exact scale, heads, residual and rescaling;
      MONAI's UNet blocks around its attention keep the activations' memory format (listed as
      "layout"), where MONAI's own forwards copied them to contiguous after each attention.

    - channels_last=True also stores the weights of 2-D convolutions channels-last, so that the
      convolutions run in NHWC (faster in 16-bit on NVIDIA GPUs) and the activations stay
      channels-last through the fused ops; inputs may stay contiguous.
    - cuda_graphs=True replays the model's inference forward (grad mode off, CUDA inputs) from
      CUDA graphs captured per input signature, so that a sampling loop no longer waits on the
      host's kernel launches (ldmfast.acceleration.graphs says when it runs eagerly instead).

    group_norm / attention: False leaves that kind alone. Returns an AccelerationReport listing what
    was replaced and what was left alone and why; `report.undo()` or `ldmfast.restore(model)`
    reverts it. Parameters are shared throughout, so an optimizer built before or after works.
    """
    if not isinstance(model, nn.Module):
        hint = " (for a DDIM scheduler use ldmfast.schedulers.accelerate)" if hasattr(model, "step") else ""
        raise ValueError(f"model: must be a torch.nn.Module, got {type(model).__name__}{hint}")
    for name, flag in (("group_norm", group_norm), ("attention", attention), ("channels_last", channels_last),
                       ("cuda_graphs", cuda_graphs)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: must be True or False, got {flag!r}")
    previous = _REPORTS.get(model)
    if previous is not None and previous.active:
        raise ValueError(f"model: this {type(model).__name__} is already accelerated; "
                         "call ldmfast.restore(model) first")
    report = AccelerationReport(type(model).__name__)
    modules = list(model.named_modules())  # before any edit: swapped-in modules are not revisited
    rules = _rules()
    for path, module in modules:
        if has_fused_forward(module) or isinstance(module, AcceleratedGroupNorm):
            report.leave(path, module, "already accelerated (by an earlier accelerate of a part of the model)")
            continue
        rule = next((r for r in rules if r.matches(module)), None)
        if rule is None:
            continue
        if not (attention if rule.kind == "attention" else group_norm):
            report.leave(path, module, f"{'attention' if rule.kind == 'attention' else 'group_norm'}=False")
            continue
        reason = rule.why_not(module)
        if reason is not None:
            report.leave(path, module, reason)
        else:
            rule.apply(path, module, report)
    if group_norm:
        # Swaps first: the Sequential rule then sees the replaced norms (a GroupNorm subclass with a
        # forward of its own is fused only once the swap has checked it computes GroupNorm).
        generic.swap_group_norms(model, report)
        generic.fuse_sequentials(modules, report)
    if channels_last:
        memory_format.convs_to_channels_last(model, report)
    generic.list_left_alone(model, report, attention)
    if cuda_graphs:
        graphs.graph_forward(model, report)
    _REPORTS[model] = report
    return report


def restore(model: nn.Module) -> AccelerationReport:
    """Undo `accelerate(model)`; returns its (now inactive) report."""
    report = _REPORTS.get(model) if isinstance(model, nn.Module) else None
    if report is None or not report.active:
        raise ValueError(f"model: this {type(model).__name__} is not accelerated by ldmfast.accelerate "
                         "(or was restored already; a deepcopy has no report of its own)")
    report.undo()
    return report
