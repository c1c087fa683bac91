"""`nnserve.v1.Tasks`: answers instead of tensors. Decode, one call into `tasks`, encode."""

from __future__ import annotations

from typing import Any, TypeAlias

from nnserve_client import codec
from nnserve_client._proto import tasks_pb2 as pb
from nnserve_client._proto import tasks_pb2_grpc as pb_grpc

from .. import tasks
from ..errors import InvalidInput
from ..model import OnnxModel
from ..repository import ModelRepository

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type hints


def describe(repository: ModelRepository, model: OnnxModel) -> pb.ModelDescription:
    spec = model.spec
    specs = [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs.values()]
    outputs = [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs.values()]
    return pb.ModelDescription(
        name=model.name,
        version=model.version,
        versions=[e.version for e in repository.versions(model.name) if e.model is not None],
        ready=True,
        task=spec.task if spec else "",
        family=spec.family if spec else "",
        labels=spec.labels if spec else (),
        inputs=specs,
        outputs=outputs,
        quality=dict(spec.quality) if spec else {},
        description=spec.description if spec else "",
    )


class TasksServicer(pb_grpc.TasksServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        model = self._repository.get(request.model_name, request.model_version)
        if request.WhichOneof("input") != "tensor":
            raise InvalidInput("ClassifyRequest carries no input: set `tensor`")
        batch = codec.from_raw(request.tensor.raw, request.tensor.datatype, request.tensor.shape)
        ranking = await tasks.classify(model, batch, request.top_k)
        response = pb.ClassifyResponse(model_name=model.name, model_version=model.version)
        labels = ranking.labels
        for indices, probabilities in zip(ranking.indices.tolist(), ranking.probabilities.tolist(), strict=True):
            item = response.items.add()
            for index, probability in zip(indices, probabilities, strict=True):
                label = labels[index] if index < len(labels) else str(index)
                item.top.add(label=label, index=index, probability=probability)
        return response

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse()
        for name in self._repository.names():
            if self._repository.is_ready(name):
                response.models.append(describe(self._repository, self._repository.get(name)))
            else:
                versions = self._repository.versions(name)
                response.models.add(name=name, versions=[e.version for e in versions], ready=False)
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelDescription:
        return describe(self._repository, self._repository.get(request.name, request.version))
