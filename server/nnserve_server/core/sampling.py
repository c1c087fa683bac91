"""How the next token is chosen: a stream's sampling settings, their checks, and one draw for many rows at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from nnserve_server.core.errors import InvalidInput

DEFAULT_MAX_TOKENS = 64  # tokens a text generation writes when its caller does not say


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float  # 0: greedy
    top_k: int  # 0: no cut
    top_p: float  # 0 or 1: no cut
    seed: int | None
    stop: tuple[str, ...]


class Drawer(Protocol):
    """A stream as `sample` sees it: its settings and its own generator."""

    sampling: Sampling

    @property
    def rng(self) -> np.random.Generator: ...

    @property
    def greedy(self) -> bool: ...


def check_sampling(sampling: Sampling, ceiling: int) -> None:
    if sampling.max_tokens > ceiling:
        raise InvalidInput(f"max_tokens is {sampling.max_tokens}; this server allows at most {ceiling}")
    if not sampling.temperature >= 0:
        raise InvalidInput(f"temperature is {sampling.temperature}; it must be >= 0 (0: greedy)")
    if not 0 <= sampling.top_p <= 1:
        raise InvalidInput(f"top_p is {sampling.top_p}; it must be within 0..1")
    if any(not s for s in sampling.stop):
        raise InvalidInput("stop strings must not be empty")


def sample(logits: np.ndarray, streams: Sequence[Drawer]) -> np.ndarray:
    """The next token of every row: greedy rows by argmax; the others drawn after their temperature,
    top-k and top-p cuts, all rows at once, with one uniform draw from each stream's own generator
    (so a stream's text does not depend on who it ran beside)."""
    chosen: np.ndarray = logits.argmax(axis=1)
    drawn = [row for row, stream in enumerate(streams) if not stream.greedy]
    if not drawn:
        return chosen
    rows = [streams[row] for row in drawn]
    vocab = logits.shape[1]
    scaled = logits[drawn].astype(np.float64) / np.array([s.sampling.temperature for s in rows])[:, None]
    order = np.argsort(-scaled, axis=1, kind="stable")
    ranked = np.take_along_axis(scaled, order, axis=1)
    weights = np.exp(ranked - ranked[:, :1])
    rank = np.arange(vocab)[None, :]
    top_k = np.array([s.sampling.top_k or vocab for s in rows])[:, None]
    weights[rank >= top_k] = 0
    weights /= weights.sum(axis=1, keepdims=True)
    top_p = np.array([s.sampling.top_p for s in rows])
    nucleus = (top_p > 0) & (top_p < 1)
    if nucleus.any():  # keep the fewest most likely tokens whose mass reaches top_p
        keep = (np.cumsum(weights, axis=1) < top_p[:, None]).sum(axis=1) + 1
        weights[nucleus[:, None] & (rank >= keep[:, None])] = 0
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    uniform = np.array([s.rng.random() for s in rows])
    index = np.minimum((cdf <= uniform[:, None]).sum(axis=1), vocab - 1)
    chosen[drawn] = order[np.arange(len(drawn)), index]
    return chosen
