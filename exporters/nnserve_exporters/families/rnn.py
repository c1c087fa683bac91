"""RNN: an Elman recurrent network reading a digit image row by row (8 steps of 8 pixels)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import api, datasets
from ..training import Trained, fit_digits

NAME = "digits-rnn"
MODEL_NAMES = (NAME,)
FAMILY = "rnn"
TASK = "classify"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 9  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"accuracy": 0.90}


class RowReader(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(8, hidden, num_layers=2, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(hidden, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (batch, steps, 8)
        outputs, _ = self.rnn(rows)
        return self.head(outputs[:, -1])


def build(fast: bool = False) -> nn.Module:
    return RowReader(16 if fast else 128)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_digits(model, shape=(-1, 8, 8), epochs=2 if fast else 40, label=NAME)


def _sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
    steps = (8, 5)[variant]  # the sequence axis is dynamic too
    return (torch.rand((batch, steps, 8), generator=torch.Generator().manual_seed(variant)),)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    path = out / NAME / "1" / "model.onnx"
    parity = api.export(
        model,
        torch.full((2, 8, 8), 0.5),
        datasets.digit_classifier(
            FAMILY,
            quality,
            "Two-layer tanh RNN (128 units) over the rows of an 8x8 digit, classified from the last step",
            input_layout="sequence",
            training_data=datasets.DIGITS_SOURCE + "; each image read as 8 rows of 8 pixels",
        ),
        out=path,
        output_names=("logits",),
        dynamic_axes={"input": {0: "batch", 1: "steps"}, "logits": {0: "batch"}},
        sample=_sample,
    )
    return [api.Exported(NAME, TASK, path, parity)]
