"""Backbones and heads.

ResNets follow torchvision's layout and parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` ...), so a trained backbone's ``state_dict()`` loads into
``torchvision.models.resnet18()`` with ``strict=False`` (only ``fc`` is missing) once the stem has the
same shape (``stem="imagenet"``, width 1, 3 input channels). Two stems:

- ``"cifar"``: 3x3 conv, stride 1, no max-pool (for 32x32 images and small patches);
- ``"imagenet"``: 7x7 conv, stride 2, then a 3x3 max-pool of stride 2.

The backbone returns the globally average-pooled feature of size ``backbone.feature_dim``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from onepoch.config import suggest
from onepoch.errors import ConfigError

STEMS = ("cifar", "imagenet")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class Conv1x1(nn.Conv2d):
    """A bias-free 1x1 convolution (a block's projection shortcut); ``nn.Conv2d`` in all but one path.

    With stride s > 1 on a CPU tensor it computes the same thing as ``conv1x1(x[:, :, ::s, ::s])`` at
    stride 1 (a 1x1 kernel without padding reads only those pixels). The CPU builds of torch 2.13 corrupt
    the heap in the backward pass of a strided 1x1 convolution on channels_last input with fewer than 8
    input channels on one thread (narrow networks such as ResNet-10 at width 1/16); the stride-1 form
    avoids that kernel. Parameter names and shapes are ``nn.Conv2d``'s.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if x.device.type == "cpu" and s != (1, 1):
            return nn.functional.conv2d(x[:, :, ::s[0], ::s[1]], self.weight)
        return super().forward(x)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return Conv1x1(cin, cout, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * 4)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet backbone: stem, four stages, global average pool; no classifier (``fc`` absent).

    ``forward(x)`` maps (N, in_chans, H, W) to (N, feature_dim); ``forward_map(x)`` returns the last
    stage's (N, feature_dim, h, w) feature map before pooling.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], *,
                 stem: str = "cifar", width: float = 1.0, in_chans: int = 3, zero_init_residual: bool = False):
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"model.stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if not width > 0:
            raise ConfigError(f"model.width must be > 0, got {width}")
        if not (isinstance(in_chans, int) and in_chans >= 1):
            raise ConfigError(f"model.in_chans must be a positive integer, got {in_chans!r}")
        widths = [max(1, round(64 * width * 2 ** i)) for i in range(4)]
        self.stem = stem
        self.in_chans = in_chans
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or cin != w * block.expansion:
                    down = nn.Sequential(_conv1x1(cin, w * block.expansion, stride), nn.BatchNorm2d(w * block.expansion))
                blocks.append(block(cin, w, stride, down))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last is not None:
                    nn.init.zeros_(last.weight)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_map(x)), 1)


def resnet10(**kwargs) -> ResNet:
    """ResNet-10: one basic block per stage (a CPU-sized member of the family)."""
    return ResNet(BasicBlock, (1, 1, 1, 1), **kwargs)


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet10": resnet10, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
}


def build_backbone(arch: str, *, stem: str = "cifar", width: float = 1.0, in_chans: int = 3) -> ResNet:
    """The backbone named ``arch`` (one of :data:`BACKBONES`)."""
    if arch not in BACKBONES:
        raise ConfigError(f"unknown model.arch {arch!r}{suggest(arch, BACKBONES)}; "
                          f"choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[arch](stem=stem, width=width, in_chans=in_chans)


def parse_mlp_spec(spec: str | int | list | tuple) -> list[int]:
    """``"4096-4096-1024"`` (or ``[4096, 4096, 1024]``, or ``1024``) -> ``[4096, 4096, 1024]``."""
    if isinstance(spec, int):
        dims = [spec]
    elif isinstance(spec, (list, tuple)):
        dims = list(spec)
    else:
        try:
            dims = [int(p) for p in str(spec).replace(" ", "").split("-")]
        except ValueError:
            raise ConfigError(f"an MLP spec is sizes joined by '-', like '4096-4096-1024'; got {spec!r}") from None
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ConfigError(f"an MLP spec needs positive integer sizes, like '4096-4096-1024'; got {spec!r}")
    return dims


def mlp(in_dim: int, spec: str | int | list | tuple, *, last_bn: bool = False, last_relu: bool = False,
        bias_last: bool = True) -> nn.Sequential:
    """An MLP from a spec: hidden layers Linear+BatchNorm1d+ReLU, the last one Linear (optionally
    followed by BatchNorm1d and/or ReLU). ``mlp(512, "4096-1024")`` = Linear(512,4096) BN ReLU
    Linear(4096,1024)."""
    dims = parse_mlp_spec(spec)
    layers: list[nn.Module] = []
    d = in_dim
    for i, out in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(d, out, bias=bias_last if last else True))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(out))
        if not last or last_relu:
            layers.append(nn.ReLU(inplace=True))
        d = out
    return nn.Sequential(*layers)
