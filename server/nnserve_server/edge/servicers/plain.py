"""ModelInfer's fast lane: a request of a shape already served, to a model that runs it at once.

Most traffic to a model server is the same few request shapes again and again. The first request of a
shape takes the general path (`KServeServicer._infer`: decoding, validation, their error messages);
when it succeeds and is plain (raw contents, no parameters on any tensor), its shape is remembered as
a `Plan` in the edge's `ShapeCache`: the inputs' dtypes, shapes and byte sizes, the outputs, the rows.
Later requests of that shape are checked against the plan (the same names, datatypes, shapes and byte
sizes: nothing the general path would judge differently), run with `OnnxModel.infer_now`, and answered
with bytes built from the plan's fixed part (names, version, output metadata) and the results. Anything
else, or a model that cannot run the request at once (a queue, a pool, a batching delay), takes the
general path.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_server.core.model import OnnxModel
from nnserve_server.edge.servicers import streaming

MAX_SHAPES = 64  # plans, and answers' output metadata, remembered per model version
_ID, _RAW_OUTPUT = b"\x1a", b"\x32"  # ModelInferResponse fields 3 (id) and 6 (raw_output_contents), length-delimited

Signature = tuple[object, ...]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Plan:
    """What a request of one shape decodes to and answers with."""

    __slots__ = ("inputs", "outputs", "prefix", "rows", "shapes")

    def __init__(self, inputs: list[tuple[str, np.dtype, tuple[int, ...], int]], outputs: tuple[str, ...], rows: int):
        self.inputs = inputs  # (name, dtype, shape, byte size) in request order
        self.outputs = outputs  # the names run, in the response's order
        self.rows = rows
        self.shapes: tuple[tuple[int, ...], ...] = ()  # of the results the prefix describes
        self.prefix = b""  # model_name, model_version and outputs, serialized

    def encode(self, model: OnnxModel, request_id: str, arrays: Sequence[np.ndarray]) -> bytes:
        """The serialized ModelInferResponse (fields may come in any order on the wire)."""
        shapes = tuple(array.shape for array in arrays)
        if shapes != self.shapes:
            metadata = [
                pb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape
                )
                for name, array in zip(self.outputs, arrays, strict=True)
            ]
            self.prefix = pb.ModelInferResponse(
                model_name=model.name, model_version=model.version, outputs=metadata
            ).SerializeToString()
            self.shapes = shapes
        parts = [self.prefix]
        if request_id:
            data = request_id.encode()
            parts += (_ID, _varint(len(data)), data)
        for array in arrays:
            data = array.tobytes()
            parts += (_RAW_OUTPUT, _varint(len(data)), data)
        return b"".join(parts)


def signature(request: pb.ModelInferRequest) -> Signature | None:
    """The request's shape, as its tensors' metadata serialized (one C call each: names, datatypes,
    shapes, and any parameters or typed contents, so a request with those never matches a plan, which
    `remember` makes only for plain requests); None when the raw contents do not pair with the inputs."""
    tensors, raw = request.inputs[:], request.raw_input_contents[:]
    if not raw or len(raw) != len(tensors):
        return None
    return tuple([tensor.SerializeToString() for tensor in tensors]), tuple(
        [output.SerializeToString() for output in request.outputs[:]]
    )


def _plain(request: pb.ModelInferRequest) -> bool:
    """Raw contents for every input and no parameters on any tensor (checked once per shape)."""
    inputs = request.inputs[:]
    return (
        len(request.raw_input_contents) == len(inputs) > 0
        and not any(tensor.parameters or tensor.HasField("contents") for tensor in inputs)
        and not any(output.parameters for output in request.outputs[:])
    )


# Request parameters a plain model's answer does not depend on: tritonclient's and perf_analyzer's flag
# for decoupled models (a plain model's one response is its final one anyway). perf_analyzer sends it
# with every request: refusing the lane to such requests cost it 15% of its rate (MLP, c=32).
ANSWERED_PARAMETERS = frozenset({streaming.TRITON_EMPTY_FINAL, streaming.EMPTY_FINAL})


def _raw_as_is(array: np.ndarray) -> bool:
    """Numbers in this machine's (little-endian) order: `tobytes()` is their raw KServe contents."""
    return array.dtype.kind not in "OSUV" and array.dtype.byteorder in "=<|" and np.little_endian


