"""FNN: a feed-forward digits classifier on scikit-learn's digits (8x8 images as 64 features)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import api, datasets
from ..training import Trained, fit_digits

NAME = "digits-fnn"
MODEL_NAMES = (NAME,)
FAMILY = "fnn"
TASK = "classify"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 6  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"accuracy": 0.96}


def build(fast: bool = False) -> nn.Module:
    hidden = 32 if fast else 256
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(0.2),  # 1,437 training images: without it the net memorises them (96.7% held out)
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, 10),
    )


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_digits(model, shape=(-1, 64), epochs=3 if fast else 60, label=NAME, lr=1e-3)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    parity = api.export(
        model,
        torch.full((2, 64), 0.5),
        datasets.digit_classifier(
            FAMILY,
            quality,
            "Feed-forward network (64-256-256-10, ReLU, dropout 0.2) classifying 8x8 handwritten digits",
            outputs={"logits": "class scores over the labels (softmax for probabilities)"},
        ),
        out=path,
        output_names=("logits",),
    )
    return [api.Exported(NAME, TASK, path, parity)]
