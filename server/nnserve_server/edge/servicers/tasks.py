"""`nnserve.v1.Tasks`: answers instead of tensors. Each method decodes, makes one call into the core, encodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nnserve_contract import codec
from nnserve_contract.model_spec import ModelSpec
from nnserve_contract.stubs import tasks_pb2 as pb
from nnserve_contract.stubs import tasks_pb2_grpc as pb_grpc
from nnserve_server.core import generation, images, tasks
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.request_record import CURRENT
from nnserve_server.core.sampling import DEFAULT_MAX_TOKENS, Sampling
from nnserve_server.edge.security import visible_models
from nnserve_server.edge.servicers.deadline import Context, deadline_of
from nnserve_server.settings import Settings


def _given(request: pb.ClassifyRequest | pb.EncodeRequest) -> tasks.Given:
    which = request.WhichOneof("input")
    if which == "tensor":
        return codec.from_tensor(request.tensor)
    if which == "images":
        return tasks.EncodedImages(list(request.images.images))
    if which == "texts":
        return tasks.Texts(list(request.texts.texts))
    return None


def _sampling(request: pb.GenerateRequest) -> Sampling:
    return Sampling(
        max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )


def _ranking(model: OnnxModel, ranking: tasks.Ranking) -> pb.ClassifyResponse:
    response = pb.ClassifyResponse(model_name=model.name, model_version=model.version)
    labels = ranking.labels
    for indices, probabilities in zip(ranking.indices.tolist(), ranking.probabilities.tolist(), strict=True):
        item = response.items.add()
        for index, probability in zip(indices, probabilities, strict=True):
            label = labels[index] if index < len(labels) else str(index)
            item.top.add(label=label, index=index, probability=probability)
    return response


def _generate_event(event: object, as_tensor: bool) -> pb.GenerateResponse:
    if isinstance(event, generation.TextPiece):
        return pb.GenerateResponse(text=event.text)
    if isinstance(event, generation.Picture):
        image = pb.GeneratedImage(index=event.index, label=event.label)
        if as_tensor:
            image.tensor.CopyFrom(codec.to_tensor(event.pixels))
        else:
            image.png = images.encode_png(event.pixels)
        return pb.GenerateResponse(image=image)
    assert isinstance(event, generation.Finished)
    done = pb.GenerateDone(
        finish_reason=event.reason,
        prompt_tokens=event.prompt_tokens,
        generated_tokens=event.generated_tokens,
        samples=event.samples,
    )
    return pb.GenerateResponse(done=done)


def describe(repository: ModelRepository, model: OnnxModel) -> pb.ModelDescription:
    spec = model.spec
    specs = [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs.values()]
    outputs = [pb.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs.values()]
    image = tasks.image_shape(model)
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
        image=pb.ImageInput(height=image[0], width=image[1], channels=image[2]) if image else None,
        text=tasks.takes_text(model),
        task_input=_task_input(spec) if spec else None,
    )


def _task_input(spec: ModelSpec) -> pb.TaskInput:
    """What a task API tensor holds: natural units, and how they become the network's input."""
    scaling = spec.preprocessing
    return pb.TaskInput(
        layout=spec.input_layout,
        scale=scaling.scale,
        full_scale=1.0 / scaling.scale if scaling.scale else 0.0,
        mean=scaling.mean,
        std=scaling.std,
    )


class TasksServicer(pb_grpc.TasksServicer):
    def __init__(
        self, repository: ModelRepository, settings: Settings, generations: generation.Generations | None = None
    ) -> None:
        self._repository = repository
        self._limits = tasks.Limits.from_settings(settings)
        if generations is None:  # a servicer of its own (tests); the app shares one with KServe's
            generations = generation.Generations(generation.GenerationSettings.from_settings(settings))
        self._generations = generations

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        model = self._repository.get(request.model_name, request.model_version)
        ranking = await tasks.classify(model, _given(request), request.top_k, self._limits, deadline_of(context))
        return _ranking(model, ranking)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        model = self._repository.get(request.model_name, request.model_version)
        events: AsyncIterator[Any]
        if request.prompt:
            sampling = _sampling(request)
            events = self._generations.text(model, request.prompt, sampling, limits=self._limits)
        else:
            latent = codec.from_tensor(request.latent) if request.HasField("latent") else None
            label = request.label if request.HasField("label") else None
            seed = request.seed if request.HasField("seed") else None
            events = generation.generate_images(model, request.num_samples or 1, seed, latent, label, self._limits)
        as_tensor = request.image_format == pb.IMAGE_FORMAT_TENSOR
        record = CURRENT.get()
        async for event in events:
            if record is not None and isinstance(event, generation.Finished):
                record.tokens = event.generated_tokens  # for nnserve_generated_tokens
            yield _generate_event(event, as_tensor)

    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        model = self._repository.get(request.model_name, request.model_version)
        vectors = await tasks.encode(model, _given(request), request.normalize, self._limits, deadline_of(context))
        response = pb.EncodeResponse(model_name=model.name, model_version=model.version)
        response.embeddings.CopyFrom(codec.to_tensor(vectors.main))
        for name, array in vectors.others.items():
            response.others[name].CopyFrom(codec.to_tensor(array))
        return response

    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        model = self._repository.get(request.model_name, request.model_version)
        which = request.WhichOneof("input")
        given = request.image if which == "image" else codec.from_tensor(request.tensor) if which == "tensor" else None
        mask = await tasks.segment(model, given, self._limits, deadline_of(context))
        height, width = mask.classes.shape
        return pb.SegmentResponse(
            model_name=model.name,
            model_version=model.version,
            height=height,
            width=width,
            mask=mask.classes.tobytes(),
            mask_png=images.encode_png(mask.classes) if request.png else b"",
            labels=mask.labels,
            pixel_counts=mask.pixel_counts.tolist(),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse()
        for name in visible_models(self._repository.names()):
            if self._repository.is_ready(name):
                response.models.append(describe(self._repository, self._repository.get(name)))
            else:
                versions = self._repository.versions(name)
                response.models.add(name=name, versions=[e.version for e in versions], ready=False)
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelDescription:
        return describe(self._repository, self._repository.get(request.name, request.version))
