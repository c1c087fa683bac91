"""What the character language models share: the recurrent step model and its export.

A step model takes (tokens [batch, steps], *state) and returns (logits [batch, steps, vocab],
*next_state). The prompt goes through it once; each generated token is then one call with
steps = 1 and the state from the call before, whatever the length of the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nnserve_contract.model_spec import ModelSpec

from . import api, datasets
from .training import Trained, fit_language_model


class RecurrentCharLM(nn.Module):
    def __init__(self, cell: str, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.cell, self.layers, self.hidden = cell, layers, hidden
        self.embed = nn.Embedding(vocab, embed)
        rnn_type = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn_type(embed, hidden, num_layers=layers, batch_first=True, dropout=0.1 if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        zeros = torch.zeros(self.layers, batch, self.hidden)
        return (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rnn_state = (state[0], state[1]) if self.cell == "lstm" else state[0]
        outputs, next_state = self.rnn(self.embed(tokens), rnn_state)
        logits = self.head(outputs)
        return (logits, *next_state) if self.cell == "lstm" else (logits, next_state)


def state_names(model: nn.Module) -> list[str]:
    return ["h", "c"] if getattr(model, "cell", "") == "lstm" else ["h"]


def sampler(model: nn.Module, vocab: int, state_shapes: Sequence[Sequence[int]]) -> api.Sampler:
    """Fresh tokens and state for the parity check: a 6-token prompt, then a single step."""

    def sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(variant)
        steps = (6, 1)[variant]
        tokens = torch.randint(0, vocab, (batch, steps), generator=generator)
        states = tuple(
            torch.randn([batch if d == -1 else d for d in shape], generator=generator) * 0.5 for shape in state_shapes
        )
        return (tokens, *states)

    return sample


def build(cell: str, fast: bool) -> RecurrentCharLM:
    """The LSTM's or the GRU's model: one layer over 32-d character embeddings (tiny when `fast`)."""
    vocab = len(datasets.text_corpus().vocabulary)
    return RecurrentCharLM(cell, vocab, 16, 32, 1) if fast else RecurrentCharLM(cell, vocab, 32, 192, 1)


def train(model: nn.Module, steps: int, label: str) -> Trained:
    return fit_language_model(
        model, datasets.text_corpus(), steps=steps, seq_len=64, batch_size=32, lr=4e-3, seed=0, label=label
    )


def export_recurrent(
    model: nn.Module, name: str, family: str, out: Path, quality: dict[str, float]
) -> list[api.Exported]:
    assert isinstance(model, RecurrentCharLM)
    states = state_names(model)
    description = (
        f"{model.layers}-layer {model.cell.upper()} ({model.hidden} units) over characters; "
        f"state {', '.join(states)} in and out"
    )
    corpus = datasets.text_corpus()
    path = out / name / "1" / "model.onnx"
    state_shape = [model.layers, -1, model.hidden]
    axes: dict[str, dict[int, str]] = {"tokens": {0: "batch", 1: "steps"}, "logits": {0: "batch", 1: "steps"}}
    for state in states:
        axes[state] = {1: "batch"}
        axes[state + "_out"] = {1: "batch"}
    parity = api.export(
        model,
        (torch.zeros(2, 3, dtype=torch.int64), *model.initial_state(2)),
        ModelSpec(
            task="generate",
            family=family,
            output_kind="logits",
            input_layout="tokens",
            quality=quality,
            training_data=datasets.TEXT_SOURCE,
            description=description,
            vocabulary=corpus.vocabulary,
            state={s: s + "_out" for s in states},
            outputs={"logits": "next-character logits over the vocabulary, for each input step"}
            | {s + "_out": f"recurrent state '{s}' after the last step: feed it back as '{s}'" for s in states},
            extra={"initial_state": "zeros", "tokenizer": "characters: token id = index in the vocabulary"},
        ),
        out=path,
        input_names=("tokens", *states),
        output_names=("logits", *(s + "_out" for s in states)),
        dynamic_axes=axes,
        sample=sampler(model, len(corpus.vocabulary), [state_shape] * len(states)),
    )
    return [api.Exported(name, "generate", path, parity)]
