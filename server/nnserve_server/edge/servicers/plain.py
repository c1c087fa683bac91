"""ModelInfer's fast lane: a request of a shape already served, to a model that runs it at once.

Most traffic to a model server is the same few request shapes again and again. The first request of a
shape takes the general path (`KServeServicer._infer`: decoding, validation, their error messages);
when it succeeds and is plain (raw contents, no parameters on any tensor), its shape is remembered as
a `Plan`: the inputs' dtypes, shapes and byte sizes, the outputs, the rows. Later requests of that shape
are checked against the plan (the same names, datatypes, shapes and byte sizes: nothing the general
path would judge differently), run with `OnnxModel.infer_now`, and answered with bytes built from the
plan's fixed part (names, version, output metadata) and the results. Anything else, or a model that
cannot run the request at once (a queue, a pool, a batching delay), takes the general path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_server.core.model import OnnxModel
from nnserve_server.edge.servicers import streaming

MAX_PLANS = 64  # shapes remembered per model version (a client that varies its batch size uses a few)
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


def prepare(model: OnnxModel, request: pb.ModelInferRequest) -> tuple[Plan, dict[str, np.ndarray]] | None:
    """The plan of a plain request of a remembered shape, and its inputs as arrays; None: not here."""
    plans: dict[Signature, Plan] | None = model.edge_cache.get(Plan)  # type: ignore[assignment]
    if not plans:
        return None
    parameters = request.parameters
    if parameters and any(key not in ANSWERED_PARAMETERS for key in parameters):
        return None  # the general path refuses them

    key = signature(request)
    plan = plans.get(key) if key is not None else None
    if plan is None:
        return None
    feed = {}
    for (name, dtype, shape, size), data in zip(plan.inputs, request.raw_input_contents[:], strict=True):
        if len(data) != size:
            return None  # the general path says what is wrong with it
        feed[name] = np.frombuffer(data, dtype).reshape(shape)
    return plan, feed


def answer(model: OnnxModel, request: pb.ModelInferRequest) -> bytes | None:
    """The serialized answer to a plain request of a remembered shape, run at once; None: not here."""
    prepared = prepare(model, request)
    if prepared is None:
        return None
    plan, feed = prepared
    arrays = model.infer_now(feed, plan.outputs, plan.rows)
    if arrays is None:
        return None
    return plan.encode(model, request.id, arrays)


def _raw_as_is(array: np.ndarray) -> bool:
    """Numbers in this machine's (little-endian) order: `tobytes()` is their raw KServe contents."""
    return array.dtype.kind not in "OSUV" and array.dtype.byteorder in "=<|" and np.little_endian


def remember(
    model: OnnxModel, request: pb.ModelInferRequest, inputs: dict[str, np.ndarray], results: dict[str, np.ndarray]
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
    plans: dict[Signature, Plan] = model.edge_cache.setdefault(Plan, {})  # type: ignore[assignment]
    if key is None or key in plans:
        return
    if len(plans) >= MAX_PLANS:
        plans.clear()
    rows = model.session.validate(inputs, outputs)  # passed already: a set lookup
    specs = [(name, array.dtype, array.shape, array.nbytes) for name, array in inputs.items()]
    plans[key] = Plan(specs, outputs, rows)
