"""LSTM: a character language model of Python's own documentation, exported as a step model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .. import api, charlm
from ..training import Trained

NAME = "chars-lstm"
MODEL_NAMES = (NAME,)
FAMILY = "lstm"
TASK = "generate"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 28  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
QUALITY_BAR = {"bits_below_unigram": 1.0}  # held-out bits per character at least 1.0 below a unigram model's


def build(fast: bool = False) -> nn.Module:
    return charlm.build("lstm", fast)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return charlm.train(model, steps=20 if fast else 500, label=NAME)


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    return charlm.export_recurrent(model, NAME, FAMILY, out, quality)
