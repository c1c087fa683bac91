"""Training data that ships with a package or is generated here: nothing is downloaded.

Splits are deterministic (fixed seeds), so quality figures are reproducible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from nnserve_contract.model_spec import ModelSpec, Preprocessing

DIGIT_LABELS = tuple(str(d) for d in range(10))
DIGIT_SCALE = 1 / 16  # pixel intensities 0..16 -> 0..1
DIGITS_SOURCE = "scikit-learn load_digits (1,797 8x8 images, pixel values 0..16), 80/20 stratified split, seed 0"


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's bundled digits as (n, 64) float32 pixel intensities 0..16 and int64 labels."""
    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Split(x_train, y_train, x_test, y_test)


def digit_images(seed: int = 0) -> Split:
    """The same split as `digits`, shaped as (n, 1, 8, 8) images."""
    split = digits(seed)
    return Split(split.x_train.reshape(-1, 1, 8, 8), split.y_train, split.x_test.reshape(-1, 1, 8, 8), split.y_test)


# ---- generated shapes with masks (segmentation) -------------------------------------------------

SHAPE_LABELS = ("background", "circle", "square", "triangle")
SHAPES_SOURCE = "generated: random circles, squares and triangles on noisy backgrounds, with per-pixel masks"


def shapes(count: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` grey images (n, 1, size, size) in 0..1 holding 1-3 shapes each, and their masks (n, size, size).

    Each mask pixel is the index in SHAPE_LABELS of the shape drawn on top there (0: background).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((count, 1, size, size), np.float32)
    masks = np.zeros((count, size, size), np.uint8)
    for n in range(count):
        background = rng.uniform(0.0, 0.35)
        image = np.full((size, size), background, np.float32)
        for _ in range(rng.integers(1, 4)):
            kind = int(rng.integers(1, 4))
            radius = rng.uniform(size * 0.12, size * 0.25)
            cy, cx = rng.uniform(radius, size - radius, 2)
            if kind == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            elif kind == 2:
                inside = (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
            else:  # an upright triangle: below the apex, inside both slanted edges
                top, bottom = cy - radius, cy + radius
                half_width = (yy - top) / (2 * radius) * radius * 1.1
                inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
            image[inside] = rng.uniform(0.55, 1.0)
            masks[n][inside] = kind
        images[n, 0] = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    return images, masks


# ---- text for character language models -----------------------------------------------------

TEXT_SOURCE = "CPython's pydoc_data topics (the help() texts every CPython ships), 90/10 split by position"


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # int64 token ids
    test: np.ndarray
    vocabulary: tuple[str, ...]  # token id -> character

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocabulary)}
        unknown = index["?"]
        return np.array([index.get(c, unknown) for c in text], dtype=np.int64)

    def unigram_bits_per_char(self) -> float:
        """Held-out bits per character of a unigram model fitted on the training text (add-one)."""
        counts = np.bincount(self.train, minlength=len(self.vocabulary)) + 1.0
        probabilities = counts / counts.sum()
        return float(-np.log2(probabilities[self.test]).mean())


@functools.cache
def text_corpus() -> Corpus:
    """Printable ASCII text (other characters become '?'), split 90/10 by position."""
    from pydoc_data.topics import topics

    raw = "".join(topics[key] for key in sorted(topics))
    text = "".join(c if (c.isascii() and (c.isprintable() or c == "\n")) else "?" for c in raw)
    vocabulary = tuple(sorted(set(text) | {"?"}))
    ids = {c: i for i, c in enumerate(vocabulary)}
    tokens = np.array([ids[c] for c in text], dtype=np.int64)
    cut = int(len(tokens) * 0.9)
    return Corpus(tokens[:cut], tokens[cut:], vocabulary)


def digit_classifier(family: str, quality: Mapping[str, float], description: str, **fields: Any) -> ModelSpec:
    """The spec of a classifier of the digits: their labels, scale, image size and source; `fields` add to
    or replace these (the input layout, what each output means)."""
    spec = ModelSpec(
        task="classify",
        family=family,
        labels=DIGIT_LABELS,
        preprocessing=Preprocessing(scale=DIGIT_SCALE),
        image_size=(8, 8),
        quality=dict(quality),
        training_data=DIGITS_SOURCE,
        description=description,
        outputs={"logits": "class scores over the labels"},
    )
    return dataclasses.replace(spec, **fields)
