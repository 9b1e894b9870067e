"""accelerate(..., channels_last=True): 2-D convolution weights in channels-last storage.

A convolution whose weight is channels-last runs in NHWC (cuDNN's native layout for the tensor
cores in 16-bit) and returns channels-last activations, which then flow through the network:
the fused GroupNorm and attention take and keep that format, where torch's GroupNorm would
make them contiguous again. The parameters stay the same objects (an optimizer built before keeps
working); only their storage order changes, and undo puts it back.
"""
from __future__ import annotations

import torch
from torch import nn

from .report import AccelerationReport, Change

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def convs_to_channels_last(model: nn.Module, report: AccelerationReport) -> None:
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, _CONVS) or not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            continue
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            continue  # already channels-last: nothing to undo either
        with torch.no_grad():
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)

        def undo(weight=weight):
            with torch.no_grad():
                weight.data = weight.data.contiguous()

        report.record(Change(path, "channels_last", f"{type(module).__name__}: weight to channels-last"), undo)
