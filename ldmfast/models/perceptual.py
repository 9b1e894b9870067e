"""LPIPS-style perceptual distance on VGG16 features, from a weights file the user supplies.

Nothing is downloaded. The file (safetensors, or a torch state dict that loads with
weights_only=True) must hold torchvision's VGG16 convolution weights under their torchvision
names (`features.0.weight`, ..., `features.28.bias`); LPIPS's learned channel weights
(`lin0.model.1.weight` ... `lin4.model.1.weight`) are used when present, equal weights otherwise.
Each MRI channel is compared as a grey image replicated to RGB, and the distances are averaged.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# VGG16's convolution widths, "M" = 2x2 max pool; LPIPS reads the ReLU output before each pool
# and at the end (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (64, 128, 256, 512, 512)
# ImageNet normalization as LPIPS applies it, for inputs in [-1, 1].
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


class PerceptualLoss(nn.Module):
    """Mean LPIPS-style distance between two batches of images in [-1, 1]; frozen, eval mode."""

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights: {path} not found (nothing is downloaded; supply VGG16 "
                                    "weights under torchvision's names)")
        layers: list[nn.Module] = []
        width = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, v, 3, padding=1), nn.ReLU()]
                width = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in _TAPS])
        state = _load_state(path)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(set(self.features.state_dict()) - set(features))
        if missing:
            raise ValueError(f"perceptual weights: {path} lacks VGG16 tensors, e.g. features.{missing[0]}")
        self.features.load_state_dict(features, strict=False)
        for i, lin in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key in state:
                lin.data.copy_(state[key].flatten())
        self.register_buffer("shift", _SHIFT.clone(), persistent=False)
        self.register_buffer("scale", _SCALE.clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always frozen

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, h = [], (x - self.shift) / self.scale
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                taps.append(h)
            h = layer(h)
        return taps + [h]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        # Every channel as its own grey image: (N*C, 3, H, W).
        x3 = x.reshape(n * c, 1, *x.shape[2:]).expand(-1, 3, -1, -1)
        y3 = y.reshape(n * c, 1, *y.shape[2:]).expand(-1, 3, -1, -1)
        total = x.new_zeros(())
        for fx, fy, lin in zip(self._taps(x3), self._taps(y3), self.lins):
            fx, fy = F.normalize(fx, dim=1, eps=1e-10), F.normalize(fy, dim=1, eps=1e-10)
            total = total + ((fx - fy).square() * lin.view(1, -1, 1, 1)).sum(1).mean()
        return total
