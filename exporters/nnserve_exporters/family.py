"""The contract of a model family: what every module in `families/` provides, typed.

`zoo.FAMILIES` lists the modules; mypy checks each against `Family` (a module satisfies a Protocol
by its module-level names). A family is named once: its module's name is its key in the zoo and
the value `nnserve-export zoo --only` takes; `FAMILY` is the architecture its models' metadata
names (the MiniLM encoder and the character Transformer are both `transformer`), and `NAME` the
model it serves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from torch import nn

from .api import Exported
from .training import Trained


class Family(Protocol):
    # Read-only (properties), so that a module's `MODEL_NAMES = (NAME,)` or dict of bars satisfies them.
    @property
    def NAME(self) -> str: ...  # the model it installs (digits-cnn), or the main one where it installs several

    @property
    def MODEL_NAMES(self) -> tuple[str, ...]: ...  # every model it installs

    @property
    def FAMILY(self) -> str: ...  # the architecture, written into each model's metadata

    @property
    def TASK(self) -> str: ...

    @property
    def NEEDS(self) -> tuple[str, ...]: ...  # families trained first, whose models `train` gets in `zoo` by key

    @property
    def TRAIN_S(self) -> int: ...  # about how long it trains here (seconds, one thread)

    @property
    def QUALITY_BAR(self) -> Mapping[str, float]: ...  # held-out figures a trained model must reach

    def build(self, fast: bool = False) -> nn.Module: ...

    def train(self, model: nn.Module, *, fast: bool, zoo: Mapping[str, nn.Module]) -> Trained: ...

    def export(self, model: nn.Module, out: Path, quality: dict[str, float]) -> list[Exported]: ...
