"""GRU: a character language model (task of choice: generate), exported as a step model with state h."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .. import api, datasets
from ..training import Trained, fit_language_model
from .charlm import RecurrentCharLM, export_recurrent

NAME = "chars-gru"
FAMILY = "gru"
TASK = "generate"
QUALITY_BAR = {"bits_below_unigram": 1.0}  # held-out bits per character at least 1.0 below a unigram model's


def build(fast: bool = False) -> nn.Module:
    vocab = len(datasets.text_corpus().vocabulary)
    return RecurrentCharLM("gru", vocab, 16, 32, 1) if fast else RecurrentCharLM("gru", vocab, 32, 192, 1)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_language_model(
        model, datasets.text_corpus(), steps=20 if fast else 350, seq_len=64, batch_size=32, lr=4e-3, seed=0, label=NAME
    )


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    assert isinstance(model, RecurrentCharLM)
    description = f"{model.layers}-layer GRU ({model.hidden} units) over characters; state h in and out"
    return export_recurrent(model, NAME, FAMILY, out, quality, description)
