"""ModelInfer's fast lane (`servicers/plain.py`): a shape served before is answered as the first one was.

The first request of a shape takes the general path; the next ones are decoded against its plan and
answered with bytes built from it. These tests send each request several times and compare the
answers, the statistics and the trailers, and check that what the general path refuses is still
refused once a plan exists.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ECHO_TYPES, RunningServer, echo_model

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

NUMERIC = [t for t in ECHO_TYPES if t != "BYTES"]


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("lane") / "models"
    echo_model(repo / "echo-numbers" / "1" / "model.onnx", NUMERIC)
    shutil.copytree(model_repository / "digits-fnn", repo / "digits-fnn", ignore=shutil.ignore_patterns("2"))
    return repo


@pytest.fixture
def stub(own_server: Callable[..., RunningServer], repository: Path) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    server = own_server(repository=repository)
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _digits(rows: int, request_id: str = "", outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    pixels = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="digits-fnn", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _echo(outputs: tuple[str, ...]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo-numbers", id="e")
    for index, datatype in enumerate(NUMERIC):
        array = (np.arange(6).reshape(2, 3) + index).astype(ECHO_TYPES[datatype][1])
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _inferences(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[int, int, int]:
    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version="1")).model_stats
    return stats.inference_count, stats.execution_count, stats.inference_stats.success.count


@pytest.mark.parametrize(
    "request_of",
    [
        lambda: _digits(1),
        lambda: _digits(3, request_id="order-7"),
        lambda: _digits(2, outputs=("logits",)),
        lambda: _echo(()),
        lambda: _echo(("out_INT8", "out_FP32", "out_UINT64")),
    ],
    ids=["one-row", "three-rows-with-id", "named-output", "every-output", "outputs-in-asked-order"],
)
def test_a_shape_served_again_is_answered_as_the_first_time(
    stub: pb_grpc.GRPCInferenceServiceStub, request_of: Callable[[], pb.ModelInferRequest]
) -> None:
    request = request_of()
    before = _inferences(stub, request.model_name)
    answers = []
    for _ in range(4):
        response, call = stub.ModelInfer.with_call(request)
        answers.append(response)
        trailers = dict(call.trailing_metadata())
        timing = dict(item.split("=") for item in trailers["nnserve-timing"].split(","))
        assert int(timing["batch"]) == request.inputs[0].shape[0]
        assert trailers["x-request-id"]
        assert int(timing["server"]) >= int(timing["compute"]) + int(timing["queue"])
    assert all(answer == answers[0] for answer in answers[1:])
    first = answers[0]
    assert (first.id, first.model_name, first.model_version) == (request.id, request.model_name, "1")
    if request.outputs:
        assert [o.name for o in first.outputs] == [o.name for o in request.outputs]
    rows = request.inputs[0].shape[0]
    inferences, executions, successes = _inferences(stub, request.model_name)
    assert (inferences - before[0], executions - before[1], successes - before[2]) == (4 * rows, 4, 4)
    if request.model_name == "echo-numbers":  # the echo gives back what it got, in the order asked
        sent = dict(zip((t.name for t in request.inputs), request.raw_input_contents, strict=True))
        for output, raw in zip(first.outputs, first.raw_output_contents, strict=True):
            assert raw == sent["in_" + output.name.removeprefix("out_")]


def test_what_the_general_path_refuses_is_refused_after_a_plan_exists(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    good = _digits(2)
    expected = stub.ModelInfer(good)
    assert stub.ModelInfer(good) == expected  # the plan exists now

    short = _digits(2)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(short)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw contents hold 508 bytes" in (refused.value.details() or "")

    unknown = _digits(2)
    unknown.inputs[0].parameters["binary_data_size"].int64_param = 512
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(unknown)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    typed = _digits(2)
    typed.inputs[0].contents.fp32_contents.extend([0.0] * 128)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(typed)
    assert "typed contents as well as raw_input_contents" in (refused.value.details() or "")

    missing = _digits(2, outputs=("probabilities",))
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(missing)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Request-level options this server does not have (tritonclient's priority=, timeout=, sequence_id=).
    for key in ("priority", "timeout", "sequence_id"):
        asked = _digits(2)
        asked.parameters[key].int64_param = 5
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(asked)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the request has the parameter '{key}', which this server does not support" in (
            refused.value.details() or ""
        )
    flagged = _digits(2)  # tritonclient's flag for decoupled models: a plain model's answer is final anyway
    flagged.parameters["triton_enable_empty_final_response"].bool_param = True
    assert stub.ModelInfer(flagged) == expected

    assert stub.ModelInfer(good) == expected  # and the lane still answers


def test_the_decoupled_flag_perf_analyzer_always_sends_keeps_the_lane(repository: Path) -> None:
    """perf_analyzer sends `triton_enable_empty_final_response` with every ModelInfer: the lane answers
    such a request (it refused them all, and the general path cost perf_analyzer 15% of its rate); any
    other request parameter still leaves it to the general path, which refuses it."""
    from nnserve_server.core.model import OnnxModel
    from nnserve_server.core.runtime import Runtime
    from nnserve_server.core.serving_config import serving_config
    from nnserve_server.edge.servicers import plain
    from nnserve_server.settings import Settings

    folder = repository / "digits-fnn"
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(folder, settings, 2)
    model = OnnxModel("digits-fnn", "1", folder / "1" / "model.onnx", runtime, config, settings.inline_run_us)
    try:
        request = _digits(2)
        inputs = {"input": np.frombuffer(request.raw_input_contents[0], np.float32).reshape(2, 64)}
        names = list(model.outputs)
        shapes = plain.ShapeCache()
        shapes.remember(model, request, inputs, dict(zip(names, model.session.run(names, inputs), strict=True)))
        expected = shapes.answer(model, request)
        assert expected is not None  # the plan exists
        flagged = _digits(2)
        flagged.parameters["triton_enable_empty_final_response"].bool_param = True
        assert shapes.answer(model, flagged) == expected
        asked = _digits(2)
        asked.parameters["triton_enable_empty_final_response"].bool_param = True
        asked.parameters["priority"].int64_param = 5
        assert shapes.answer(model, asked) is None
    finally:
        model.close()


def test_remembered_shapes_are_capped_per_version_and_go_with_it(repository: Path) -> None:
    """The edge's ShapeCache keeps at most MAX_SHAPES plans per model version, and nothing of a version
    once the version is gone (the core holds no edge state that would keep it)."""
    import gc

    from nnserve_server.core.model import OnnxModel
    from nnserve_server.core.runtime import Runtime
    from nnserve_server.core.serving_config import serving_config
    from nnserve_server.edge.servicers import plain
    from nnserve_server.settings import Settings

    folder = repository / "digits-fnn"
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(folder, settings, 2)
    model = OnnxModel("digits-fnn", "1", folder / "1" / "model.onnx", runtime, config, settings.inline_run_us)
    shapes = plain.ShapeCache()
    names = list(model.outputs)
    for rows in range(1, plain.MAX_SHAPES + 2):
        request = _digits(rows)
        inputs = {"input": np.frombuffer(request.raw_input_contents[0], np.float32).reshape(rows, 64)}
        results = dict(zip(names, model.session.run(names, inputs), strict=True))
        shapes.remember(model, request, inputs, results)
        assert shapes.output_metadata(model, results)[0].shape == [rows, 10]
        assert shapes.answer(model, request) is not None  # the plan of this shape answers it
    assert shapes.answer(model, _digits(plain.MAX_SHAPES)) is None  # forgotten when the cap was reached
    assert len(shapes) == 1
    model.close()
    del model
    gc.collect()
    assert len(shapes) == 0  # the version's plans went with it
