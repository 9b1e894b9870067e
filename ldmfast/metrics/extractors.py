"""Feature extractors for FID, in plain torch, loading weights from a file the user gives.

- "inception": InceptionV3 as FID defines it (the TensorFlow graph of 2015-12-05 ported to
  PyTorch by pytorch-fid), with the parameter names of its weights file
  `pt_inception-2015-12-05-6726825d.pth`, giving the 2048 pool features. The FID variant
  differs from torchvision's InceptionV3 in its pooling branches: average pools exclude the
  padding, and the last block max-pools.
- "radimagenet": ResNet-50 as RadImageNet's Keras model converted to PyTorch
  (`RadImageNet-ResNet50_notop.pth`, as MONAI uses it): torchvision parameter names, but
  every convolution has a bias, the stride sits on each stage's first 1 x 1 convolution and
  BatchNorm eps is 1.001e-5 (Keras' values). Features: the spatial mean of the last stage.

Nothing is downloaded. Classifier heads (`fc.*`) in a weights file are ignored: FID uses
features only. Input: slices of shape (N, 1 or 3, H, W) with values in [0, 1]; each
extractor converts them itself (channel repeat, resize, normalization).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXTRACTORS = ("inception", "radimagenet")
FEATURE_DIM = 2048
# Entries of a weights file that are not features' parameters.
_IGNORED_PREFIXES = ("fc.",)
_IGNORED_SUFFIXES = ("num_batches_tracked",)


# --- InceptionV3, FID variant ----------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TensorFlow's average pool divides by the number of pixels inside the image.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools its pool branch
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to the 2048-d average pool, as FID computes it."""

    input_size = (299, 299)

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] slices -> 3 channels, 299 x 299 (bilinear), scaled to [-1, 1]."""
        x = _three_channels(x)
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, 2048) of already prepared input (N, 3, 299, 299)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


# --- ResNet-50, RadImageNet's converted Keras layout -------------------------------------------


def _keras_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1.001e-5)


class Bottleneck(nn.Module):
    """1x1 (carrying the stride, as Keras' ResNet50), 3x3, 1x1 x4, all with bias; residual."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, stride=stride)
        self.bn1 = _keras_bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = _keras_bn(width)
        self.conv3 = nn.Conv2d(width, cout, 1)
        self.bn3 = _keras_bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), _keras_bn(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RadImageNetResNet50(nn.Module):
    """ResNet-50 without classifier: (N, 3, 224, 224) -> (N, 2048) spatial-mean features."""

    input_size = (224, 224)
    #: Per-channel means subtracted from [0, 1] input in BGR order, as RadImageNet's Keras
    #: training did (caffe-style preprocessing: BGR, mean subtraction, no division).
    bgr_mean = (0.406, 0.456, 0.485)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = _keras_bn(64)
        cin, stages = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = [Bottleneck(cin, width, stride)] + [Bottleneck(4 * width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = 4 * width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] slices -> 3 channels (BGR), 224 x 224 (bilinear), mean subtracted."""
        x = _three_channels(x).flip(1)
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return x - torch.tensor(self.bgr_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, 2048) of already prepared input."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected slices (N, 1 or 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# --- loading -------------------------------------------------------------------------------------

_BUILDERS = {"inception": FIDInceptionV3, "radimagenet": RadImageNetResNet50}
_FILE_NAMES = {"inception": "pt_inception-2015-12-05-6726825d.pth", "radimagenet": "RadImageNet-ResNet50_notop.pth"}


def build_extractor(kind: str) -> nn.Module:
    """An extractor with untrained weights (for tests and for saving a layout)."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind: {kind!r} is not one of {EXTRACTORS}")
    return _BUILDERS[kind]()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own error type for a damaged file
            raise ValueError(f"fid weights: cannot read {path}: {err}") from err
    # weights_only: a weights file is data; never run the code a pickle may carry.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"fid weights: {path} does not hold a state dict (a mapping of names to tensors)")
    return loaded


def _kept(name: str) -> bool:
    return not name.startswith(_IGNORED_PREFIXES) and not name.endswith(_IGNORED_SUFFIXES)


def load_extractor(kind: str, weights_path: str | os.PathLike | None) -> nn.Module:
    """The `kind` extractor ("inception" or "radimagenet") with weights from `weights_path`,
    in eval mode. Raises FileNotFoundError for a missing file and ValueError for a file that
    is not a state dict of this architecture (missing, unexpected or mis-shaped entries)."""
    model = build_extractor(kind)
    if weights_path is None:
        raise FileNotFoundError(
            f"fid weights: no file given for the {kind!r} extractor (expected e.g. {_FILE_NAMES[kind]}); "
            "nothing is downloaded"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"fid weights: {path} not found ({kind!r} extractor, e.g. {_FILE_NAMES[kind]})")
    try:
        state = _read_state_dict(path)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"fid weights: cannot read {path}: {err}") from err
    state = {k: v for k, v in state.items() if _kept(k)}
    expected = {k: v for k, v in model.state_dict().items() if _kept(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        def some(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        problems = [f"{len(keys)} {what} ({some(keys)})" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", misshaped)) if keys]
        raise ValueError(
            f"fid weights: {path} does not match the {kind!r} extractor (expected {_FILE_NAMES[kind]}): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)
    # What the evaluation's settings and report say the FID was computed with: the numbers of
    # two extractors (or weights) do not compare.
    model.description = f"{kind} features (weights {path.name})"
    return model.eval()


@torch.no_grad()
def extract_features(model: nn.Module, slices: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Features (N, 2048) in float32 of [0, 1] slices (N, 1 or 3, H, W), run on the model's device."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, slices.shape[0], batch_size):
        batch = slices[start : start + batch_size].to(device=device, dtype=torch.float32)
        out.append(model(model.prepare(batch)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)
