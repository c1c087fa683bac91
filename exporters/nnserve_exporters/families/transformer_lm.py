"""Transformer: a small causal (GPT-style) character language model with an explicit key/value cache.

The exported step model takes (tokens [batch, steps], past_keys, past_values) with the cache shaped
[layers, batch, heads, past, head_dim] and returns (logits, keys, values) with `past + steps`
positions: the prompt fills the cache once, then each token attends to the cache and appends one
position, so a token costs one step whatever the prefix length. Positions are encoded ALiBi-style
(each head penalises attention linearly with distance) rather than with learned embeddings, so text
longer than the 128-character training windows stays coherent: learned embeddings past the trained
length are untrained vectors, and generation fell apart after 64 characters with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import api, datasets
from ..training import Trained, fit_language_model

NAME = "chars-transformer"
FAMILY = "transformer"
TASK = "generate"
QUALITY_BAR = {"bits_below_unigram": 1.0}


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, steps, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.reshape(batch, steps, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        keys = torch.cat([past_k, k], dim=2)  # [batch, heads, past + steps, head_dim]
        values = torch.cat([past_v, v], dim=2)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        attended = (scores.softmax(dim=-1) @ values).transpose(1, 2).reshape(batch, steps, width)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x)), keys, values


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.layers, self.heads, self.head_dim = layers, heads, width // heads
        self.embed = nn.Embedding(vocab, width)
        # ALiBi slopes: head h looks back with penalty 2^(-8(h+1)/heads) per position of distance.
        self.slopes: torch.Tensor
        slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
        self.register_buffer("slopes", slopes.reshape(heads, 1, 1), persistent=False)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros(self.layers, batch, self.heads, 0, self.head_dim)
        return empty, empty.clone()

    def forward(
        self, tokens: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        steps = tokens.shape[1]
        past = past_keys.shape[3]
        positions = torch.arange(steps) + past
        x = self.embed(tokens)
        # Query i (at position past + i) sees every cached position and itself, less a penalty
        # growing with distance; later positions are masked out.
        distance = (positions.unsqueeze(1) - torch.arange(past + steps).unsqueeze(0)).float()
        bias = -self.slopes * distance.clamp(min=0)
        bias = bias.masked_fill(distance < 0, float("-inf"))
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block(x, past_keys[layer], past_values[layer], bias)
            keys.append(k)
            values.append(v)
        return self.head(self.norm(x)), torch.stack(keys), torch.stack(values)


def build(fast: bool = False) -> nn.Module:
    vocab = len(datasets.text_corpus().vocabulary)
    return CausalLM(vocab, 16, 2, 1) if fast else CausalLM(vocab, 128, 4, 3)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_language_model(
        model,
        datasets.text_corpus(),
        steps=20 if fast else 400,
        seq_len=128,
        batch_size=32,
        lr=3e-3,
        seed=0,
        label=NAME,
    )


def export(model: nn.Module, out: Path, quality: dict[str, float]) -> list[api.Exported]:
    assert isinstance(model, CausalLM)
    corpus = datasets.text_corpus()
    path = out / NAME / "1" / "model.onnx"
    cache = {1: "batch", 3: "past"}
    grown = {1: "batch", 3: "past_plus_steps"}

    def sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(variant)
        past, steps = ((0, 6), (5, 1))[variant]  # an empty cache and a prompt; then one step on a cache
        shape = (model.layers, batch, model.heads, past, model.head_dim)
        tokens = torch.randint(0, len(corpus.vocabulary), (batch, steps), generator=generator)
        return tokens, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)

    example_cache = torch.zeros(model.layers, 2, model.heads, 3, model.head_dim)
    parity = api.export(
        model,
        (torch.zeros(2, 4, dtype=torch.int64), example_cache, example_cache.clone()),
        task=TASK,
        out=path,
        family=FAMILY,
        input_layout="tokens",
        quality=quality,
        training_data=datasets.TEXT_SOURCE,
        description=f"Causal transformer, {model.layers} layers, {model.heads} heads, width "
        f"{model.heads * model.head_dim}, ALiBi positions, over characters",
        input_names=("tokens", "past_keys", "past_values"),
        output_names=("logits", "keys", "values"),
        dynamic_axes={
            "tokens": {0: "batch", 1: "steps"},
            "past_keys": cache,
            "past_values": cache,
            "logits": {0: "batch", 1: "steps"},
            "keys": grown,
            "values": grown,
        },
        sample=sample,
        vocabulary=corpus.vocabulary,
        state={"past_keys": "keys", "past_values": "values"},
        outputs={
            "logits": "next-character logits over the vocabulary, for each input step",
            "keys": "the key cache with this call's steps appended: feed it back as past_keys",
            "values": "the value cache with this call's steps appended: feed it back as past_values",
        },
        extra={"initial_state": "empty cache (past = 0)", "position_encoding": "alibi"},
    )
    return [api.Exported(NAME, TASK, path, parity)]
