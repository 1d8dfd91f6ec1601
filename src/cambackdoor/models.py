"""CIFAR ResNet-18: 3x3 stem, no max-pool, so layer4 is 4x4 on 32x32 inputs.

Module names follow torchvision (``conv1, bn1, layer1..layer4, fc``). Normalisation is the model's
first module (``normalize``), so the model takes images in [0, 1] and outside tools (Captum,
pytorch-grad-cam) can use it as it is.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cambackdoor.errors import CamBackdoorError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MODELS = ("resnet18",)
# The trunk's units in order and the modules each is made of (the stem: normalisation, conv1, bn1, its ReLU)
TRUNK_UNITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stem", ("normalize", "conv1", "bn1")), ("layer1", ("layer1",)), ("layer2", ("layer2",)),
    ("layer3", ("layer3",)), ("layer4", ("layer4",)))


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for i, (p, n) in enumerate(zip(planes, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, p, stride if j == 0 else 1))
                in_planes = p
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str = "resnet18", num_classes: int = 10, width: int = 64) -> nn.Module:
    """Build a model by name; ``width`` scales every channel count (64 = the standard 11.2 M params)."""
    if name != "resnet18":
        raise CamBackdoorError(f"unknown model '{name}'; available: {', '.join(MODELS)}")
    if width < 1 or num_classes < 1:
        raise CamBackdoorError(f"width ({width}) and num_classes ({num_classes}) must be positive")
    model = ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)
    model.arch = {"name": name, "num_classes": num_classes, "width": width}  # type: ignore[assignment]
    return model


def prefer_channels_last(model: nn.Module, device: torch.device | str, *batch_sizes: int) -> bool:
    """Whether to run ``model`` in channels_last: always on CUDA; on the CPU, where it makes convolutions
    1.5-2x faster, only at width >= 16 with every batch a multiple of 8, because torch 2.14's CPU
    convolution backward corrupts the heap otherwise (seen on 2 cores)."""
    width = (getattr(model, "arch", None) or {}).get("width", 0)
    return torch.device(device).type == "cuda" or (width >= 16 and all(b % 8 == 0 for b in batch_sizes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` (the defences and the implant's BatchNorm switches share this)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def split_trunk(model: nn.Module, units: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, rest): two views of ``model``'s own modules, no copies: its first ``units`` trunk units
    (``TRUNK_UNITS``), and the remaining units with the head, so ``rest(prefix(x)) == model(x)``. The views keep
    the modules' names (``rest.layer4``, ``rest.fc``), so CAM hooks and layer lookups work on ``rest``."""
    if not all(hasattr(model, n) for n in ("normalize", "conv1", "bn1", "relu", "layer1", "layer4", "avgpool", "fc")):
        raise CamBackdoorError("splitting the trunk needs this package's ResNet (build_model), not "
                               f"{type(model).__name__}")
    if not 0 <= units <= len(TRUNK_UNITS):
        raise CamBackdoorError(f"the trunk has {len(TRUNK_UNITS)} units; cannot split after {units}")
    named: list[tuple[str, nn.Module]] = []
    for unit, _ in TRUNK_UNITS:
        parts = ("normalize", "conv1", "bn1", "relu") if unit == "stem" else (unit,)
        named.extend((n, getattr(model, n)) for n in parts)
    cut = 4 + max(0, units - 1) if units else 0  # the stem is four modules
    head = [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]
    views = nn.Sequential(OrderedDict(named[:cut])), nn.Sequential(OrderedDict(named[cut:] + head))
    for view in views:  # a new container says "training"; the views report the model's mode instead
        view.training = model.training
    return views
