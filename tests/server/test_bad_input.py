"""Every bad request gets the right status and a message saying what to fix; the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, _save
from onnx import TensorProto, helper

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_contract.stubs import tasks_pb2, tasks_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    # The client may send more than the server accepts, to see the server refuse it.
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def fnn_request(x: np.ndarray | None = None, **overrides: object) -> pb.ModelInferRequest:
    x = np.zeros((1, 64), np.float32) if x is None else x
    request = pb.ModelInferRequest(model_name="digits-fnn")
    request.inputs.add(name="input", datatype=codec.datatype_of(x.dtype), shape=x.shape)
    request.raw_input_contents.append(codec.to_raw(x))
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def refused(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    return caught.value


@pytest.fixture(autouse=True)
def _still_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> Iterator[None]:
    """After each bad request, a good one is still answered correctly."""
    yield
    response = stub.ModelInfer(fnn_request())
    assert codec.from_raw(response.raw_output_contents[0], "FP32", [1, 10]).shape == (1, 10)


def test_unknown_model(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(model_name="digits-cnn"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'digits-cnn'" in error.details()
    assert "digits-fnn" in error.details()  # says what exists


def test_unknown_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(model_version="7"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no version '7'" in error.details()


def test_missing_input(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="digits-fnn")
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "missing ['input']" in error.details()


def test_extra_input(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs.add(name="bonus", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "unexpected ['bonus']" in error.details()


def test_duplicate_input(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "given twice" in error.details()


def test_wrong_dtype(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(np.zeros((1, 64), np.float64)))
    assert error.code() == INVALID
    assert "input 'input' is FP64, but model 'digits-fnn' takes FP32" in error.details()


def test_wrong_rank(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(np.zeros((1, 8, 8), np.float32)))
    assert error.code() == INVALID
    assert "shape [1, 8, 8]" in error.details()
    assert "[-1, 64]" in error.details()


def test_wrong_shape(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(np.zeros((2, 65), np.float32)))
    assert error.code() == INVALID
    assert "shape [2, 65]" in error.details()


def test_raw_length_does_not_match_shape(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.raw_input_contents[0] = b"\x00" * 100
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "100 bytes, but shape [1, 64] of FP32 needs 256" in error.details()


def test_negative_dimension(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs[0].shape[:] = [-1, 64]
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "negative dimension" in error.details()


def test_absurd_dimensions_are_refused_before_allocating(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs[0].shape[:] = [2**62, 2**62]
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "more than 2**48 elements" in error.details()


@pytest.mark.parametrize("typed", [False, True])
def test_huge_dimensions_beside_a_zero_are_refused(stub: pb_grpc.GRPCInferenceServiceStub, typed: bool) -> None:
    # Zero elements, so no size check on the bytes catches it; numpy's reshape would ("array is too big").
    request = pb.ModelInferRequest(model_name="digits-fnn")
    request.inputs.add(name="input", datatype="FP32", shape=[2**62, 2**31, 0, 1, 64])
    if typed:
        request.inputs[0].contents.SetInParent()
    else:
        request.raw_input_contents.append(b"")
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "more than 2**48 elements" in error.details()
    # ... and the server answers the next good request.
    assert stub.ModelInfer(fnn_request(), timeout=10).outputs[0].name == "logits"


def test_batch_larger_than_max_batch_size(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    error = refused(stub, fnn_request(np.zeros((257, 64), np.float32)))
    assert error.code() == INVALID
    assert "batch size 257 is outside 1..256" in error.details()


def test_unknown_datatype(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs[0].datatype = "FLOAT32"
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "unknown datatype 'FLOAT32'" in error.details()


def test_raw_and_typed_contents_mixed(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "typed contents as well as raw_input_contents" in error.details()


def test_raw_contents_count_differs_from_inputs(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.raw_input_contents.append(b"")
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "2 entries for 1 inputs" in error.details()


def test_typed_contents_with_wrong_count(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="digits-fnn")
    request.inputs.add(
        name="input", datatype="FP32", shape=[1, 64], contents=pb.InferTensorContents(fp32_contents=[1.0])
    )
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "fp32_contents holds 1 elements, but shape [1, 64] needs 64" in error.details()


def test_unknown_requested_output(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = fnn_request()
    request.outputs.add(name="probabilities")
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "no outputs ['probabilities']" in error.details()


def test_binary_bytes_for_a_string_tensor(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="echo-typed")
    from conftest import ECHO_TYPES

    for datatype, (_, dtype) in ECHO_TYPES.items():
        if datatype == "FP16":
            continue
        array = np.array([[b"\xff\xfe", b"", b""]], dtype=object) if datatype == "BYTES" else np.zeros((1, 3), dtype)
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[1, 3])
        request.raw_input_contents.append(codec.to_raw(array))
    error = refused(stub, request)
    assert error.code() == INVALID
    assert "not valid UTF-8" in error.details()


def test_message_over_the_limit_is_resource_exhausted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    big = np.zeros((70 * 1024 * 1024 // 256, 64), np.float32)  # 70 MiB > the 64 MiB default limit
    error = refused(stub, fnn_request(big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_classify_errors(channel: grpc.Channel) -> None:
    tasks = tasks_pb2_grpc.TasksStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        tasks.Classify(tasks_pb2.ClassifyRequest(model_name="digits-fnn"))
    assert caught.value.code() == INVALID
    assert "carries no input" in caught.value.details()
    bad = tasks_pb2.Tensor(datatype="FP32", shape=[1, 64], raw=b"\x00" * 3)
    with pytest.raises(grpc.RpcError) as caught:
        tasks.Classify(tasks_pb2.ClassifyRequest(model_name="digits-fnn", tensor=bad))
    assert caught.value.code() == INVALID
    strings = tasks_pb2.Tensor(datatype="BYTES", shape=[1], raw=codec.to_raw(np.array([b"x"], dtype=object)))
    with pytest.raises(grpc.RpcError) as caught:
        tasks.Classify(tasks_pb2.ClassifyRequest(model_name="digits-fnn", tensor=strings))
    assert caught.value.code() == INVALID
    assert "must be numeric" in caught.value.details()


@pytest.mark.parametrize(
    "tensor",
    [
        tasks_pb2.Tensor(datatype="FP32", shape=[2**62, 2**31, 0, 1, 64]),  # raw, empty
        tasks_pb2.Tensor(shape=[2**62, 2**31, 0], float_values=[1.0]),  # typed values
        tasks_pb2.Tensor(shape=[2**62, 2**31, 0, 1, 64], int64_values=[7]),
    ],
)
def test_task_tensors_with_huge_dimensions_beside_a_zero_are_refused(
    channel: grpc.Channel, tensor: tasks_pb2.Tensor
) -> None:
    tasks = tasks_pb2_grpc.TasksStub(channel)
    calls = ((tasks.Classify, tasks_pb2.ClassifyRequest), (tasks.Encode, tasks_pb2.EncodeRequest))
    for rpc, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            rpc(request(model_name="digits-fnn", tensor=tensor), timeout=10)
        assert caught.value.code() == INVALID
        assert "more than 2**48 elements" in caught.value.details()
    good = tasks_pb2.Tensor(shape=[1, 64], float_values=[0.0] * 64)
    assert len(tasks.Classify(tasks_pb2.ClassifyRequest(model_name="digits-fnn", tensor=good)).items) == 1


def test_garbage_bytes_instead_of_a_protobuf(channel: grpc.Channel) -> None:
    raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert caught.value.code() == INVALID
    assert "not a valid ModelInfer request message" in caught.value.details()


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_an_answer_past_the_send_limit_is_refused_and_counted_as_such(
    transport: str, own_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """16 rows of one number in, 16 x 4096 numbers (256 KiB) out, on a server that sends at most 64 KiB: the
    caller gets RESOURCE_EXHAUSTED saying why, the metrics count it so, and no traceback is logged."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4096])
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4096])],
        initializer=[shape],
    )
    _save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "expand" / "1" / "model.onnx"
    )
    running = own_server("--max-message-bytes", "65536", "--transport", transport, repository=tmp_path)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for rows, refused_ in ((2, False), (16, True), (16, True)):
            request = pb.ModelInferRequest(model_name="expand", raw_input_contents=[np.ones((rows, 1), "f4").tobytes()])
            request.inputs.add(name="x", datatype="FP32", shape=[rows, 1])
            if not refused_:
                assert len(stub.ModelInfer(request).raw_output_contents[0]) == rows * 4096 * 4
                continue
            error = refused(stub, request)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "above the 65536 the server sends (--max-message-bytes)" in error.details()
    counted = 'nnserve_requests_total{code="RESOURCE_EXHAUSTED",model="expand",rpc="ModelInfer",version="1"} 2.0'
    assert counted in running.metrics()
    assert "Traceback" not in running.log()
