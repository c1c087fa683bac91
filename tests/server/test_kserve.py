"""KServe v2 RPCs over a real channel with our generated stubs."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import ECHO_TYPES, RunningServer

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_contract.stubs import model_config_pb2 as config_pb


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def echo_arrays() -> dict[str, np.ndarray]:
    arrays = {}
    rng = np.random.default_rng(7)
    for datatype, (_, dtype) in ECHO_TYPES.items():
        if datatype == "BYTES":
            arrays[datatype] = np.array([[b"", b"\x00bin", "t\u00e9xt".encode()]] * 2, dtype=object)
        elif datatype == "BOOL":
            arrays[datatype] = rng.integers(0, 2, (2, 3)).astype(bool)
        elif datatype.startswith("FP"):
            arrays[datatype] = rng.standard_normal((2, 3)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arrays[datatype] = np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)
    return arrays


def test_every_datatype_round_trips_as_raw_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    arrays = echo_arrays()
    request = pb.ModelInferRequest(model_name="echo", id="req-1")
    for datatype, array in arrays.items():
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    response = stub.ModelInfer(request)
    assert response.id == "req-1"
    assert (response.model_name, response.model_version) == ("echo", "1")
    assert len(response.raw_output_contents) == len(arrays)
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        datatype = output.name.removeprefix("out_")
        assert output.datatype == datatype
        assert list(output.shape) == [2, 3]
        np.testing.assert_array_equal(codec.from_raw(raw, output.datatype, output.shape), arrays[datatype])


def test_every_datatype_round_trips_as_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    arrays = echo_arrays()
    fields = {
        "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
        "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
        "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
    }  # fmt: skip
    request = pb.ModelInferRequest(model_name="echo-typed")
    for datatype, field in fields.items():
        contents = pb.InferTensorContents(**{field: arrays[datatype].reshape(-1).tolist()})
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[2, 3], contents=contents)
    response = stub.ModelInfer(request)
    assert len(response.outputs) == len(fields)
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        datatype = output.name.removeprefix("out_")
        np.testing.assert_array_equal(codec.from_raw(raw, output.datatype, output.shape), arrays[datatype])


def test_typed_contents_for_the_fnn(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 64)
    request = pb.ModelInferRequest(model_name="digits-fnn")
    request.inputs.add(
        name="input", datatype="FP32", shape=[2, 64], contents=pb.InferTensorContents(fp32_contents=x.reshape(-1))
    )
    typed = stub.ModelInfer(request)
    raw_request = pb.ModelInferRequest(model_name="digits-fnn", raw_input_contents=[x.tobytes()])
    raw_request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    raw = stub.ModelInfer(raw_request)
    assert typed.raw_output_contents == raw.raw_output_contents
    logits = codec.from_raw(raw.raw_output_contents[0], "FP32", [2, 10])
    assert np.isfinite(logits).all()


def test_requested_outputs_are_honoured(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    arrays = echo_arrays()
    request = pb.ModelInferRequest(model_name="echo")
    for datatype, array in arrays.items():
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    request.outputs.add(name="out_INT16")
    request.outputs.add(name="out_FP64")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["out_INT16", "out_FP64"]


def test_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits-fnn"))
    assert meta.name == "digits-fnn"
    assert list(meta.versions) == ["1", "2"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]


def test_model_config_states_batching_and_dims(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="digits-fnn")).config
    assert config.name == "digits-fnn"
    assert config.max_batch_size == 256
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", config_pb.TYPE_FP32, [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("logits", config_pb.TYPE_FP32, [10])]
    echo = stub.ModelConfig(pb.ModelConfigRequest(name="echo")).config
    assert {i.name: i.data_type for i in echo.input}["in_BYTES"] == config_pb.TYPE_STRING


def test_model_statistics_count_inferences(server: RunningServer, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    def fnn_v1() -> pb.ModelStatistics:
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits-fnn", version="1")).model_stats
        return stats

    before = fnn_v1()
    request = pb.ModelInferRequest(model_name="digits-fnn", model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[3, 64])
    request.raw_input_contents.append(np.zeros((3, 64), np.float32).tobytes())
    for _ in range(4):
        stub.ModelInfer(request)
    after = fnn_v1()
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 4
    assert after.inference_stats.success.count - before.inference_stats.success.count == 4
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference > 0
    assert any(b.batch_size == 3 and b.compute_infer.count >= 4 for b in after.batch_stats)
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest())
    assert {(s.name, s.version) for s in everything.model_stats} >= {
        ("digits-fnn", "1"),
        ("digits-fnn", "2"),
        ("echo", "1"),
    }


def test_repository_index(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("digits-fnn", "1", "READY"), ("digits-fnn", "2", "READY"), ("echo", "1", "READY"),
        ("echo-typed", "1", "READY"), ("slow", "1", "READY"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="r")),
        lambda s: s.TraceSetting(pb.TraceSettingRequest()),
        lambda s: s.LogSettings(pb.LogSettingsRequest()),
    ],
)
def test_unimplemented_rpcs_answer_unimplemented(stub: pb_grpc.GRPCInferenceServiceStub, call: object) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _classes(
    stub: pb_grpc.GRPCInferenceServiceStub, output: str, count: int, model: str = "echo"
) -> pb.ModelInferResponse:
    arrays = echo_arrays()
    request = pb.ModelInferRequest(model_name="echo")
    for datatype, array in arrays.items():
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    requested = request.outputs.add(name=output)
    requested.parameters["classification"].int64_param = count
    return stub.ModelInfer(request)


def test_the_classification_extension_answers_top_k_strings(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    values = echo_arrays()["FP32"]
    response = _classes(stub, "out_FP32", 2)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("out_FP32", "BYTES", [2, 2])
    strings = codec.from_raw(response.raw_output_contents[0], "BYTES", [2, 2])
    order = np.argsort(-values, axis=1)[:, :2]
    expected = [[f"{values[r, i]:f}:{i}".encode() for i in order[r]] for r in range(2)]
    assert strings.tolist() == expected  # no labels on the echo model: "value:index"
    # Integers print as integers; a count past the row's length is capped at it (Triton does the same).
    ints = codec.from_raw(_classes(stub, "out_INT32", 50).raw_output_contents[0], "BYTES", [2, 3])
    assert ints[1].tolist() == [b"3:2", b"2:1", b"1:0"]


@pytest.mark.parametrize(
    ("output", "count", "message"),
    [
        ("out_BYTES", 1, "needs one vector of numbers per row"),
        ("out_FP32", 0, "ask for 1..65536"),
        ("out_FP32", -3, "ask for 1..65536"),
    ],
)
def test_classification_requests_it_cannot_answer_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub, output: str, count: int, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _classes(stub, output, count)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(raised.value.details())
    assert _classes(stub, "out_FP32", 1).outputs[0].datatype == "BYTES"  # and the next request is answered


@pytest.mark.parametrize(
    ("key", "code"),
    [("shared_memory_region", grpc.StatusCode.NOT_FOUND), ("no_such_option", grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_tensor_parameters_the_server_does_not_support_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub, key: str, code: grpc.StatusCode
) -> None:
    for where in ("input", "output"):
        request = pb.ModelInferRequest(model_name="digits-fnn")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
        target = tensor if where == "input" else request.outputs.add(name="logits")
        target.parameters[key].string_param = "region-0"
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, timeout=10)
        assert raised.value.code() == code, where
        assert key in str(raised.value.details()) or "shared-memory region" in str(raised.value.details())
