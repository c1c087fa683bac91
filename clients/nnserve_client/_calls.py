"""Request building and response parsing, shared by `Client` and `AsyncClient`.

Each public SDK call is described once here as a `Call`: which stub method to invoke, the request,
and how to turn the response into SDK types. The two clients differ only in how they invoke it.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as kserve
from nnserve_contract.stubs import tasks_pb2 as tasks

from .types import (
    Classification,
    Classifications,
    Embeddings,
    GeneratedImage,
    GenerateEvent,
    GenerationDone,
    InferResult,
    LabelScore,
    ModelInfo,
    ModelList,
    Segmentation,
    ServerInfo,
    ServerTiming,
    TaskInput,
    TensorSpec,
    TextPiece,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    service: Literal["kserve", "tasks"]
    method: str
    request: Any
    parse: Callable[[Any], T]
    timed: bool = False  # the result carries the server's timing, from the call's trailing metadata

    def result(self, response: Any, trailing_metadata: Any) -> T:
        """The parsed response, with `timing` set from the trailing metadata when the call is timed."""
        parsed = self.parse(response)
        timing = ServerTiming.from_metadata(trailing_metadata)
        if isinstance(parsed, InferResult | Classifications):
            parsed.timing = timing
            return parsed
        if dataclasses.is_dataclass(parsed) and not isinstance(parsed, type):
            return dataclasses.replace(parsed, timing=timing)  # type: ignore[return-value]
        return parsed


def live() -> Call[bool]:
    return Call("kserve", "ServerLive", kserve.ServerLiveRequest(), lambda r: bool(r.live))


def ready() -> Call[bool]:
    return Call("kserve", "ServerReady", kserve.ServerReadyRequest(), lambda r: bool(r.ready))


def model_ready(model: str, version: str) -> Call[bool]:
    request = kserve.ModelReadyRequest(name=model, version=version)
    return Call("kserve", "ModelReady", request, lambda r: bool(r.ready))


def server_info() -> Call[ServerInfo]:
    return Call(
        "kserve",
        "ServerMetadata",
        kserve.ServerMetadataRequest(),
        lambda r: ServerInfo(r.name, r.version, tuple(r.extensions)),
    )


def models() -> Call[list[ModelInfo]]:
    return Call("tasks", "ListModels", tasks.ListModelsRequest(), lambda r: ModelList(_model_info(m) for m in r.models))


def metadata(model: str, version: str) -> Call[ModelInfo]:
    return Call("tasks", "GetModel", tasks.GetModelRequest(name=model, version=version), _model_info)


def infer(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None,
    version: str,
) -> Call[InferResult]:
    request = kserve.ModelInferRequest(model_name=model, model_version=version)
    for name, value in inputs.items():
        array = np.asarray(value)
        request.inputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    return Call("kserve", "ModelInfer", request, _infer_outputs, timed=True)


ImageLike = Any  # encoded bytes, a file path, or a PIL image
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # what a PNG or a JPEG file begins with


def image_bytes(image: ImageLike) -> bytes:
    """PNG/JPEG bytes from bytes, a file path or a PIL image (Pillow is only needed for the last)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
        if not data.startswith(IMAGE_SIGNATURES):
            raise ValueError(f"{image} is not a PNG or JPEG file (its first bytes are {data[:8]!r})")
        return data
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be bytes, a path or a PIL image, not {type(image).__name__}")


def _is_image(value: Any) -> bool:
    """An encoded image, a path or a PIL image (or a list of them), as opposed to an array of numbers."""
    if isinstance(value, list | tuple) and value:
        return all(_is_image(v) for v in value)
    return isinstance(value, bytes | bytearray | str | os.PathLike) or hasattr(value, "save")


def _images(images: ImageLike | Sequence[ImageLike]) -> tasks.ImageBatch:
    items = [images] if isinstance(images, bytes | str | os.PathLike) or hasattr(images, "save") else images
    return tasks.ImageBatch(images=[image_bytes(i) for i in items])  # type: ignore[union-attr]


def _texts(texts: str | Sequence[str]) -> tasks.TextBatch:
    return tasks.TextBatch(texts=[texts] if isinstance(texts, str) else list(texts))


