"""What an exported model says about itself, stored in its ONNX `metadata_props`.

The exporters write a `ModelSpec`; the server reads it back and needs nothing else to serve the model:
no per-model Python code on the server. Every key is prefixed `nnserve.`; values are plain strings or
JSON. A plain ONNX file without these keys is still served through the KServe v2 protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

PREFIX = "nnserve."
TASKS = ("classify", "generate", "encode", "segment")
OUTPUT_KINDS = ("logits", "probabilities", "values")
# How a model's (first) input is laid out, and so what the task API turns into it:
#   features  [n, f]              numbers; with an image_size, an image flattened row by row
#   NCHW      [n, c, h, w]        images
#   sequence  [n, steps, f]       numbers per step; with an image_size, an image one row per step
#   tokens    [n, steps] int64    token ids: characters (vocabulary) or word pieces (tokenizer)
#   latent    [n, d]              a generator's latent vector (GAN, VAE decoder)
INPUT_LAYOUTS = ("features", "NCHW", "sequence", "tokens", "latent")


class SpecError(ValueError):
    """Metadata that cannot describe a servable model; the message names the key."""


@dataclass(frozen=True)
class Preprocessing:
    """Turns an input in natural units into what the network takes: (x * scale - mean) / std.

    `mean` and `std` hold one value (for every feature) or one per channel; empty means 0 and 1.
    """

    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"scale": self.scale, "mean": list(self.mean), "std": list(self.std)})

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        raw = json.loads(text)
        return cls(float(raw.get("scale", 1.0)), tuple(raw.get("mean", ())), tuple(raw.get("std", ())))


@dataclass(frozen=True)
class AppendCache:
    """A key/value cache the caller keeps in buffers and the model never copies (Transformer LMs).

    Each buffer input has room for `capacity` positions along `axis`, of which the first `length`
    (the int64 [1] input named `length_input`) are filled. The model returns, in the output paired
    with each buffer, only this call's positions; the caller writes them into the buffer at `length`
    and adds the steps to `length`. A token then costs one step that reads the past in place.
    """

    buffers: Mapping[str, str]  # buffer input -> the output holding this call's positions for it
    length_input: str
    axis: int

    def to_json(self) -> str:
        return json.dumps({"buffers": dict(self.buffers), "length_input": self.length_input, "axis": self.axis})

    @classmethod
    def from_json(cls, text: str) -> AppendCache | None:
        raw = json.loads(text)
        if not raw:
            return None
        buffers = {str(k): str(v) for k, v in raw["buffers"].items()}
        if not buffers:
            raise SpecError(f"{PREFIX}cache names no buffers")
        return cls(buffers, str(raw["length_input"]), int(raw["axis"]))


@dataclass(frozen=True)
class ModelSpec:
    task: str
    family: str = "custom"  # the architecture: fnn, cnn, rnn, lstm, gru, gan, vae, transformer, resnet, unet
    labels: tuple[str, ...] = ()
    output_kind: str = "logits"
    input_layout: str = "features"  # one of INPUT_LAYOUTS
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    quality: Mapping[str, float] = field(default_factory=dict)
    training_data: str = ""
    description: str = ""
    exporter_version: str = ""
    # What each output means, e.g. {"logits": "next-character logits over the vocabulary"}.
    outputs: Mapping[str, str] = field(default_factory=dict)
    # Step models (RNN/LSTM/GRU state, or a key/value cache returned whole): state input -> the
    # output that feeds it on the next step, so a token costs one step, not a rerun of the prefix.
    state: Mapping[str, str] = field(default_factory=dict)
    cache: AppendCache | None = None  # Transformer LMs: a cache filled in place (see AppendCache)
    vocabulary: tuple[str, ...] = ()  # character models: token id -> text
    tokenizer: str = ""  # a `tokenizers` JSON, for word-piece and BPE models
    image_size: tuple[int, ...] = ()  # (height, width) of the images the model was trained on
    extra: Mapping[str, str] = field(default_factory=dict)  # family-specific knobs, as strings

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"{PREFIX}task is {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.input_layout not in INPUT_LAYOUTS:
            raise SpecError(
                f"{PREFIX}input_layout is {self.input_layout!r}; expected one of {', '.join(INPUT_LAYOUTS)}"
            )
        if self.output_kind not in OUTPUT_KINDS:
            raise SpecError(f"{PREFIX}output_kind is {self.output_kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")
        if self.task == "classify" and not self.labels:
            raise SpecError(f"a classify model needs {PREFIX}labels")

    def to_props(self) -> dict[str, str]:
        return {
            PREFIX + "task": self.task,
            PREFIX + "family": self.family,
            PREFIX + "labels": json.dumps(list(self.labels)),
            PREFIX + "output_kind": self.output_kind,
            PREFIX + "input_layout": self.input_layout,
            PREFIX + "preprocessing": self.preprocessing.to_json(),
            PREFIX + "quality": json.dumps(dict(self.quality)),
            PREFIX + "training_data": self.training_data,
            PREFIX + "description": self.description,
            PREFIX + "exporter_version": self.exporter_version,
            PREFIX + "outputs": json.dumps(dict(self.outputs)),
            PREFIX + "state": json.dumps(dict(self.state)),
            PREFIX + "cache": self.cache.to_json() if self.cache else "{}",
            PREFIX + "vocabulary": json.dumps(list(self.vocabulary)),
            PREFIX + "tokenizer": self.tokenizer,
            PREFIX + "image_size": json.dumps(list(self.image_size)),
            PREFIX + "extra": json.dumps(dict(self.extra)),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelSpec | None:
        """The spec in `props`, None when the model carries none; SpecError when it is broken."""
        if PREFIX + "task" not in props:
            return None

        def get(key: str, default: str = "") -> str:
            return props.get(PREFIX + key, default)

        try:
            return cls(
                task=get("task"),
                family=get("family"),
                labels=tuple(str(label) for label in json.loads(get("labels", "[]"))),
                output_kind=get("output_kind", "logits"),
                input_layout=get("input_layout", "features"),
                preprocessing=Preprocessing.from_json(get("preprocessing", "{}")),
                quality={k: float(v) for k, v in json.loads(get("quality", "{}")).items()},
                training_data=get("training_data"),
                description=get("description"),
                exporter_version=get("exporter_version"),
                outputs={str(k): str(v) for k, v in json.loads(get("outputs", "{}")).items()},
                state={str(k): str(v) for k, v in json.loads(get("state", "{}")).items()},
                cache=AppendCache.from_json(get("cache", "{}")),
                vocabulary=tuple(str(t) for t in json.loads(get("vocabulary", "[]"))),
                tokenizer=get("tokenizer"),
                image_size=tuple(int(d) for d in json.loads(get("image_size", "[]"))),
                extra={str(k): str(v) for k, v in json.loads(get("extra", "{}")).items()},
            )
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError) as error:
            if isinstance(error, SpecError):
                raise
            raise SpecError(f"unreadable {PREFIX}* metadata: {error}") from None
