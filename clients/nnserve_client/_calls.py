"""Request building and response parsing, shared by `Client` and `AsyncClient`.

Each public SDK call is described once here as a `Call`: which stub method to invoke, the request,
and how to turn the response into SDK types. The two clients differ only in how they invoke it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from . import codec
from ._proto import grpc_predict_v2_pb2 as kserve
from ._proto import tasks_pb2 as tasks
from .types import Classification, LabelScore, ModelInfo, ServerInfo, TensorSpec

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    service: Literal["kserve", "tasks"]
    method: str
    request: Any
    parse: Callable[[Any], T]


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
    return Call("tasks", "ListModels", tasks.ListModelsRequest(), lambda r: [_model_info(m) for m in r.models])


def metadata(model: str, version: str) -> Call[ModelInfo]:
    return Call("tasks", "GetModel", tasks.GetModelRequest(name=model, version=version), _model_info)


def infer(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None,
    version: str,
) -> Call[dict[str, np.ndarray]]:
    request = kserve.ModelInferRequest(model_name=model, model_version=version)
    for name, value in inputs.items():
        array = np.asarray(value)
        request.inputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    return Call("kserve", "ModelInfer", request, _infer_outputs)


def classify(model: str, batch: np.ndarray, top_k: int, version: str) -> Call[list[Classification]]:
    array = np.asarray(batch)
    tensor = tasks.Tensor(datatype=codec.datatype_of(array.dtype), shape=array.shape, raw=codec.to_raw(array))
    request = tasks.ClassifyRequest(model_name=model, model_version=version, tensor=tensor, top_k=top_k)
    return Call("tasks", "Classify", request, _classifications)


def _infer_outputs(response: kserve.ModelInferResponse) -> dict[str, np.ndarray]:
    results = {}
    for index, output in enumerate(response.outputs):
        if index < len(response.raw_output_contents):
            results[output.name] = codec.from_raw(response.raw_output_contents[index], output.datatype, output.shape)
        else:
            results[output.name] = codec.from_contents(output.contents, output.datatype, output.shape)
    return results


def _classifications(response: tasks.ClassifyResponse) -> list[Classification]:
    return [
        Classification(tuple(LabelScore(s.label, s.index, s.probability) for s in item.top)) for item in response.items
    ]


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
    )
