"""Judging generated digits with the zoo's own CNN classifier."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CONFIDENT = 0.9


def judge(cnn: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The CNN's predicted class and its probability for each (n, 1, 8, 8) image in 0..1 (pixels / 16)."""
    cnn.eval()
    with torch.no_grad():
        logits = cnn(images)
        logits = logits[0] if isinstance(logits, tuple) else logits
        probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    return predicted.numpy(), confidence.numpy()


def sample_quality(cnn: nn.Module, images: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Share of samples the CNN calls with probability >= 0.9, and the rarest class among those."""
    predicted, confidence = judge(cnn, images)
    confident = confidence >= CONFIDENT
    counts = np.bincount(predicted[confident], minlength=10)
    rarest = float(counts.min() / max(confident.sum(), 1))
    return {f"{prefix}confident_fraction": float(confident.mean()), f"{prefix}rarest_class_fraction": rarest}
