"""Text in and out of language models: character vocabularies and word-piece tokenizers from metadata."""

from __future__ import annotations

import functools

import numpy as np
from tokenizers import Tokenizer

from nnserve_contract.model_spec import ModelSpec
from nnserve_server.core.errors import InvalidInput


class CharacterCodec:
    """Characters <-> token ids through the model's vocabulary; unknown characters become '?'."""

    def __init__(self, vocabulary: tuple[str, ...]) -> None:
        self.vocabulary = vocabulary
        self._ids = {c: i for i, c in enumerate(vocabulary)}
        self._unknown = self._ids.get("?", 0)

    def encode(self, text: str) -> np.ndarray:
        return np.array([self._ids.get(c, self._unknown) for c in text], dtype=np.int64)

    def decode(self, token: int) -> str:
        return self.vocabulary[token]


@functools.lru_cache(maxsize=64)
def character_codec(vocabulary: tuple[str, ...]) -> CharacterCodec:
    """One codec per vocabulary, made once (not per request)."""
    return CharacterCodec(vocabulary)


@functools.lru_cache(maxsize=16)
def _tokenizer(definition: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(definition)
    # A tokenizer file may carry its own padding and truncation; the mask and the length limit
    # here must come from the model's metadata alone, so both are switched off.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def word_pieces(spec: ModelSpec, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [items, tokens], padded to the longest item, cut at `max_length`."""
    tokenizer = _tokenizer(spec.tokenizer)
    encodings = tokenizer.encode_batch(texts)
    longest = min(max(len(e.ids) for e in encodings), max_length)
    ids = np.zeros((len(texts), longest), np.int64)
    mask = np.zeros((len(texts), longest), np.int64)
    for row, encoding in enumerate(encodings):
        kept = encoding.ids[:longest]
        if len(encoding.ids) > longest:  # keep the closing [SEP] when cutting
            kept = [*encoding.ids[: longest - 1], encoding.ids[-1]]
        ids[row, : len(kept)] = kept
        mask[row, : len(kept)] = 1
    return ids, mask


def check_texts(texts: list[str], max_chars: int) -> None:
    if not texts:
        raise InvalidInput("no texts given; send at least one")
    for index, text in enumerate(texts):
        if not text:
            raise InvalidInput(f"text {index} is empty")
        if len(text) > max_chars:
            raise InvalidInput(f"text {index} has {len(text)} characters; at most {max_chars} are accepted")
