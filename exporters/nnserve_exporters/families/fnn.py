"""FNN: a feed-forward digits classifier on scikit-learn's digits (8x8 images as 64 features)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nnserve_contract.model_spec import Preprocessing

from .. import api, datasets
from ..training import Trained, fit_digits

NAME = "digits-fnn"
FAMILY = "fnn"
TASK = "classify"
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
        task=TASK,
        out=path,
        family=FAMILY,
        labels=datasets.DIGIT_LABELS,
        preprocessing=Preprocessing(scale=datasets.DIGIT_SCALE),
        image_size=(8, 8),  # the task API takes a digit image: flattened row by row
        quality=quality,
        training_data=datasets.DIGITS_SOURCE,
        description="Feed-forward network (64-256-256-10, ReLU, dropout 0.2) classifying 8x8 handwritten digits",
        output_names=("logits",),
        outputs={"logits": "class scores over the labels (softmax for probabilities)"},
    )
    return [api.Exported(NAME, TASK, path, parity)]
