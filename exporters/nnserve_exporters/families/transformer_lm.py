"""Transformer: a small causal (GPT-style) character language model with an explicit key/value cache.

The exported step model (`CachedStep`) reads per-layer key/value buffers that the server keeps and
returns only the new positions, which the server writes into the buffers in place (the spec's
`cache`): the prompt fills the cache once, then each token is one step that reads the past without
copying it, so a token's cost barely grows with the prefix. Positions are encoded ALiBi-style
(each head penalises attention linearly with distance) rather than with learned embeddings, so text
longer than the 128-character training windows stays coherent: learned embeddings past the trained
length are untrained vectors, and generation fell apart after 64 characters with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from nnserve_contract.model_spec import AppendCache, ModelSpec

from .. import api, datasets
from ..training import Trained, fit_language_model

NAME = "chars-transformer"
MODEL_NAMES = (NAME,)
FAMILY = "transformer"
TASK = "generate"
NEEDS: tuple[str, ...] = ()
TRAIN_S = 115  # about how long it trains here (seconds, one thread): ETAs and the zoo's work order
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

    def step(
        self,
        x: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        bias_cached: torch.Tensor,
        bias_new: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` over a cache buffer, without copying it: the new positions' scores are computed
        apart and joined to the cached ones' (a row of scores, not the cache), and the attention sums
        the two parts. Returns the output and only this call's keys and values."""
        batch, steps, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.reshape(batch, steps, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(self.head_dim)
        # The cache times the query, not the query times the transposed cache: a transposed operand as big
        # as the cache made onnxruntime's matmul three times slower than the same product with the
        # values (163 against 58 us a layer at 16 rows and 192 positions).
        cached_scores = (cache_k @ q.transpose(-1, -2)).transpose(-1, -2) * scale + bias_cached  # [b, h, steps, cap]
        new_scores = (q @ k.transpose(-1, -2)) * scale + bias_new  # [batch, heads, steps, steps]
        weights = torch.cat([cached_scores, new_scores], dim=-1).softmax(dim=-1)
        capacity = cache_k.shape[2]
        attended = weights[..., :capacity] @ cache_v + weights[..., capacity:] @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, steps, width))
        return x + self.mlp(self.norm2(x)), k, v


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


class CachedStep(nn.Module):
    """What is exported: a step over key/value buffers that the server keeps and fills in place.

    Inputs: tokens [batch, steps]; `length` [batch], how many cache positions each row has filled; per
    layer i, `past_keys_i` and `past_values_i` [batch, heads, capacity, head_dim], buffers of which the
    first `length[row]` positions of each row hold its past. Rows of different lengths share one call
    (continuous batching: streams at different points of their text step together), each attending to
    its own past only. Outputs: logits [batch, steps, vocab] and per layer `keys_i`,
    `values_i` [batch, heads, steps, head_dim]: this call's positions only, for the caller to write
    into the buffers at `length`. Nothing in a step copies the cache, so a token's cost barely grows
    with the prefix (the concatenating cache copied the whole past, in and out, on every token).
    """

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor, length: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        steps, capacity = tokens.shape[1], caches[0].shape[2]
        x = lm.embed(tokens)
        filled = length.reshape(-1, 1, 1)  # [batch, 1, 1]: each row's own past
        positions = torch.arange(steps).reshape(1, steps, 1) + filled  # of the queries, per row
        slots = torch.arange(capacity).reshape(1, 1, capacity)
        distance = (positions - slots).float()  # [batch, steps, capacity]
        bias_cached = (-lm.slopes.unsqueeze(0) * distance.unsqueeze(1)).masked_fill(
            (slots >= filled).unsqueeze(1), float("-inf")
        )  # [batch, heads, steps, capacity]
        among = (torch.arange(steps).unsqueeze(1) - torch.arange(steps).unsqueeze(0)).float()
        bias_new = (-lm.slopes * among.clamp(min=0)).masked_fill(among < 0, float("-inf"))
        new: list[torch.Tensor] = []
        blocks: list[Block] = list(lm.blocks)  # type: ignore[arg-type]  # ModuleList items are Modules
        for layer, block in enumerate(blocks):
            x, k, v = block.step(x, caches[2 * layer], caches[2 * layer + 1], bias_cached, bias_new)
            new += [k, v]
        return (lm.head(lm.norm(x)), *new)


