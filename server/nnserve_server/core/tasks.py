"""Task logic on numpy arrays: pre-processing, the model call, post-processing; no protobuf here.

Everything a task needs to know about a model comes from the `ModelSpec` in its ONNX metadata.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from nnserve_contract.codec import DTYPES
from nnserve_contract.model_spec import ModelSpec, Preprocessing
from nnserve_server.core import images
from nnserve_server.core.errors import InvalidInput
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.text import check_texts, word_pieces
from nnserve_server.settings import Settings

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000


@dataclass(frozen=True)
class Limits:
    """What one task request may ask for, checked before anything is allocated (from the settings)."""

    max_image_pixels: int
    max_text_chars: int
    max_tokens: int
    max_samples: int
    max_request_pixels: int
    max_segment_pixels: int = 2048 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_image_pixels,
            settings.max_text_chars,
            settings.max_tokens,
            settings.max_samples,
            settings.max_request_pixels,
            settings.max_segment_pixels,
        )


@dataclass(frozen=True)
class EncodedImages:
    """PNG or JPEG files, one item each."""

    items: list[bytes]


@dataclass(frozen=True)
class Texts:
    items: list[str]


# What a Classify or Encode request carries, decoded from the wire: a tensor in natural units, encoded
# images or texts; None when it carries nothing.
Given: TypeAlias = "np.ndarray | EncodedImages | Texts | None"


def tasks_of(model: OnnxModel) -> list[str]:
    """The tasks a model answers: its own, and encode for a classifier that exports `features`."""
    if model.spec is None:
        return []
    return [model.spec.task] + (["encode"] if model.spec.task != "encode" and "features" in model.outputs else [])


def require_task(model: OnnxModel, task: str) -> ModelSpec:
    spec = model.spec
    if spec is None:
        raise InvalidInput(
            f"model '{model.name}' carries no nnserve metadata, so it serves no task; call it through "
            "KServe v2 ModelInfer"
        )
    if task not in tasks_of(model):
        does = " and ".join(f"'{t}'" for t in tasks_of(model))
        raise InvalidInput(f"model '{model.name}' does the task {does}, not '{task}'")
    return spec


async def inputs_of(model: OnnxModel, spec: ModelSpec, given: Given, limits: Limits, rpc: str) -> dict[str, np.ndarray]:
    """The model's inputs from whichever of tensor, images or texts the request carries. Images are decoded
    in a worker thread (a large one takes long enough to stall every other call on the loop), once their
    headers say they fit the request's pixel budget."""
    if isinstance(given, np.ndarray):
        return tensor_inputs(model, spec, given)
    if isinstance(given, EncodedImages):
        images.within_budget(given.items, limits.max_image_pixels, limits.max_request_pixels)
        return await asyncio.to_thread(image_inputs, model, spec, given.items, limits.max_image_pixels)
    if isinstance(given, Texts):
        return text_inputs(model, spec, given.items, limits.max_text_chars)
    raise InvalidInput(f"{rpc}Request carries no input: set tensor, images or texts")


def preprocess(batch: np.ndarray, prep: Preprocessing, layout: str) -> np.ndarray:
    """(x * scale - mean) / std in float32; per-channel statistics broadcast over NCHW images."""
    x = batch.astype(np.float32) * np.float32(prep.scale)
    shape = (1, -1, 1, 1) if layout == "NCHW" and batch.ndim == 4 else (1, -1)
    if prep.mean:
        x -= np.asarray(prep.mean, dtype=np.float32).reshape(shape if len(prep.mean) > 1 else (1,))
    if prep.std:
        x /= np.asarray(prep.std, dtype=np.float32).reshape(shape if len(prep.std) > 1 else (1,))
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


@dataclass(frozen=True)
class Ranking:
    """For each item, the top-k class indices and their probabilities, most probable first."""

    indices: np.ndarray  # (items, k) int64
    probabilities: np.ndarray  # (items, k) float32
    labels: tuple[str, ...]


def full_scale(spec: ModelSpec) -> float:
    """The natural-units value an image's 255 maps to: what the preprocessing scales to 1."""
    return 1.0 / spec.preprocessing.scale


