"""The small typed results the SDK returns; numpy arrays inside, no protobuf."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a dimension of variable size


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    versions: tuple[str, ...]
    ready: bool
    task: str  # empty for a plain ONNX model served through KServe v2 only
    family: str
    labels: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quality: Mapping[str, float] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class LabelScore:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Classification:
    """One item's top-k labels, most probable first."""

    top: tuple[LabelScore, ...]

    @property
    def label(self) -> str:
        return self.top[0].label

    @property
    def probability(self) -> float:
        return self.top[0].probability
