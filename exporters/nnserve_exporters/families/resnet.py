"""ResNet: a small residual network (basic blocks, batch norm) classifying 8x8 digits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import api, datasets
from ..training import Trained, fit_digits, shift_augment

NAME = "digits-resnet"
MODEL_NAMES = (NAME,)
FAMILY = "resnet"
TASK = "classify"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 25  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"accuracy": 0.98}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the (projected) input: ResNet's building block."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width: int, blocks_per_stage: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
        for stage in range(3):  # 8x8 -> 8x8 -> 4x4 -> 2x2
            out_channels = width * 2**stage
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(fast: bool = False) -> nn.Module:
    return ResNet(4, 1) if fast else ResNet(16, 2)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_digits(model, shape=(-1, 1, 8, 8), epochs=2 if fast else 30, label=NAME, augment=shift_augment(1))


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    parity = api.export(
        model,
        torch.full((2, 1, 8, 8), 0.5),
        datasets.digit_classifier(
            FAMILY,
            quality,
            "ResNet: a stem and three stages of two basic blocks (16-32-64 channels) on 8x8 digits",
            input_layout="NCHW",
        ),
        out=path,
        output_names=("logits",),
    )
    return [api.Exported(NAME, TASK, path, parity)]