OutputTensors = list[pb.ModelInferResponse.InferOutputTensor]


class _Shapes:
    """One model version's remembered shapes (`ShapeCache`)."""

    __slots__ = ("outputs", "plans")

    def __init__(self) -> None:
        self.plans: dict[Signature, Plan] = {}  # by request signature: the fast lane
        self.outputs: dict[tuple[object, ...], OutputTensors] = {}  # by the answer's names, dtypes, shapes


def _keep(entries: dict[Any, Any], key: object, value: object) -> None:
    if len(entries) >= MAX_SHAPES:  # all forgotten at once: a client that varies its batch size uses a few
        entries.clear()
    entries[key] = value


class ShapeCache:
    """What ModelInfer remembers about the shapes it serves, owned by the edge: per model version, the
    fast lane's plans (by request signature) and the general path's output metadata (by the answer's
    names, datatypes and shapes), at most MAX_SHAPES of each. Weakly keyed by the model version, so its
    entries go with it. Read from the event loop's thread and the native transport's dispatch thread:
    dictionary reads and single assignments only."""

    def __init__(self) -> None:
        self._versions: weakref.WeakKeyDictionary[OnnxModel, _Shapes] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        """The model versions with shapes remembered."""
        return len(self._versions)

    def _of(self, model: OnnxModel) -> _Shapes:
        shapes = self._versions.get(model)
        if shapes is None:
            shapes = self._versions[model] = _Shapes()
        return shapes

    def prepare(self, model: OnnxModel, request: pb.ModelInferRequest) -> tuple[Plan, dict[str, np.ndarray]] | None:
        """The plan of a plain request of a remembered shape, and its inputs as arrays; None: not here."""
        shapes = self._versions.get(model)
        if shapes is None or not shapes.plans:
            return None
        parameters = request.parameters
        if parameters and any(key not in ANSWERED_PARAMETERS for key in parameters):
            return None  # the general path refuses them
        key = signature(request)
        plan = shapes.plans.get(key) if key is not None else None
        if plan is None:
            return None
        feed = {}
        for (name, dtype, shape, size), data in zip(plan.inputs, request.raw_input_contents[:], strict=True):
            if len(data) != size:
                return None  # the general path says what is wrong with it
            feed[name] = np.frombuffer(data, dtype).reshape(shape)
        return plan, feed

    def answer(self, model: OnnxModel, request: pb.ModelInferRequest) -> bytes | None:
        """The serialized answer to a plain request of a remembered shape, run at once; None: not here."""
        prepared = self.prepare(model, request)
        if prepared is None:
            return None
        plan, feed = prepared
        arrays = model.infer_now(feed, plan.outputs, plan.rows)
        if arrays is None:
            return None
        return plan.encode(model, request.id, arrays)

    def remember(
        self,
        model: OnnxModel,
        request: pb.ModelInferRequest,
        inputs: dict[str, np.ndarray],
        results: dict[str, np.ndarray],
    ) -> None:
        """After the general path served `request` with `results`: its shape, if plain, for the next ones
        (inline models, numeric tensors, each output once)."""
        if not model.batcher.inline or not _plain(request):
            return
        outputs = tuple(results)
        if len(outputs) != len(request.outputs) and request.outputs:
            return  # an output asked for twice: the general path's (it answers it once)
        if not all(map(_raw_as_is, (*inputs.values(), *results.values()))):
            return  # text (decoded and encoded element by element): the general path's
        key = signature(request)
        plans = self._of(model).plans
        if key is None or key in plans:
            return
        rows = model.session.validate(inputs, outputs)  # passed already: a set lookup
        specs = [(name, array.dtype, array.shape, array.nbytes) for name, array in inputs.items()]
        _keep(plans, key, Plan(specs, outputs, rows))

    def output_metadata(self, model: OnnxModel, results: dict[str, np.ndarray]) -> OutputTensors:
        """The outputs' names, datatypes and shapes for an answer of the general path, built once per
        shape (a stream of same-shaped answers then costs a dict lookup)."""
        known = self._of(model).outputs
        key = tuple([(name, array.dtype, array.shape) for name, array in results.items()])
        metadata = known.get(key)
        if metadata is None:
            metadata = [
                pb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape
                )
                for name, array in results.items()
            ]
            _keep(known, key, metadata)
        return metadata
