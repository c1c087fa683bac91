"""Models nobody here exported: every datatype KServe v2 carries (BF16 too), the rest refused at load, and
Triton's batching rules (`max_batch_size` in config.pbtxt obeyed; without it, inferred from the graph)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import RunningServer, _save, start_server
from onnx import TensorProto, helper

from nnserve_client import Client
from nnserve_client.errors import InvalidArgument, Unavailable
from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_server.core.batcher import Batcher, BatchPolicy, RowsNotGivenBack
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.serving_config import serving_config
from nnserve_server.core.session import ModelSession
from nnserve_server.core.stats import ModelStats
from nnserve_server.edge.servicers.model_views import model_config
from nnserve_server.settings import Settings

BF16 = ml_dtypes.bfloat16


def _graph(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializer: tuple[onnx.TensorProto, ...] = (),
    opset: int = 21,
) -> None:
    graph = helper.make_graph(nodes, path.parent.parent.name, inputs, outputs, initializer=list(initializer))
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def _tensor(name: str, elem: int, shape: list[object]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _broadcast_add(root: Path, config: str | None = None, name: str = "add") -> Path:
    """z = x + y with x [batch, 4, 5] and y [batch]: numpy broadcasting makes y's length x's last dimension,
    so as exported with a free first dimension the inputs' first dimensions need not agree."""
    path = root / name / "1" / "model.onnx"
    _graph(
        path,
        [helper.make_node("Add", ["x", "y"], ["z"])],
        [_tensor("x", TensorProto.FLOAT, ["batch", 4, 5]), _tensor("y", TensorProto.FLOAT, ["batch"])],
        [_tensor("z", TensorProto.FLOAT, ["batch", 4, 5])],
    )
    if config is not None:
        (root / name / "config.pbtxt").write_text(config)
    return path


def _load(root: Path, name: str, settings: Settings | None = None) -> OnnxModel:
    settings = settings or Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(root / name, settings, runtime.cpus)
    return OnnxModel(name, "1", root / name / "1" / "model.onnx", runtime, config)