def build(fast: bool = False) -> nn.Module:
    vocab = len(datasets.text_corpus().vocabulary)
    return CausalLM(vocab, 16, 2, 1) if fast else CausalLM(vocab, 128, 4, 3)


def train(model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained:
    return fit_language_model(
        model,
        datasets.text_corpus(),
        steps=20 if fast else 220,
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
    buffers = {
        f"past_{kind}_{layer}": f"{kind}_{layer}" for layer in range(model.layers) for kind in ("keys", "values")
    }
    shape = (model.heads, model.head_dim)

    def sample(batch: int, variant: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(variant)
        # A prompt into empty buffers; then one step on buffers whose rows hold 5, 2, 7... positions and
        # unfilled slots of noise (which must not count).
        length, capacity, steps = ((0, 4, 6), (5, 8, 1))[variant]
        tokens = torch.randint(0, len(corpus.vocabulary), (batch, steps), generator=generator)
        caches = [torch.randn(batch, shape[0], capacity, shape[1], generator=generator) for _ in buffers]
        lengths = torch.tensor([(length + 3 * row) % capacity if length else 0 for row in range(batch)])
        return (tokens, lengths, *caches)

    example: tuple[torch.Tensor, ...] = (torch.zeros(2, 4, dtype=torch.int64), torch.tensor([3, 3]))
    example += tuple(torch.zeros(2, shape[0], 5, shape[1]) for _ in buffers)
    parity = api.export(
        CachedStep(model),
        example,
        ModelSpec(
            task=TASK,
            family=FAMILY,
            input_layout="tokens",
            quality=quality,
            training_data=datasets.TEXT_SOURCE,
            description=f"Causal transformer, {model.layers} layers, {model.heads} heads, width "
            f"{model.heads * model.head_dim}, ALiBi positions, over characters",
            vocabulary=corpus.vocabulary,
            cache=AppendCache(buffers, "length", axis=2),
            outputs={
                "logits": "next-character logits over the vocabulary, for each input step",
                **{
                    name: f"this call's {name.split('_')[0]} of layer {name.split('_')[1]}: write them into "
                    f"past_{name} at `length`"
                    for name in buffers.values()
                },
            },
            extra={"position_encoding": "alibi"},
        ),
        out=path,
        input_names=("tokens", "length", *buffers),
        output_names=("logits", *buffers.values()),
        dynamic_axes={
            "tokens": {0: "batch", 1: "steps"},
            "length": {0: "batch"},
            "logits": {0: "batch", 1: "steps"},
            **{name: {0: "batch", 2: "capacity"} for name in buffers},
            **{name: {0: "batch", 2: "steps"} for name in buffers.values()},
        },
        sample=sample,
    )
    parity = max(parity, _rows_apart(path, len(corpus.vocabulary)))
    return [api.Exported(NAME, TASK, path, parity)]


def _rows_apart(path: Path, vocab: int) -> float:
    """The exported step with rows of different lengths in one call against each row stepped alone
    (what the server's continuous batching relies on): the largest difference of the logits and new
    keys/values. Raises when a row's answer depends on the others'."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    shapes = {i.name: i.shape for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    rows, capacity = 5, 12
    feed = {"tokens": rng.integers(0, vocab, (rows, 1)).astype(np.int64), "length": np.array([0, 3, 11, 7, 1])}
    for name in names[2:]:
        heads, head_dim = shapes[name][1], shapes[name][3]
        feed[name] = rng.standard_normal((rows, heads, capacity, head_dim)).astype(np.float32)
    together = session.run(None, feed)
    worst = 0.0
    for row in range(rows):
        alone = session.run(None, {name: value[row : row + 1] for name, value in feed.items()})
        for shared, single in zip(together, alone, strict=True):
            worst = max(worst, float(np.abs(shared[row : row + 1] - single).max()))
    if worst > 1e-4:
        raise AssertionError(f"{path}: a row stepped beside others differs from the row alone by {worst:.2e}")
    return worst
