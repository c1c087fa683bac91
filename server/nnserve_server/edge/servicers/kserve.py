"""`inference.GRPCInferenceService`: KServe v2 / Open Inference Protocol, as Triton's clients speak it.

Each method decodes with the codec, makes one call into the repository or model, and encodes.
Inputs and outputs may live in system shared memory (`shared_memory.py`); CUDA shared memory answers
UNIMPLEMENTED, as do the RPCs not overridden here (trace, log settings). ModelStreamInfer and language
models in Triton's LLM convention are in `streaming.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_server import __version__
from nnserve_server.core import classification
from nnserve_server.core.errors import InvalidInput, Unsupported
from nnserve_server.core.generation import Generations
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.shared_memory import Region, SharedMemoryRegions
from nnserve_server.core.tasks import Limits
from nnserve_server.edge.guard import StatusGuard
from nnserve_server.edge.security import visible_models
from nnserve_server.edge.servicers import plain, streaming
from nnserve_server.edge.servicers.deadline import Context, deadline_of
from nnserve_server.edge.servicers.model_views import PLATFORM, model_config, model_statistics

EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")
SHARED_MEMORY_EXTENSION = "system_shared_memory"
REGION, OFFSET, BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"
SHARED_MEMORY = (REGION, OFFSET, BYTE_SIZE)
SHARED_MEMORY_OFF = (
    "this server does not serve system shared memory: it is off unless --shared-memory is given, with --workers "
    "above 1 (each worker process would hold its own registrations), and with --auth-token-file unless "
    "--shared-memory-with-auth is given"
)
CUDA_SHARED_MEMORY_OFF = "this server does not serve CUDA shared memory; system shared memory it does"


class ServerState:
    """Whether the server takes traffic: ready after start-up, not ready once draining; with strict
    readiness (`--strict-readiness`), only while every model of the repository is ready too."""

    def __init__(self, models_ready: Callable[[], bool] | None = None) -> None:
        self.ready = False
        self._models_ready = models_ready  # None: readiness does not wait for the models

    @property
    def serving(self) -> bool:
        return self.ready and (self._models_ready is None or self._models_ready())


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    # Slices, not iterators: iterating a protobuf repeated field costs several times a slice (upb).
    tensors, raw = request.inputs[:], request.raw_input_contents[:]
    arrays: dict[str, np.ndarray] = {}
    if not raw:
        for tensor in tensors:
            name = _unique(tensor.name, arrays)
            if tensor.parameters:
                _refuse_parameters(f"input '{name}'", tensor.parameters, ())
            arrays[name] = codec.from_contents(tensor.contents, tensor.datatype, tensor.shape)
        return arrays
    if len(raw) != len(tensors):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send one per input")
    for tensor, contents in zip(tensors, raw, strict=True):
        name = _unique(tensor.name, arrays)
        if tensor.parameters:
            _refuse_parameters(f"input '{name}'", tensor.parameters, ())
        if tensor.HasField("contents"):
            raise InvalidInput(f"input '{name}' has typed contents as well as raw_input_contents; use one")
        arrays[name] = codec.from_raw(contents, tensor.datatype, tensor.shape)
    return arrays


def region_names(request: pb.ModelInferRequest) -> list[str]:
    """The shared-memory regions a request names (usually none: two cheap loops)."""
    names = []
    for tensors in (request.inputs[:], request.outputs[:]):
        for tensor in tensors:
            if tensor.parameters and REGION in tensor.parameters:
                region = tensor.parameters[REGION]
                if region.WhichOneof("parameter_choice") != "string_param":
                    raise InvalidInput(f"tensor '{tensor.name}': '{REGION}' must be a string_param")
                names.append(region.string_param)
    return names


def decode_shared_inputs(request: pb.ModelInferRequest, regions: Mapping[str, Region]) -> dict[str, np.ndarray]:
    """As `decode_inputs`, for a request with inputs in shared memory: those are read in place, and
    raw_input_contents holds one entry per input that is not (Triton's rule)."""
    raw = request.raw_input_contents
    arrays: dict[str, np.ndarray] = {}
    used = 0
    for tensor in request.inputs[:]:
        name = _unique(tensor.name, arrays)
        what = f"input '{name}'"
        if tensor.parameters and REGION in tensor.parameters:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{what} is in shared memory and has contents too; use one")
            view = _region_slice(what, tensor.parameters, regions)
            arrays[name] = codec.from_raw(view, tensor.datatype, tensor.shape)
            continue
        if tensor.parameters:
            _refuse_parameters(what, tensor.parameters, ())
        if not raw:
            arrays[name] = codec.from_contents(tensor.contents, tensor.datatype, tensor.shape)
            continue
        if tensor.HasField("contents"):
            raise InvalidInput(f"{what} has typed contents as well as raw_input_contents; use one")
        if used == len(raw):
            raise InvalidInput(f"raw_input_contents has {len(raw)} entries, fewer than the inputs not in shared memory")
        arrays[name] = codec.from_raw(raw[used], tensor.datatype, tensor.shape)
        used += 1
    if used != len(raw):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {used} inputs not in shared memory")
    return arrays


def _region_slice(what: str, parameters: Any, regions: Mapping[str, Region]) -> memoryview:
    """The bytes a tensor's shared-memory parameters name, checked as Triton checks them."""
    _refuse_parameters(what, parameters, SHARED_MEMORY)  # the region's own type is checked in `region_names`
    if BYTE_SIZE not in parameters:
        raise InvalidInput(f"{what}: '{BYTE_SIZE}' must be given with '{REGION}'")
    offset = 0
    for key in (OFFSET, BYTE_SIZE):
        if key in parameters and parameters[key].WhichOneof("parameter_choice") != "int64_param":
            raise InvalidInput(f"{what}: '{key}' must be an int64_param")
    if OFFSET in parameters:
        offset = parameters[OFFSET].int64_param
    return regions[parameters[REGION].string_param].slice(offset, parameters[BYTE_SIZE].int64_param, what)


def requested_outputs(request: pb.ModelInferRequest) -> tuple[list[str], dict[str, int]]:
    """The outputs asked for, and those asked for as top-k classes (the classification extension)."""
    names, classes = [], {}
    for output in request.outputs[:]:
        names.append(output.name)
        if output.parameters:
            if REGION in output.parameters:
                if classification.PARAMETER in output.parameters:
                    raise InvalidInput(f"output '{output.name}' asks for classification and shared memory; pick one")
                continue  # checked where it is written (`_write_shared_outputs`)
            _refuse_parameters(f"output '{output.name}'", output.parameters, (classification.PARAMETER,))
            if classification.PARAMETER in output.parameters:
                count = output.parameters[classification.PARAMETER].int64_param
                classification.check_count(output.name, count)
                classes[output.name] = count
    return names, classes


def _write_shared_outputs(
    request: pb.ModelInferRequest, results: dict[str, np.ndarray], regions: Mapping[str, Region]
) -> list[bytes]:
    """Write each output that names a region into it; the raw contents, empty where written (Triton's rule:
    one entry per output, so clients find the others by position)."""
    where = {o.name: o.parameters for o in request.outputs[:] if o.parameters and REGION in o.parameters}
    contents = []
    for name, array in results.items():
        data = codec.to_raw(array)
        parameters = where.get(name)
        if parameters is not None:
            view = _region_slice(f"output '{name}'", parameters, regions)
            if len(data) > len(view):
                raise InvalidInput(
                    f"output '{name}' needs {len(data)} bytes; the shared memory named for it holds "
                    f"{len(view)} (shared_memory_byte_size)"
                )
            view[: len(data)] = data
            data = b""
        contents.append(data)
    return contents


def _refuse_parameters(what: str, parameters: Any, known: Collection[str]) -> None:
    for key in parameters:
        if key not in known:
            if key in SHARED_MEMORY:
                raise InvalidInput(f"{what} has '{key}' without '{REGION}'; name the region too")
            raise InvalidInput(f"{what} has the parameter {key!r}, which this server does not support")


def _unique(name: str, arrays: dict[str, np.ndarray]) -> str:
    if name in arrays:
        raise InvalidInput(f"input '{name}' is given twice")
    return name


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        state: ServerState,
        limits: Limits,
        repository_control: bool = True,
        shared_memory: SharedMemoryRegions | None = None,
        guard: StatusGuard | None = None,
        max_stream_requests: int = 256,
        generations: Generations | None = None,
        shapes: plain.ShapeCache | None = None,
    ) -> None:
        self._generations = generations if generations is not None else Generations()
        self._shapes = shapes if shapes is not None else plain.ShapeCache()  # one the burst lane shares
        self._max_stream_requests = max_stream_requests
        self._repository = repository
        self._guard = guard
        self._limits = limits
        self._state = state
        self._repository_control = repository_control
        self._shared_memory = shared_memory
        self._extensions = (*EXTENSIONS, SHARED_MEMORY_EXTENSION) if shared_memory is not None else EXTENSIONS

    def _regions(self) -> SharedMemoryRegions:
        if self._shared_memory is None:
            raise Unsupported(SHARED_MEMORY_OFF)
        return self._shared_memory

    def _allow_repository_control(self) -> None:
        if not self._repository_control:
            raise Unsupported("loading and unloading models is turned off on this server (--no-repository-control)")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.serving)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._state.ready and self._repository.is_ready(request.name, request.version)
        )

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="nnserve", version=__version__, extensions=self._extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        if streaming.is_text_lm(model):  # the LLM view (its own tensors still answer ModelInfer)
            inputs = [tensor(name=n, datatype=d, shape=s) for n, d, s in streaming.LLM_INPUTS]
            outputs = [tensor(name=n, datatype=d, shape=s) for n, d, s in streaming.LLM_OUTPUTS]
        else:
            inputs = [tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs.values()]
            outputs = [tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs.values()]
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[e.version for e in self._repository.versions(model.name) if e.model is not None],
            platform=PLATFORM,
            inputs=inputs,
            outputs=outputs,
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse | bytes:
        model = self._repository.get(request.model_name, request.model_version)
        answer = self._shapes.answer(model, request)  # a shape served before, run at once: bytes, built from its plan
        if answer is not None:
            return answer
        shared = region_names(request)
        if shared:
            with self._regions().using(shared) as regions:
                return await self._infer(model, request, deadline_of(context), regions)
        if streaming.is_llm_request(model, request):  # the whole text, at once
            return await anext(self._llm_responses(model, request, False))
        return await self._infer(model, request, deadline_of(context), None)

    def _llm_responses(
        self, model: OnnxModel, request: pb.ModelInferRequest, streamed: bool
    ) -> AsyncIterator[pb.ModelInferResponse]:
        asked = streaming.llm_request(decode_inputs(request), request.parameters)
        return streaming.llm_responses(model, request, asked, streamed, self._limits, self._generations)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests on one stream, each answered as it completes (`streaming.stream_infer`)."""
        if self._guard is None:
            raise Unsupported("ModelStreamInfer needs the server's guard")
        metadata, deadline, guard = context.invocation_metadata(), deadline_of(context), self._guard

        async def serve(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
            model = self._repository.get(request.model_name, request.model_version)
            shared = region_names(request)
            if shared:
                with self._regions().using(shared) as regions:
                    yield await self._infer(model, request, deadline, regions)
            elif streaming.is_llm_request(model, request):
                async for response in self._llm_responses(model, request, True):
                    yield response
            else:
                yield await self._infer(model, request, deadline, None)

        async def account(request: pb.ModelInferRequest, work: Callable[[], Awaitable[None]]) -> str | None:
            return await guard.serve_in_stream("ModelStreamInfer", metadata, request, work, context.peer)

        async for response in streaming.stream_infer(requests, serve, account, self._max_stream_requests):
            yield response

    async def _infer(
        self,
        model: OnnxModel,
        request: pb.ModelInferRequest,
        deadline: float | None,
        regions: Mapping[str, Region] | None,
    ) -> pb.ModelInferResponse:
        if request.parameters:  # priority, timeout, sequences...: refused, never ignored
            _refuse_parameters("the request", request.parameters, plain.ANSWERED_PARAMETERS)
        inputs = decode_inputs(request) if regions is None else decode_shared_inputs(request, regions)
        names, classes = requested_outputs(request)
        results, _ = await model.infer_timed(inputs, names, deadline)
        if regions is None and not classes:
            self._shapes.remember(model, request, inputs, results)
        if classes:
            labels = model.spec.labels if model.spec is not None else ()
            batched = bool(model.max_batch_size)
            for name, count in classes.items():
                results[name] = classification.top_classes(name, results[name], count, labels, batched)
        return pb.ModelInferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=self._shapes.output_metadata(model, results),
            raw_output_contents=[codec.to_raw(array) for array in results.values()]
            if regions is None
            else _write_shared_outputs(request, results, regions),
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self._repository.get(request.name, request.version)))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            if request.version:
                models = [self._repository.get(request.name, request.version)]
            else:
                self._repository.get(request.name)  # NOT_FOUND / UNAVAILABLE with the reason
                models = [e.model for e in self._repository.versions(request.name) if e.model is not None]
        else:
            names = visible_models(self._repository.names())
            models = [e.model for name in names for e in self._repository.versions(name) if e.model]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for name in visible_models(self._repository.names()):
            for entry in self._repository.versions(name):
                if not request.ready or entry.model is not None:
                    index.models.add(name=name, version=entry.version, state=entry.state, reason=entry.reason)
        return index

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._allow_repository_control()
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        self._allow_repository_control()
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in self._regions().status(request.name)
            }
        )

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions().register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions().unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise Unsupported(CUDA_SHARED_MEMORY_OFF)

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        raise Unsupported(CUDA_SHARED_MEMORY_OFF)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Context
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        # No CUDA region can be registered, so there is none to unregister: as Triton's clients (perf_analyzer)
        # clean up before and after a run, this answers OK where Register and Status refuse.
        return pb.CudaSharedMemoryUnregisterResponse()
