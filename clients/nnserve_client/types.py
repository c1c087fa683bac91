"""The small typed results the SDK returns; numpy arrays inside, no protobuf."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a dimension of variable size


@dataclass(frozen=True)
class TaskInput:
    """What a task API tensor holds: values in the model's natural units (digits: pixels 0..16), which
    the server turns into the network's input as (x * scale - mean) / std."""

    layout: str  # features, NCHW, NHWC, tokens, latent, ...
    scale: float
    full_scale: float  # the natural value that scales to 1 (1 / scale): the top of the natural range
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __str__(self) -> str:
        text = f"{self.layout}, values 0..{self.full_scale:g}" if self.full_scale else self.layout
        if self.mean or self.std:
            text += f" (then mean {list(self.mean) or 0}, std {list(self.std) or 1})"
        return text


@dataclass(frozen=True, repr=False)
class ModelInfo:
    """One model as the server describes it; `str()` and `repr()` give one readable line."""

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
    image: tuple[int, int, int] | None = None  # (height, width, channels) of the images it takes; 0, 0: any size
    text: bool = False  # takes texts (or a prompt)
    task_input: TaskInput | None = None  # task models: what a `batch` tensor holds (natural units)

    def takes(self) -> str:
        """What the model takes, for people: "image 8x8 grey, tensor [n, 64]"."""
        if not self.task:  # a plain ONNX model: KServe v2 tensors only
            return "tensors " + ", ".join(f"{s.name} {s.datatype} {_shape(s.shape)}" for s in self.inputs)
        if self.task == "generate":
            return "a text prompt" if self.text else "nothing but a seed: it draws images"
        accepted = []
        if self.image is not None:
            height, width, channels = self.image
            size = f"{height}x{width}" if height else "of any size"
            accepted.append(
                f"images {size} {'grey' if channels == 1 else 'RGB' if channels == 3 else f'{channels}-ch'}"
            )
        if self.text:
            accepted.append("texts")
        elif len(self.inputs) == 1:
            accepted.append(
                f"a tensor {_shape(self.inputs[0].shape)}" + (f" ({self.task_input})" if self.task_input else "")
            )
        return ", ".join(accepted)

    def __repr__(self) -> str:
        return f"<ModelInfo {self}>"

    def __str__(self) -> str:
        quality = ", ".join(f"{k} {v:.4g}" for k, v in self.quality.items())
        return f"{self.name} v{self.version} ({self.task or 'KServe v2 only'}, {self.family or 'plain ONNX'}): " + (
            f"takes {self.takes()}" + (f"; {quality}" if quality else "")
        )


class ModelList(list[ModelInfo]):
    """`Client.models()`: a list, printed one model per line."""

    def __repr__(self) -> str:
        return "\n".join(repr(m) for m in self) if self else "[]"


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join("n" if i == 0 and d < 0 else "?" if d < 0 else str(d) for i, d in enumerate(shape)) + "]"


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


@dataclass(frozen=True)
class TextPiece:
    """The next piece of generated text."""

    text: str


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    png: bytes | None  # PNG bytes (the default format)
    pixels: np.ndarray | None  # uint8 [height, width] when asked for tensors
    label: str  # the class drawn, for conditional generators


@dataclass(frozen=True)
class GenerationDone:
    """The last event of a Generate stream."""

    finish_reason: str  # length | stop | samples
    prompt_tokens: int
    generated_tokens: int
    samples: int


GenerateEvent = TextPiece | GeneratedImage | GenerationDone


@dataclass(frozen=True)
class ServerTiming:
    """Where the server spent one call's time, from its trailing metadata (seconds)."""

    request_id: str  # the x-request-id the call carried, or the one the server made
    server: float  # arrival to answer
    queue: float = 0.0  # waiting for an onnxruntime run
    compute: float = 0.0  # onnxruntime, for the whole batch the request shared
    batch_size: int = 0  # rows of that run; 0 when the call ran no model

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> ServerTiming | None:
        values = {key: value for key, value in metadata or () if isinstance(value, str)}
        if "x-request-id" not in values:
            return None  # not an nnserve server
        try:
            if "nnserve-timing" in values:  # "server=US[,queue=US,compute=US,batch=ROWS]"
                timing = dict(item.split("=", 1) for item in values["nnserve-timing"].split(","))
            else:  # older servers sent one entry each
                timing = {key: values.get(f"nnserve-{key}-us", "0") for key in ("server", "queue", "compute")}
                timing["batch"] = values.get("nnserve-batch-size", "0")
            return cls(
                request_id=values["x-request-id"],
                server=int(timing.get("server", 0)) / 1e6,
                queue=int(timing.get("queue", 0)) / 1e6,
                compute=int(timing.get("compute", 0)) / 1e6,
                batch_size=int(timing.get("batch", 0)),
            )
        except ValueError:
            return None


class InferResult(dict[str, np.ndarray]):
    """`Client.infer`'s outputs by name (a dict), with the server's `timing` of the call."""

    timing: ServerTiming | None = None


class Classifications(list[Classification]):
    """`Client.classify`'s results, one per item (a list), with the server's `timing` of the call."""

    timing: ServerTiming | None = None


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32 [items, dimensions]
    others: Mapping[str, np.ndarray] = field(default_factory=dict)  # e.g. a VAE's log_variance
    timing: ServerTiming | None = None


@dataclass(frozen=True)
class Segmentation:
    mask: np.ndarray  # uint8 [height, width]: each pixel's class index
    labels: tuple[str, ...]
    pixel_counts: Mapping[str, int]
    png: bytes | None = None
    timing: ServerTiming | None = None
