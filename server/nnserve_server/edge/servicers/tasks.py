"""`nnserve.v1.Tasks`: answers instead of tensors. Decode, one call into `tasks`, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import tasks_pb2 as pb
from nnserve_contract.stubs import tasks_pb2_grpc as pb_grpc
from nnserve_server.core import generation, images, tasks
from nnserve_server.core.errors import InvalidInput
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.request_record import CURRENT
from nnserve_server.edge.servicers.deadline import deadline_of
from nnserve_server.settings import Settings

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpc ships no type hints
DEFAULT_MAX_TOKENS = 64
MAX_TOP_K = 1000


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
    )


class TasksServicer(pb_grpc.TasksServicer):
    def __init__(
        self, repository: ModelRepository, settings: Settings, budget: generation.MemoryBudget | None = None
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._budget = budget

    def _inputs(self, model: OnnxModel, request: Any, rpc: str) -> dict[str, np.ndarray]:
        """The model's inputs from whichever of tensor, images or texts the request carries."""
        spec = model.spec
        which = request.WhichOneof("input")
        if spec is None:
            tasks.require_task(model, rpc.lower())  # raises: a plain ONNX model serves no task
        assert spec is not None
        if which == "tensor":
            return tasks.tensor_inputs(model, spec, codec.from_tensor(request.tensor))
        if which == "images":
            return tasks.image_inputs(model, spec, list(request.images.images), self._settings.max_image_pixels)
        if which == "texts":
            return tasks.text_inputs(model, spec, list(request.texts.texts), self._settings.max_text_chars)
        raise InvalidInput(f"{rpc}Request carries no input: set tensor, images or texts")

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        model = self._repository.get(request.model_name, request.model_version)
        if request.top_k > MAX_TOP_K:
            raise InvalidInput(f"top_k is {request.top_k}; at most {MAX_TOP_K}")
        tasks.require_task(model, "classify")
        ranking = await tasks.classify(
            model, self._inputs(model, request, "Classify"), request.top_k, deadline_of(context)
        )
        response = pb.ClassifyResponse(model_name=model.name, model_version=model.version)
        labels = ranking.labels
        for indices, probabilities in zip(ranking.indices.tolist(), ranking.probabilities.tolist(), strict=True):
            item = response.items.add()
            for index, probability in zip(indices, probabilities, strict=True):
                label = labels[index] if index < len(labels) else str(index)
                item.top.add(label=label, index=index, probability=probability)
        return response

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        model = self._repository.get(request.model_name, request.model_version)
        seed = request.seed if request.HasField("seed") else None
        events: AsyncIterator[Any]
        if request.prompt:
            if len(request.prompt) > self._settings.max_text_chars:
                raise InvalidInput(
                    f"the prompt has {len(request.prompt)} characters; at most {self._settings.max_text_chars}"
                )
            sampling = generation.Sampling(
                max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                seed=seed,
                stop=tuple(request.stop),
            )
            generation.check_sampling(sampling, self._settings.max_tokens)
            events = generation.generate_text(model, request.prompt, sampling, self._budget, self._settings.decoding())
        else:
            count = request.num_samples or 1
            if count > self._settings.max_samples:
                raise InvalidInput(f"num_samples is {count}; this server allows at most {self._settings.max_samples}")
            latent = codec.from_tensor(request.latent) if request.HasField("latent") else None
            label = request.label if request.HasField("label") else None
            events = generation.generate_images(model, count, seed, latent, label)
        as_tensor = request.image_format == pb.IMAGE_FORMAT_TENSOR
        record = CURRENT.get()
        async for event in events:
            if record is not None and isinstance(event, generation.Finished):
                record.tokens = event.generated_tokens  # for nnserve_generated_tokens
            yield _generate_event(event, as_tensor)

    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        model = self._repository.get(request.model_name, request.model_version)
        vectors = await tasks.encode(
            model, self._inputs(model, request, "Encode"), request.normalize, deadline_of(context)
        )
        response = pb.EncodeResponse(model_name=model.name, model_version=model.version)
        response.embeddings.CopyFrom(codec.to_tensor(vectors.main))
        for name, array in vectors.others.items():
            response.others[name].CopyFrom(codec.to_tensor(array))
        return response

    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        model = self._repository.get(request.model_name, request.model_version)
        spec = tasks.require_task(model, "segment")
        which = request.WhichOneof("input")
        if which == "image":
            channels = max(model.inputs[next(iter(model.inputs))].shape[1], 1)
            image = images.decode(
                request.image, channels=channels, size=(), max_pixels=self._settings.max_image_pixels,
                top=tasks.full_scale(spec),
            )  # fmt: skip
        elif which == "tensor":
            image = codec.from_tensor(request.tensor).astype(np.float32)
            if image.ndim == 2:
                image = image[np.newaxis]
            if image.ndim != 3:
                raise InvalidInput(
                    f"the tensor has shape {list(image.shape)}; send [height, width] or [1, height, width]"
                )
        else:
            raise InvalidInput("SegmentRequest carries no input: set image or tensor")
        mask = await tasks.segment(model, image, self._settings.max_image_pixels, deadline_of(context))
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
        for name in self._repository.names():
            if self._repository.is_ready(name):
                response.models.append(describe(self._repository, self._repository.get(name)))
            else:
                versions = self._repository.versions(name)
                response.models.add(name=name, versions=[e.version for e in versions], ready=False)
        return response

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelDescription:
        return describe(self._repository, self._repository.get(request.name, request.version))
