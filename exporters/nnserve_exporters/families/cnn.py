"""CNN: a convolutional digits classifier (8x8 images); its penultimate features serve `encode`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import api, datasets
from ..training import Trained, fit_digits, shift_augment

NAME = "digits-cnn"
MODEL_NAMES = (NAME,)
FAMILY = "cnn"
TASK = "classify"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 28  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"accuracy": 0.98}


class DigitsCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier(features), features


def build(fast: bool = False) -> nn.Module:
    return DigitsCNN(8 if fast else 32)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_digits(model, shape=(-1, 1, 8, 8), epochs=2 if fast else 60, label=NAME, augment=shift_augment(1))


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    width = model.classifier.in_features  # type: ignore[union-attr]
    parity = api.export(
        model,
        torch.full((2, 1, 8, 8), 0.5),
        datasets.digit_classifier(
            FAMILY,
            quality,
            f"Three conv layers and a linear head on 8x8 digits; {width}-d penultimate features",
            input_layout="NCHW",
            outputs={"logits": "class scores over the labels", "features": f"penultimate {width}-d features (encode)"},
        ),
        out=path,
        output_names=("logits", "features"),
    )
    return [api.Exported(NAME, TASK, path, parity)]
