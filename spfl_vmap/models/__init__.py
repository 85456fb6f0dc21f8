"""Models. All are vmap-safe: no BatchNorm buffers (GroupNorm instead), no dropout, no
data-dependent control flow. Each factory takes ``(input_shape, num_classes, width)``.

=========== ================================================================================
``lr``       multinomial logistic regression (flatten + linear)
``cnn``      McMahan et al. 2017: conv5x5-32, pool, conv5x5-64, pool, fc512, fc10
             (1,663,370 parameters on 1x28x28)
``cnn_cifar`` pfl-research CIFAR-10 benchmark CNN (Granlund et al. 2024): conv3x3-32,
             conv3x3-64, maxpool, dense128, dense10 (its dropout is left out so that the
             vectorized and loop engines agree exactly)
``convnet``  Geiping et al. 2020's inverting-gradients ConvNet (8 conv layers, width option),
             GroupNorm in place of BatchNorm
``resnet20`` / ``resnet56``  He et al. 2016's CIFAR ResNets (option-A shortcuts) with
             GroupNorm (Hsieh et al. 2020)
=========== ================================================================================
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import Registry

ModelFactory = Callable[[tuple[int, int, int], int, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
MIN_HW: dict[str, int] = {}


def register(name: str, min_hw: int = 1) -> Callable[[ModelFactory], ModelFactory]:
    MIN_HW[name] = min_hw
    return MODELS.register(name)


def check_model_input(name: str, input_shape: tuple[int, ...], dataset: str = "") -> None:
    """Reject model/dataset pairs whose input is too small for the model's pooling."""
    MODELS.get(name)
    h, w = input_shape[-2], input_shape[-1]
    if min(h, w) < MIN_HW[name]:
        raise ConfigError(
            f"model {name!r} needs inputs of at least {MIN_HW[name]}x{MIN_HW[name]}, "
            f"dataset {dataset!r} has {h}x{w}; choose lr or cnn for small images"
        )


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    check_model_input(name, input_shape)
    model = MODELS.get(name)(tuple(input_shape), num_classes, width)
    if list(model.buffers()):
        raise AssertionError(f"model {name} has buffers; vmapped training needs buffer-free models")
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("lr")
def logistic_regression(input_shape, num_classes, width) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


class CNN(nn.Module):
    """McMahan et al. 2017 'Communication-Efficient Learning of Deep Networks from Decentralized Data'."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@register("cnn", min_hw=4)
def cnn(input_shape, num_classes, width) -> nn.Module:
    return CNN(input_shape, num_classes)


class CNNCifar(nn.Module):
    """The CNN of pfl-research's CIFAR-10 benchmark (Granlund et al. 2024), without dropout."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (B, 32, H-2, W-2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, (H-4)/2, (W-4)/2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@register("cnn_cifar", min_hw=6)
def cnn_cifar(input_shape, num_classes, width) -> nn.Module:
    return CNNCifar(input_shape, num_classes)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``."""
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ConvNet(nn.Module):
    """Geiping et al. 2020 'Inverting Gradients' ConvNet, GroupNorm in place of BatchNorm."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        c, h, w = input_shape
        chans = [c, width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(8))
        self.norms = nn.ModuleList(group_norm(chans[i + 1]) for i in range(8))
        self.fc = nn.Linear(4 * width * (h // 9) * (w // 9), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if i in (3, 7):
                x = F.max_pool2d(x, 3)  # 32 -> 10 -> 3
        return self.fc(x.flatten(1))


@register("convnet", min_hw=9)
def convnet(input_shape, num_classes, width) -> nn.Module:
    return ConvNet(input_shape, num_classes, width)


class BasicBlock(nn.Module):
    """He et al. 2016 CIFAR residual block with an option-A (zero-padding) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016 with GroupNorm (Hsieh et al. 2020)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, n: int) -> None:
        super().__init__()
        c = input_shape[0]
        self.conv = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        self.norm = group_norm(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


@register("resnet20", min_hw=8)
def resnet20(input_shape, num_classes, width) -> nn.Module:
    return ResNetCifar(input_shape, num_classes, 3)


@register("resnet56", min_hw=8)
def resnet56(input_shape, num_classes, width) -> nn.Module:
    return ResNetCifar(input_shape, num_classes, 9)