def tensor_inputs(model: OnnxModel, spec: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
    """A batch in natural units, preprocessed and typed for the model's single input.

    Image models also take arrays as people hold images: (H, W), (N, H, W), and channels last
    ((H, W, C), (N, H, W, C), as PIL gives them); one item may come without its batch dimension."""
    if len(model.inputs) != 1:
        raise InvalidInput(f"model '{model.name}' takes inputs {list(model.inputs)}, not one tensor")
    (input_spec,) = model.inputs.values()
    if batch.dtype.kind not in "biuf":
        raise InvalidInput(f"the tensor must be numeric; got {batch.dtype}")
    sent = list(batch.shape)
    image = image_shape(model)
    if image is not None and image[0]:
        batch = _image_layout(batch, image, spec.input_layout)
    if batch.ndim == len(input_spec.shape) - 1:
        batch = batch[np.newaxis]  # one item without its batch dimension
    expected = list(input_spec.shape)
    if batch.ndim != len(expected) or any(e >= 0 and d != e for d, e in zip(batch.shape, expected, strict=False)):
        shown = (
            "[" + ", ".join("n" if i == 0 and d < 0 else "?" if d < 0 else str(d) for i, d in enumerate(expected)) + "]"
        )
        also = f" (or images as [n, {image[0]}, {image[1]}] or [{image[0]}, {image[1]}])" if image and image[0] else ""
        raise InvalidInput(f"the tensor has shape {sent}; model '{model.name}' takes {shown}{also}")
    x = preprocess(batch, spec.preprocessing, spec.input_layout).astype(DTYPES[input_spec.datatype], copy=False)
    return {input_spec.name: x}


def _image_layout(batch: np.ndarray, image: tuple[int, int, int], layout: str) -> np.ndarray:
    """Image-shaped arrays in the layout the model reads; anything else is left for the shape check."""
    height, width, channels = image
    if layout == "NCHW":
        if batch.ndim == 2 and channels == 1:
            return batch[np.newaxis, np.newaxis]  # (H, W)
        if batch.ndim == 3 and channels == 1 and batch.shape[1:] == (height, width):
            return batch[:, np.newaxis]  # (N, H, W)
        if batch.ndim == 3 and batch.shape == (height, width, channels) and channels > 1:
            return batch.transpose(2, 0, 1)[np.newaxis]  # (H, W, C)
        if batch.ndim == 4 and batch.shape[1:] == (height, width, channels) and channels > 1:
            return batch.transpose(0, 3, 1, 2)  # (N, H, W, C)
        return batch
    if batch.ndim >= 2 and batch.shape[-2:] == (height, width) and channels == 1:
        rows = batch.reshape(-1, height, width)
        return rows.reshape(len(rows), -1) if layout == "features" else rows
    return batch


_IMAGE_RANK = {"NCHW": 4, "features": 2, "sequence": 3}  # input rank of each layout that can read images


def image_shape(model: OnnxModel) -> tuple[int, int, int] | None:
    """(height, width, channels) of the images the task API takes for `model` (0, 0: any size), or None.

    NCHW models take images; a `features` or `sequence` model takes them when its metadata names the
    image size it was trained on (the FNN reads a digit flattened, the RNN one row per step)."""
    spec = model.spec
    if spec is None or len(model.inputs) != 1:
        return None
    input_spec = next(iter(model.inputs.values()))
    rank = _IMAGE_RANK.get(spec.input_layout)
    if rank != len(input_spec.shape) or not (spec.input_layout == "NCHW" or len(spec.image_size) == 2):
        return None
    channels = input_spec.shape[1] if rank == 4 and input_spec.shape[1] > 0 else 1
    height, width = spec.image_size if len(spec.image_size) == 2 and spec.task != "segment" else (0, 0)
    return height, width, channels  # a segmenter takes any size (padded to its stride, cropped back)


def takes_text(model: OnnxModel) -> bool:
    return model.spec is not None and bool(model.spec.tokenizer or model.spec.vocabulary)


def image_inputs(model: OnnxModel, spec: ModelSpec, encoded: list[bytes], max_pixels: int) -> dict[str, np.ndarray]:
    """Encoded images decoded, resized to the model's image size and preprocessed, as one batch, in the
    layout the model reads them: NCHW as they are, `features` flattened row by row, `sequence` one
    step per row (each step a row's pixels, channels interleaved)."""
    if not encoded:
        raise InvalidInput("no images given; send at least one")
    shape = image_shape(model)
    if shape is None:
        raise InvalidInput(f"model '{model.name}' does not take images")
    top = full_scale(spec)
    decoded = np.stack(
        [
            images.decode(data, channels=shape[2], size=spec.image_size, max_pixels=max_pixels, top=top)
            for data in encoded
        ]
    )
    if spec.input_layout == "features":
        decoded = decoded.reshape(len(decoded), -1)
    elif spec.input_layout == "sequence":
        decoded = decoded.transpose(0, 2, 3, 1).reshape(len(decoded), decoded.shape[2], -1)
    return tensor_inputs(model, spec, decoded)


def text_inputs(model: OnnxModel, spec: ModelSpec, texts: list[str], max_chars: int) -> dict[str, np.ndarray]:
    if not spec.tokenizer:
        raise InvalidInput(f"model '{model.name}' does not take text")
    check_texts(texts, max_chars)
    ids, mask = word_pieces(spec, texts, int(spec.extra.get("max_length", "512")))
    return {"input_ids": ids, "attention_mask": mask}


async def classify(
    model: OnnxModel, given: Given, top_k: int, limits: Limits, deadline: float | None = None
) -> Ranking:
    if top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k is {top_k}; at most {MAX_TOP_K}")
    spec = require_task(model, "classify")
    inputs = await inputs_of(model, spec, given, limits, "Classify")
    first_output = next(iter(model.outputs))
    (scores,) = (await model.infer(inputs, [first_output], deadline)).values()
    if scores.ndim != 2:
        raise InvalidInput(f"model '{model.name}' returns scores of shape {list(scores.shape)}, not (items, classes)")
    probabilities = softmax(scores.astype(np.float32)) if spec.output_kind == "logits" else scores
    k = min(top_k or DEFAULT_TOP_K, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return Ranking(order, np.take_along_axis(probabilities, order, axis=1), spec.labels)


@dataclass(frozen=True)
class Vectors:
    main: np.ndarray  # float32 [items, dimensions]
    others: dict[str, np.ndarray]


async def encode(
    model: OnnxModel, given: Given, normalize: bool, limits: Limits, deadline: float | None = None
) -> Vectors:
    """The model's vectors: the first output of an encode model, or a classifier's `features`."""
    spec = require_task(model, "encode")
    results = await model.infer(await inputs_of(model, spec, given, limits, "Encode"), (), deadline)
    name = next(iter(model.outputs)) if spec.task == "encode" else "features"
    vectors = {n: v.astype(np.float32) for n, v in results.items() if v.ndim == 2}
    main = vectors.pop(name)
    if normalize:
        main = main / np.maximum(np.linalg.norm(main, axis=1, keepdims=True), 1e-12)
    return Vectors(main, vectors if spec.task == "encode" else {})


@dataclass(frozen=True)
class Mask:
    classes: np.ndarray  # uint8 [height, width]
    labels: tuple[str, ...]
    pixel_counts: np.ndarray  # per class


def segment_image(model: OnnxModel, spec: ModelSpec, given: bytes | np.ndarray | None, max_pixels: int) -> np.ndarray:
    """The image to segment, [channels, height, width] in natural units: an encoded file decoded, or a tensor
    of [height, width] or [channels, height, width]."""
    if isinstance(given, bytes):
        shape = image_shape(model)
        channels = shape[2] if shape is not None else 1
        return images.decode(given, channels=channels, size=(), max_pixels=max_pixels, top=full_scale(spec))
    if isinstance(given, np.ndarray):
        if given.dtype.kind not in "biuf":
            raise InvalidInput(f"the tensor must be numeric; got {given.dtype}")
        image = given.astype(np.float32)[np.newaxis] if given.ndim == 2 else given.astype(np.float32)
        if image.ndim != 3:
            raise InvalidInput(f"the tensor has shape {list(given.shape)}; send [height, width] or [1, height, width]")
        return image
    raise InvalidInput("SegmentRequest carries no input: set image or tensor")


def _too_large_to_segment(width: int, height: int, most: int) -> InvalidInput:
    return InvalidInput(
        f"image is {width}x{height} pixels; at most {most} are segmented (--max-segment-pixels): send it in tiles"
    )


async def segment(
    model: OnnxModel, given: bytes | np.ndarray | None, limits: Limits, deadline: float | None = None
) -> Mask:
    """An image (encoded, or a tensor in natural units) padded to the stride, segmented, cropped back."""
    spec = require_task(model, "segment")
    most = min(limits.max_image_pixels, limits.max_segment_pixels)
    if isinstance(given, bytes):
        ((width, height),) = images.within_budget([given], limits.max_image_pixels, limits.max_request_pixels)
        if width * height > most:
            raise _too_large_to_segment(width, height, most)
    image = await asyncio.to_thread(segment_image, model, spec, given, most)
    channels, height, width = image.shape
    if height * width > most:
        raise _too_large_to_segment(width, height, most)
    if height == 0 or width == 0:
        raise InvalidInput("the image is empty")
    stride = int(spec.extra.get("stride", "1"))
    padded_h, padded_w = -(-height // stride) * stride, -(-width // stride) * stride
    padded = np.zeros((1, channels, padded_h, padded_w), np.float32)
    padded[0, :, :height, :width] = image
    inputs = tensor_inputs(model, spec, padded)
    (logits,) = (await model.infer(inputs, [next(iter(model.outputs))], deadline)).values()
    classes = logits[0, :, :height, :width].argmax(axis=0).astype(np.uint8)
    return Mask(classes, spec.labels, np.bincount(classes.reshape(-1), minlength=len(spec.labels)))