@pytest.mark.fast
def test_without_a_config_a_model_batches_only_when_every_input_and_output_has_a_free_first_dimension(
    tmp_path: Path,
) -> None:
    _broadcast_add(tmp_path)
    batching = _load(tmp_path, "add")
    assert batching.max_batch_size == 256
    assert "every input and output has a free first dimension" in batching.session.batching_reason
    config = model_config(batching)
    assert config.max_batch_size == 256
    assert [list(i.dims) for i in config.input] == [[4, 5], []]
    batching.close()

    # The same inputs, but an output whose first dimension is fixed: each caller's rows could not be given back.
    _graph(
        tmp_path / "total" / "1" / "model.onnx",
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Identity", ["x"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, ["batch", 3])],
        [_tensor("s", TensorProto.FLOAT, []), _tensor("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = _load(tmp_path, "total")
    assert model.max_batch_size == 0
    assert "output 's' [] is fixed" in model.session.batching_reason
    assert model_config(model).max_batch_size == 0
    assert model.session.validate({"x": np.zeros((0, 3), np.float32)}, ()) == 1  # no batch axis: any first dim
    assert model.session.validate({"x": np.zeros((300, 3), np.float32)}, ()) == 1
    model.close()


@pytest.mark.fast
def test_max_batch_size_0_in_config_pbtxt_serves_shapes_as_declared(tmp_path: Path) -> None:
    _broadcast_add(tmp_path, "max_batch_size: 0\n")
    model = _load(tmp_path, "add")
    assert model.max_batch_size == 0
    assert model.batcher.policy.max_batch_size == 0
    assert "max_batch_size 0" in model.session.batching_reason
    config = model_config(model)
    assert config.HasField("max_batch_size")
    assert config.max_batch_size == 0
    assert [list(i.dims) for i in config.input] == [[-1, 4, 5], [-1]]
    assert not config.HasField("dynamic_batching")
    x, y = np.ones((3, 4, 5), np.float32), np.arange(5, dtype=np.float32)
    (z,) = asyncio.run(model.infer({"x": x, "y": y})).values()
    np.testing.assert_array_equal(z, x + y)
    model.close()


@pytest.mark.fast
def test_a_positive_max_batch_size_needs_a_free_first_dimension_everywhere(tmp_path: Path) -> None:
    _graph(
        tmp_path / "fixed" / "1" / "model.onnx",
        [helper.make_node("Identity", ["x"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, [2, 3])],
        [_tensor("y", TensorProto.FLOAT, [2, 3])],
    )
    (tmp_path / "fixed" / "config.pbtxt").write_text("max_batch_size: 8\n")
    with pytest.raises(ValueError, match=r"sets max_batch_size 8, but the first dimension of input 'x' \[2, 3\]"):
        _load(tmp_path, "fixed")
    _broadcast_add(tmp_path, "max_batch_size: 8\n", name="eight")
    model = _load(tmp_path, "eight")
    assert model.max_batch_size == 8
    assert model_config(model).max_batch_size == 8
    model.close()


@pytest.mark.fast
def test_requests_are_not_combined_when_a_run_of_two_rows_does_not_answer_two(tmp_path: Path) -> None:
    """y = the rows flattened ([batch, 3] -> [batch * 3]): its first dimension is free, yet a combined run's
    rows could not be told apart, so a run of two rows at load says to run requests one by one."""
    _graph(
        tmp_path / "rows" / "1" / "model.onnx",
        [helper.make_node("Flatten", ["x"], ["f"], axis=0), helper.make_node("Squeeze", ["f", "zero"], ["y"])],
        [_tensor("x", TensorProto.FLOAT, ["batch", 3])],
        [_tensor("y", TensorProto.FLOAT, ["flat"])],
        (helper.make_tensor("zero", TensorProto.INT64, [1], [0]),),
    )
    model = _load(tmp_path, "rows")
    assert model.max_batch_size == 256  # rows still checked against the limit
    assert model.batcher.policy.max_batch_size == 0  # but never combined
    assert not model_config(model).HasField("dynamic_batching")
    model.close()


@pytest.mark.fast
def test_a_combined_run_whose_rows_do_not_come_back_runs_each_request_alone(tmp_path: Path) -> None:
    """The batcher's own check, for graphs whose rows only go astray on some values (zeros at load were
    fine): the distinct values of x. Each caller still gets its own answer, counted, and no run is combined
    again."""
    _graph(
        tmp_path / "unique" / "1" / "model.onnx",
        [helper.make_node("Unique", ["x"], ["y"], sorted=1)],
        [_tensor("x", TensorProto.INT64, ["batch"])],
        [_tensor("y", TensorProto.INT64, ["distinct"])],
    )
    settings = Settings()
    session = ModelSession(
        "unique", tmp_path / "unique" / "1" / "model.onnx", Runtime.from_settings(settings), 1,
        serving_config(tmp_path / "unique", settings, 1),
    )  # fmt: skip
    stats = ModelStats("unique", "1")
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, max_queue_size=8, instances=1, inline_ns=10**9)
    batcher = Batcher("unique:1", session.run, policy, stats)
    with pytest.raises(RowsNotGivenBack, match="output 'y' answered shape \\[3\\] for a run of 4 rows"):
        batcher.run_together([{"x": np.array([1, 2])}, {"x": np.array([3, 3])}], ("y",), 2)
    assert batcher.policy.max_batch_size == 0
    assert stats.uncombined_runs == 1

    async def queued() -> list[np.ndarray]:
        fresh = Batcher("unique:1", session.run, policy, stats)
        futures = [fresh.submit({"x": x}, ("y",), 2, None) for x in (np.array([5, 5]), np.array([7, 6]))]
        return [(await future)[0][0] for future in futures]

    first, second = asyncio.run(queued())
    np.testing.assert_array_equal(first, [5])
    np.testing.assert_array_equal(second, [6, 7])
    assert stats.uncombined_runs == 2


@pytest.fixture(scope="module")
def odd_repository(tmp_path_factory: pytest.TempPathFactory, fnn_repository: Path) -> Path:
    root = tmp_path_factory.mktemp("odd") / "models"
    _broadcast_add(root)
    _broadcast_add(root, "max_batch_size: 0\n", name="add-as-declared")
    _graph(
        root / "bf16" / "1" / "model.onnx",
        [helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Cast", ["x"], ["wide"], to=1)],
        [_tensor("x", TensorProto.BFLOAT16, ["batch", 3])],
        [_tensor("same", TensorProto.BFLOAT16, ["batch", 3]), _tensor("wide", TensorProto.FLOAT, ["batch", 3])],
    )
    text_and_bf16 = [_tensor("x", TensorProto.BFLOAT16, ["batch", 3]), _tensor("s", TensorProto.STRING, ["batch"])]
    _graph(
        root / "bf16-and-text-in" / "1" / "model.onnx",
        [helper.make_node("Cast", ["x"], ["wide"], to=1), helper.make_node("Identity", ["s"], ["t"])],
        text_and_bf16,
        [_tensor("wide", TensorProto.FLOAT, ["batch", 3]), _tensor("t", TensorProto.STRING, ["batch"])],
    )
    _graph(
        root / "text-in-bf16-out" / "1" / "model.onnx",
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["s"], ["t"])],
        text_and_bf16,
        [_tensor("y", TensorProto.BFLOAT16, ["batch", 3]), _tensor("t", TensorProto.STRING, ["batch"])],
    )
    _graph(
        root / "float8" / "1" / "model.onnx",
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN)],
        [_tensor("x", TensorProto.FLOAT, ["batch", 3])],
        [_tensor("y", TensorProto.FLOAT8E4M3FN, ["batch", 3])],
    )
    _graph(
        root / "int4" / "1" / "model.onnx",
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [_tensor("x", TensorProto.INT4, ["batch", 2])],
        [_tensor("y", TensorProto.FLOAT, ["batch", 2])],
    )
    # The digits FNN with BF16 in and out: the task API casts its preprocessed pixels to the model's type.
    fnn = onnx.load(str(fnn_repository / "digits-fnn" / "1" / "model.onnx"))
    graph = fnn.graph
    graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_fp32"], to=TensorProto.FLOAT))
    for node in graph.node[1:]:
        node.input[:] = ["input_fp32" if name == "input" else name for name in node.input]
        node.output[:] = ["logits_fp32" if name == "logits" else name for name in node.output]
    graph.node.append(helper.make_node("Cast", ["logits_fp32"], ["logits"], to=TensorProto.BFLOAT16))
    graph.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    graph.output[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    shutil.copytree(fnn_repository / "digits-fnn", root / "digits-fnn")
    (root / "digits-fnn-bf16" / "1").mkdir(parents=True)
    onnx.save(fnn, str(root / "digits-fnn-bf16" / "1" / "model.onnx"))
    return root


@pytest.fixture(scope="module")
def odd_server(odd_repository: Path) -> Iterator[RunningServer]:
    running = start_server(odd_repository)
    yield running
    running.stop()


def test_bf16_is_served_end_to_end_with_the_sdk(odd_server: RunningServer) -> None:
    x = np.array([[1.5, -2.0, 3.25], [0.0, 100.0, -0.125]], dtype=BF16)
    with Client(odd_server.target) as client:
        answer = client.infer("bf16", {"x": x})
        meta = client.metadata("bf16")
    assert answer["same"].dtype == BF16
    np.testing.assert_array_equal(answer["same"], x)
    np.testing.assert_array_equal(answer["wide"], x.astype(np.float32))
    assert [(t.name, t.datatype) for t in meta.inputs] == [("x", "BF16")]


def test_bf16_travels_raw_or_as_fp32_contents_beside_strings(odd_server: RunningServer) -> None:
    x = np.array([[0.5, -3.0, 1e30], [7.0, 0.0, -1e-3]], dtype=np.float32)
    with grpc.insecure_channel(odd_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = []
        for typed in (False, True):
            request = pb.ModelInferRequest(model_name="bf16-and-text-in")
            tensor = request.inputs.add(name="x", datatype="BF16", shape=[2, 3])
            if typed:  # float32 numbers, each rounded to the nearest bfloat16
                tensor.contents.fp32_contents[:] = x.reshape(-1).tolist()
            text = request.inputs.add(name="s", datatype="BYTES", shape=[2])
            text.contents.bytes_contents[:] = [b"one", "tw\u00f6".encode()]
            if not typed:
                request.raw_input_contents[:] = [codec.to_raw(x.astype(BF16))]
                request.raw_input_contents.append(codec.to_raw(np.array([b"one", "tw\u00f6".encode()], dtype=object)))
                request.inputs[1].ClearField("contents")
            response = stub.ModelInfer(request)
            outputs = {o.name: o for o in response.outputs}
            wide = codec.from_raw(response.raw_output_contents[0], "FP32", outputs["wide"].shape)
            text_out = codec.from_raw(response.raw_output_contents[1], "BYTES", outputs["t"].shape)
            answers.append(wide)
            assert text_out.tolist() == [b"one", "tw\u00f6".encode()]
    np.testing.assert_array_equal(answers[0], x.astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(answers[1], answers[0])


def test_the_task_api_serves_a_bf16_classifier(
    odd_server: RunningServer, digits_holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits_holdout
    with Client(odd_server.target) as client:
        bf16 = [c.label for c in client.classify("digits-fnn-bf16", x[:40])]
        fp32 = [c.label for c in client.classify("digits-fnn", x[:40])]
    assert sum(label == str(truth) for label, truth in zip(bf16, y[:40], strict=True)) >= 36
    assert sum(a == b for a, b in zip(bf16, fp32, strict=True)) >= 38  # bfloat16 rounding moves a close call


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ("float8", "output 'y' is tensor(float8e4m3fn), which no KServe v2 datatype carries"),
        ("int4", "input 'x' is tensor(int4), which no KServe v2 datatype carries"),
        ("text-in-bf16-out", "outputs ['y'] are BF16 and the model takes strings (BYTES)"),
    ],
)
def test_a_datatype_the_server_cannot_serve_is_refused_at_load(
    odd_server: RunningServer, model: str, named: str
) -> None:
    with Client(odd_server.target) as client:
        assert not client.model_ready(model)
        with pytest.raises(Unavailable) as refused:
            client.infer(model, {"x": np.zeros((1, 3), np.float32)})
    assert named in str(refused.value)


def test_inputs_whose_first_dimensions_disagree_are_named(odd_server: RunningServer) -> None:
    x, y = np.ones((3, 4, 5), np.float32), np.arange(5, dtype=np.float32)
    with Client(odd_server.target) as client:
        with pytest.raises(InvalidArgument, match=r"inputs disagree on the batch size .*\['x'\] 3; \['y'\] 5"):
            client.infer("add", {"x": x, "y": y})
        np.testing.assert_array_equal(client.infer("add-as-declared", {"x": x, "y": y})["z"], x + y)


def test_the_load_log_says_why_a_model_batches_or_not(odd_server: RunningServer) -> None:
    log = odd_server.log()
    assert "loaded model add version 1 on CPUExecutionProvider: max_batch_size 256 (every input and output" in log
    assert "model add-as-declared version 1 on CPUExecutionProvider: max_batch_size 0 (config.pbtxt sets" in log
