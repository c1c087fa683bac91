"""Hostile input at scale: thousands of generated requests against one real server.

Every answer must be a proper gRPC status that names the caller's mistake: never INTERNAL or UNKNOWN,
never a hang (each call has a deadline far above what a good request takes), never a crash; and the
server must still answer a good request correctly afterwards. Generation is derandomized, so a failure
reproduces; the counts are in the assertions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnserve_client import Client
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import tasks_pb2

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
TIMEOUT_S = 20.0
PIXELS = np.random.default_rng(1).random((3, 64), dtype=np.float32)
FUZZ = settings(
    max_examples=1200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)
TRIED: dict[str, int] = {}
ZERO_WITH_HUGE: dict[str, int] = {}  # shapes drawn with a zero beside a huge dimension, by where they went
SHARED_MEMORY_KEYS = ["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"]


def _count_zero_with_huge(shape: object, where: str) -> None:
    dimensions = list(shape)  # type: ignore[call-overload]
    if 0 in dimensions and any(d >= 2**31 for d in dimensions):
        ZERO_WITH_HUGE[where] = ZERO_WITH_HUGE.get(where, 0) + 1


names = st.sampled_from(["echo", "echo-typed", "digits-fnn", "slow", "", "nope", "../echo", "x" * 300])
input_names = st.sampled_from(["in_FP32", "in_BYTES", "in_INT64", "in_BOOL", "input", "x", "", "in_FP16"])
dims = st.one_of(st.integers(-3, 6), st.sampled_from([0, 64, 1024, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]))
# Zero beside huge dimensions: an empty tensor by its product, absurd by its dimensions (refused either way).
HUGE = [2**31, 2**40, 2**62, 2**63 - 1]
zero_with_huge = st.lists(st.sampled_from([0, 0, 1, 64, *HUGE]), min_size=2, max_size=5).filter(
    lambda shape: 0 in shape and max(shape) >= 2**31
)
shapes = st.one_of(st.lists(dims, min_size=0, max_size=5), zero_with_huge)
datatypes = st.one_of(st.sampled_from([*DATATYPES, "BYTES"]), st.text(max_size=8))


@st.composite
def tensors(draw: st.DrawFn) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name=draw(input_names), datatype=draw(datatypes), shape=draw(shapes))
    _count_zero_with_huge(tensor.shape, "ModelInfer")
    if draw(st.integers(0, 9)) == 0:  # shared-memory parameters: unknown regions, wrong types, missing sizes
        for key in draw(st.lists(st.sampled_from(SHARED_MEMORY_KEYS), max_size=3)):
            if draw(st.booleans()):
                tensor.parameters[key].string_param = draw(st.sampled_from(["", "r0", "x" * 300]))
            else:
                tensor.parameters[key].int64_param = draw(st.sampled_from([-1, 0, 64, 2**62]))
    contents = draw(st.sampled_from(["none", "fp32", "int64", "bytes", "bool", "uint"]))
    if contents == "fp32":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
    elif contents == "int64":
        tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70)))
    elif contents == "bytes":
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=8)))
    elif contents == "bool":
        tensor.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=70)))
    elif contents == "uint":
        tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=70)))
    return tensor


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2", "99", "-1", "a/b"]))
    )
    request.inputs.extend(draw(st.lists(tensors(), max_size=4)))
    if draw(st.booleans()):  # raw contents: right sizes sometimes, wrong sizes often
        for tensor in request.inputs:
            del tensor.contents.fp32_contents[:]
            size = draw(st.sampled_from([0, 1, 3, 4, 12, 256, 4096]))
            request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=16), max_size=2)))
    for name in draw(st.lists(st.sampled_from(["out_FP32", "logits", "y", "", "nope"]), max_size=3)):
        request.outputs.add(name=name)
    return request


def _call(channel: grpc.Channel, method: str, payload: bytes, kind: str) -> grpc.StatusCode:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    call = channel.unary_unary(method)  # bytes in, bytes out: the server parses them, or refuses
    failure: grpc.RpcError | None = None
    try:
        call(payload, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        failure = error
    if failure is None:
        return grpc.StatusCode.OK
    code = failure.code()
    assert code in ALLOWED, (kind, code, failure.details(), payload[:200])
    assert failure.details(), (kind, code, "an error must say what to fix")
    return code


def _stream(channel: grpc.Channel, method: str, payload: bytes, kind: str) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    failure: grpc.RpcError | None = None
    try:
        for _ in channel.unary_stream(method)(payload, timeout=TIMEOUT_S):
            pass
    except grpc.RpcError as error:
        failure = error
    if failure is not None:
        assert failure.code() in ALLOWED, (kind, failure.code(), failure.details(), payload[:200])


@pytest.fixture(scope="module", params=["native", "grpcio"])
def fuzzed(request: pytest.FixtureRequest, model_repository: Path) -> Iterator[tuple[RunningServer, grpc.Channel]]:
    """The same cases against each transport (their message limits and malformed-frame paths differ)."""
    running = start_server(model_repository, "--max-message-bytes", str(16 * 2**20), "--transport", request.param)
    try:
        with Client(running.target) as client:
            before = client.infer("digits-fnn", {"input": PIXELS})["logits"]
        with grpc.insecure_channel(running.target) as channel:
            yield running, channel
        _still_serving(running, before)
    finally:
        running.stop()


def _still_serving(running: RunningServer, before: np.ndarray) -> None:
    assert running.process.poll() is None, "the server died during the fuzzing:\n" + running.log()[-3000:]
    with Client(running.target) as client:  # and still answers correctly
        np.testing.assert_array_equal(client.infer("digits-fnn", {"input": PIXELS})["logits"], before)
    assert "Traceback" not in running.log(), running.log()[-3000:]
    assert sum(TRIED.values()) >= 3000, TRIED
    assert ZERO_WITH_HUGE.get("ModelInfer", 0) >= 50, ZERO_WITH_HUGE
    assert ZERO_WITH_HUGE.get("tasks", 0) >= 20, ZERO_WITH_HUGE
    print(f"fuzz cases tried: {TRIED}; shapes with a zero beside a huge dimension: {ZERO_WITH_HUGE}")


@FUZZ
@given(request=infer_requests())
def test_generated_infer_requests(fuzzed: tuple[RunningServer, grpc.Channel], request: pb.ModelInferRequest) -> None:
    _call(fuzzed[1], "/inference.GRPCInferenceService/ModelInfer", request.SerializeToString(), "ModelInfer")


@FUZZ
@given(payload=st.one_of(st.binary(max_size=512), st.binary(min_size=1, max_size=8).map(lambda b: b * 4096)))
def test_malformed_frames(fuzzed: tuple[RunningServer, grpc.Channel], payload: bytes) -> None:
    """Raw bytes that are rarely a valid message, sent to every kind of RPC."""
    _, channel = fuzzed
    for method in (
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/nnserve.v1.Tasks/Classify",
        "/nnserve.v1.Tasks/Segment",
    ):
        _call(channel, method, payload, "raw frames")
    _stream(channel, "/nnserve.v1.Tasks/Generate", payload, "raw frames")


@st.composite
def task_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    model = draw(st.sampled_from(["digits-fnn", "echo", "nope", ""]))
    which = draw(st.sampled_from(["images", "texts", "tensor", "none"]))
    request = tasks_pb2.ClassifyRequest(model_name=model, top_k=draw(st.integers(0, 2000)))
    if which == "images":
        png = b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=256))
        request.images.images.extend(
            draw(st.lists(st.sampled_from([png, b"", b"GIF89a", b"\xff\xd8\xff"]), max_size=3))
        )
    elif which == "texts":
        request.texts.texts.extend(draw(st.lists(st.text(max_size=64), max_size=3)))
        if draw(st.booleans()):
            request.texts.texts.append("y" * draw(st.sampled_from([2048, 2049, 1_000_000])))  # over max-text-chars
    elif which == "tensor":
        request.tensor.datatype = draw(datatypes)
        request.tensor.shape.extend(draw(shapes))
        _count_zero_with_huge(request.tensor.shape, "tasks")
        values = draw(st.sampled_from(["raw", "float_values", "int64_values", "empty"]))
        if values == "raw":
            request.tensor.raw = draw(st.binary(max_size=512))
        elif values == "float_values":
            request.tensor.float_values.extend(draw(st.lists(st.floats(width=32), max_size=70)))
        elif values == "int64_values":
            request.tensor.int64_values.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70)))
    return draw(st.sampled_from(["Classify", "Encode", "Generate"])), request.SerializeToString()


@FUZZ
@given(case=task_requests())
def test_generated_task_requests(fuzzed: tuple[RunningServer, grpc.Channel], case: tuple[str, bytes]) -> None:
    rpc, payload = case
    if rpc == "Generate":
        _stream(fuzzed[1], f"/nnserve.v1.Tasks/{rpc}", payload, "tasks")
    else:
        _call(fuzzed[1], f"/nnserve.v1.Tasks/{rpc}", payload, "tasks")