def _set_input(request: Any, batch: np.ndarray | None, images: Any, texts: Any) -> None:
    if batch is not None and images is None and _is_image(batch):
        batch, images = None, batch  # classify(model, "seven.png"): an image where the batch goes
    given = [name for name, value in (("batch", batch), ("images", images), ("texts", texts)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of batch, images or texts (got {given or 'none'})")
    if batch is not None:
        request.tensor.CopyFrom(codec.to_tensor(batch))
    elif images is not None:
        request.images.CopyFrom(_images(images))
    else:
        request.texts.CopyFrom(_texts(texts))


def classify(
    model: str, batch: np.ndarray | None, images: Any, texts: Any, top_k: int, version: str
) -> Call[Classifications]:
    request = tasks.ClassifyRequest(model_name=model, model_version=version, top_k=top_k)
    _set_input(request, batch, images, texts)
    return Call("tasks", "Classify", request, _classifications, timed=True)


class SamplingOptions(TypedDict, total=False):
    """How a language model's text is drawn (`generate_text`; `generate` with a prompt)."""

    max_tokens: int  # tokens to generate; 0: the server's default (64)
    temperature: float  # 0: greedy
    top_k: int  # sample from the k likeliest tokens; 0: all
    top_p: float  # sample from the smallest set holding p; 0 or 1: all
    seed: int | None  # the same seed gives the same output; None: random
    stop: Sequence[str]  # stop strings: generation ends before any of them


class GenerateOptions(SamplingOptions, total=False):
    """What `generate` takes: a prompt and its sampling, or images to draw (num_samples, label, latent)."""

    prompt: str  # text to continue (language models)
    num_samples: int  # images to draw (image generators)
    latent: np.ndarray | None  # VAE: latents to decode, [n, latent size]
    label: int | None  # class to draw (conditional generators)
    as_tensor: bool  # images as float arrays instead of PNGs


def generate(
    model: str,
    version: str,
    *,
    prompt: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    num_samples: int = 0,
    latent: np.ndarray | None = None,
    label: int | None = None,
    as_tensor: bool = False,
) -> Call[GenerateEvent]:
    request = tasks.GenerateRequest(
        model_name=model,
        model_version=version,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        num_samples=num_samples,
        image_format=tasks.IMAGE_FORMAT_TENSOR if as_tensor else tasks.IMAGE_FORMAT_PNG,
    )
    if seed is not None:
        request.seed = seed
    if label is not None:
        request.label = label
    if latent is not None:
        request.latent.CopyFrom(codec.to_tensor(np.asarray(latent, dtype=np.float32)))
    return Call("tasks", "Generate", request, _generate_event)


def encode(
    model: str, batch: np.ndarray | None, images: Any, texts: Any, normalize: bool, version: str
) -> Call[Embeddings]:
    request = tasks.EncodeRequest(model_name=model, model_version=version, normalize=normalize)
    _set_input(request, batch, images, texts)
    return Call("tasks", "Encode", request, _embeddings, timed=True)


def segment(model: str, image: ImageLike | np.ndarray, png: bool, version: str) -> Call[Segmentation]:
    request = tasks.SegmentRequest(model_name=model, model_version=version, png=png)
    if isinstance(image, np.ndarray):
        request.tensor.CopyFrom(codec.to_tensor(image))
    else:
        request.image = image_bytes(image)
    return Call("tasks", "Segment", request, _segmentation, timed=True)


def _generate_event(message: tasks.GenerateResponse) -> GenerateEvent:
    kind = message.WhichOneof("event")
    if kind == "text":
        return TextPiece(message.text)
    if kind == "image":
        image = message.image
        pixels = codec.from_tensor(image.tensor) if image.HasField("tensor") else None
        return GeneratedImage(image.index, image.png or None, pixels, image.label)
    done = message.done
    return GenerationDone(done.finish_reason, done.prompt_tokens, done.generated_tokens, done.samples)


def _embeddings(response: tasks.EncodeResponse) -> Embeddings:
    return Embeddings(
        codec.from_tensor(response.embeddings), {k: codec.from_tensor(v) for k, v in response.others.items()}
    )


def _segmentation(response: tasks.SegmentResponse) -> Segmentation:
    mask = np.frombuffer(response.mask, dtype=np.uint8).reshape(response.height, response.width)
    counts = dict(zip(response.labels, (int(c) for c in response.pixel_counts), strict=True))
    return Segmentation(mask, tuple(response.labels), counts, response.mask_png or None)


def _infer_outputs(response: kserve.ModelInferResponse) -> InferResult:
    results = InferResult()
    for index, output in enumerate(response.outputs[:]):  # a slice: cheaper than iterating (upb)
        if index < len(response.raw_output_contents):
            results[output.name] = codec.from_raw(response.raw_output_contents[index], output.datatype, output.shape)
        else:
            results[output.name] = codec.from_contents(output.contents, output.datatype, output.shape)
    return results


def _classifications(response: tasks.ClassifyResponse) -> Classifications:
    return Classifications(
        Classification(tuple(LabelScore(s.label, s.index, s.probability) for s in item.top)) for item in response.items
    )


def _specs(specs: Iterable[tasks.TensorSpec]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in specs)


def _model_info(m: tasks.ModelDescription) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        version=m.version,
        versions=tuple(m.versions),
        ready=m.ready,
        task=m.task,
        family=m.family,
        labels=tuple(m.labels),
        inputs=_specs(m.inputs),
        outputs=_specs(m.outputs),
        quality=dict(m.quality),
        description=m.description,
        image=(m.image.height, m.image.width, m.image.channels) if m.HasField("image") else None,
        text=m.text,
        task_input=TaskInput(
            m.task_input.layout,
            m.task_input.scale,
            m.task_input.full_scale,
            tuple(m.task_input.mean),
            tuple(m.task_input.std),
        )
        if m.HasField("task_input")
        else None,
    )
