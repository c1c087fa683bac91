"""Small, deterministic training loops shared by the families."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import datasets
from .datasets import Corpus


@dataclass(frozen=True)
class Trained:
    quality: dict[str, float]  # measured on held-out data
    seconds: float


class Progress:
    """A one-line progress bar with ETA on stderr-like stdout, redrawn in place."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.started = label, total, time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        # Redrawn in place on a terminal; a line at each quarter in logs (CI), so they stay short.
        tty = sys.stdout.isatty()
        if done % max(1, self.total // (20 if tty else 4)) and done != self.total:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total - done)
        filled = int(24 * done / self.total)
        bar = "#" * filled + "." * (24 - filled)
        line = f"  {self.label:<16} [{bar}] {done}/{self.total} {elapsed:5.1f}s ETA {eta:4.0f}s {note}"
        if tty:
            print("\r" + line, end="\n" if done == self.total else "", flush=True)
        else:
            print(line, flush=True)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return float((logits.argmax(dim=1) == y).float().mean())


def minibatches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def fit_classifier(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    label: str = "train",
) -> Trained:
    """Adam with cross-entropy over shuffled minibatches; returns held-out accuracy."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    progress = Progress(label, epochs)
    for epoch in range(epochs):
        model.train()
        for index in minibatches(len(x_train), batch_size, generator):
            x = x_train[index] if augment is None else augment(x_train[index], generator)
            optimizer.zero_grad()
            out = model(x)
            loss_fn(out[0] if isinstance(out, tuple) else out, y_train[index]).backward()
            optimizer.step()
        schedule.step()
        progress.update(epoch + 1)
    return Trained({"accuracy": accuracy(model, x_test, y_test)}, time.perf_counter() - started)


def fit_digits(
    model: nn.Module,
    *,
    shape: tuple[int, ...],
    epochs: int,
    label: str,
    lr: float = 2e-3,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> Trained:
    """`fit_classifier` on the digits split, scaled to 0..1 and reshaped to `shape` (batch first)."""
    data = datasets.digits()
    scale = datasets.DIGIT_SCALE
    return fit_classifier(
        model,
        torch.from_numpy(data.x_train.reshape(shape) * scale),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_test.reshape(shape) * scale),
        torch.from_numpy(data.y_test),
        epochs=epochs,
        seed=0,
        lr=lr,
        augment=augment,
        label=label,
    )


def shift_augment(max_shift: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Randomly shift a batch of images by up to `max_shift` pixels, filling with zeros."""

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
        shifted = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        if dy > 0:
            shifted[..., :dy, :] = 0
        elif dy < 0:
            shifted[..., dy:, :] = 0
        if dx > 0:
            shifted[..., :, :dx] = 0
        elif dx < 0:
            shifted[..., :, dx:] = 0
        return shifted

    return augment


# ---- character language models --------------------------------------------------------------


def fit_language_model(
    model: nn.Module,
    corpus: Corpus,
    *,
    steps: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    label: str,
    eval_chars: int = 20_000,
) -> Trained:
    """Next-character cross-entropy on random windows; held-out bits per character vs unigram.

    The model takes (tokens, *state) with empty state meaning "start of text" and returns
    (logits, *new_state); `model.initial_state(batch)` gives that empty state.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = torch.from_numpy(corpus.train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    progress = Progress(label, steps)
    for step in range(steps):
        model.train()
        starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(window[:, :-1], *empty_state(model, batch_size))[0]
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step + 1, f"loss {loss.item():.2f}")
    bpc = bits_per_char(model, corpus.test[:eval_chars], seq_len)
    unigram = corpus.unigram_bits_per_char()
    quality = {"bits_per_char": bpc, "unigram_bits_per_char": unigram, "bits_below_unigram": unigram - bpc}
    return Trained(quality, time.perf_counter() - started)


def empty_state(model: nn.Module, batch: int) -> tuple[torch.Tensor, ...]:
    """The state a step model starts a text with (zeros, or an empty cache)."""
    initial_state: Callable[[int], tuple[torch.Tensor, ...]] = getattr(model, "initial_state")  # noqa: B009
    return initial_state(batch)


def bits_per_char(model: nn.Module, tokens: np.ndarray, window: int) -> float:
    """Held-out bits per character: the text cut into windows, each predicted from its own start."""
    model.eval()
    usable = (len(tokens) - 1) // window * window
    x = torch.from_numpy(tokens[:usable]).reshape(-1, window)
    y = torch.from_numpy(tokens[1 : usable + 1]).reshape(-1, window)
    with torch.no_grad():
        logits = model(x, *empty_state(model, len(x)))[0]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return float(nll) / math.log(2)
