"""Task logic on numpy arrays: pre-processing, the model call, post-processing; no protobuf here.

Everything a task needs to know about a model comes from the `ModelSpec` in its ONNX metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnserve_client.codec import DTYPES
from nnserve_client.model_spec import ModelSpec, Preprocessing

from .errors import InvalidInput
from .model import OnnxModel

DEFAULT_TOP_K = 5


def require_task(model: OnnxModel, task: str) -> ModelSpec:
    spec = model.spec
    if spec is None:
        raise InvalidInput(
            f"model '{model.name}' carries no nnserve metadata, so it serves no task; call it through "
            "KServe v2 ModelInfer"
        )
    if spec.task != task:
        raise InvalidInput(f"model '{model.name}' does the task '{spec.task}', not '{task}'")
    return spec


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


async def classify(model: OnnxModel, batch: np.ndarray, top_k: int) -> Ranking:
    spec = require_task(model, "classify")
    (input_spec,) = model.inputs.values()
    if batch.dtype.kind not in "biuf":
        raise InvalidInput(f"Classify takes a numeric tensor; got {batch.dtype}")
    if batch.ndim == len(input_spec.shape) - 1:
        batch = batch[np.newaxis]  # one item without its batch dimension
    x = preprocess(batch, spec.preprocessing, spec.input_layout).astype(DTYPES[input_spec.datatype], copy=False)
    first_output = next(iter(model.outputs))
    (scores,) = (await model.infer({input_spec.name: x}, [first_output])).values()
    if scores.ndim != 2:
        raise InvalidInput(f"model '{model.name}' returns scores of shape {list(scores.shape)}, not (items, classes)")
    probabilities = softmax(scores.astype(np.float32)) if spec.output_kind == "logits" else scores
    k = min(top_k or DEFAULT_TOP_K, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return Ranking(order, np.take_along_axis(probabilities, order, axis=1), spec.labels)
