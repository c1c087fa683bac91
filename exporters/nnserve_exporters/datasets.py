"""Training data that ships with a package or is generated here: nothing is downloaded.

Splits are deterministic (fixed seeds), so quality figures are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

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
