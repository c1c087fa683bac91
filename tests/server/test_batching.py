"""Dynamic batching, bounded queues and deadlines, on a real server with real onnxruntime sessions.

Per-model knobs come from a Triton-style config.pbtxt beside the model, so these tests also show
that the file is read. Batches are observed through KServe's ModelStatistics (execution_count vs
inference_count, batch_stats), the numbers perf_analyzer and Triton users read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper

from nnserve_client import AsyncClient, Client
from nnserve_client.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.serving_config import serving_config
from nnserve_server.edge.servicers.model_views import model_config
from nnserve_server.settings import Settings
from tests.conftest import RunningServer, _save, echo_model, slow_model

SLOW_WIDTH = 1024


def _width_echo(path: Path) -> None:
    """y = x + 0, with shape [batch, n]: n free, so requests of different widths must not be mixed."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["y"])],
        "width-echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        initializer=[zero],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _lookup(path: Path) -> None:
    """y = table[ids]: an id past the table's 10 rows is an error onnxruntime raises at run time."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 2], [float(i) for i in range(20)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 2])],
        initializer=[table],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def batching_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("batching") / "models"
    echo_model(repo / "echo" / "1" / "model.onnx", ["FP32"])
    _width_echo(repo / "widths" / "1" / "model.onnx")
    slow_model(repo / "slow" / "1" / "model.onnx")
    # A long delay makes every concurrent burst one batch, whatever the machine's speed.
    batched = "max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 200000 }\n"
    (repo / "echo" / "config.pbtxt").write_text(batched + "instance_group [ { count: 1 } ]\n")
    _lookup(repo / "lookup" / "1" / "model.onnx")
    (repo / "lookup" / "config.pbtxt").write_text(batched)
    (repo / "widths" / "config.pbtxt").write_text(
        batched + 'parameters { key: "generation_max_streams" value { string_value: "12" } }\n'
    )
    (repo / "slow" / "config.pbtxt").write_text(
        "instance_group [ { count: 1 } ]\n"
        "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
        'parameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'
    )
    _width_echo(repo / "broken-config" / "1" / "model.onnx")
    (repo / "broken-config" / "config.pbtxt").write_text("max_batch_size: lots\n")
    _width_echo(repo / "misspelt-knob" / "1" / "model.onnx")
    (repo / "misspelt-knob" / "config.pbtxt").write_text(
        'parameters { key: "generation_max_batches" value { string_value: "8" } }\n'
    )
    _width_echo(repo / "zero-streams" / "1" / "model.onnx")
    (repo / "zero-streams" / "config.pbtxt").write_text(
        'parameters { key: "generation_max_streams" value { string_value: "0" } }\n'
    )
    return repo


@pytest.fixture(scope="module")
def batching_server(batching_repository: Path) -> RunningServer:
    from tests.conftest import start_server

    running = start_server(batching_repository)
    yield running  # type: ignore[misc]
    running.stop()


def _stats(target: str, model: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    (stats,) = response.model_stats
    return stats


async def _concurrent(target: str, model: str, inputs: list[np.ndarray], timeout: float = 30) -> list[object]:
    async with AsyncClient(target, timeout=timeout) as client:
        name = {"echo": "in_FP32", "lookup": "ids"}.get(model, "x")
        calls = [client.infer(model, {name: x}) for x in inputs]
        return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.fast
def test_concurrent_requests_share_runs_and_each_gets_its_own_rows(batching_server: RunningServer) -> None:
    before = _stats(batching_server.target, "widths")
    inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(24)]  # 1..3 rows each
    results = asyncio.run(_concurrent(batching_server.target, "widths", inputs))
    for x, result in zip(inputs, results, strict=True):
        assert isinstance(result, dict), result
        np.testing.assert_array_equal(result["y"], x)  # each caller gets exactly its rows back
    after = _stats(batching_server.target, "widths")
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    runs = after.execution_count - before.execution_count
    assert requests == 24
    assert after.inference_count - before.inference_count == sum(len(x) for x in inputs)
    assert runs < requests / 2, f"{requests} requests took {runs} runs: no batching"
    assert max(b.batch_size for b in after.batch_stats) > 3  # a run carried several requests' rows


@pytest.mark.fast
def test_requests_of_different_shapes_are_never_mixed(batching_server: RunningServer) -> None:
    before = {b.batch_size: b.compute_infer.count for b in _stats(batching_server.target, "widths").batch_stats}
    inputs = [np.full((1, 2 if i % 2 else 5), i, dtype=np.float32) for i in range(16)]
    results = asyncio.run(_concurrent(batching_server.target, "widths", inputs))
    for x, result in zip(inputs, results, strict=True):
        assert isinstance(result, dict), result
        assert result["y"].shape == x.shape
        np.testing.assert_array_equal(result["y"], x)
    after = _stats(batching_server.target, "widths")
    runs = after.execution_count
    # 8 requests of each width arrive together: at least two runs, and none of them mixed
    # (a mixed run could not even be concatenated; the answers above would be errors).
    new_runs = {b.batch_size: b.compute_infer.count - before.get(b.batch_size, 0) for b in after.batch_stats}
    assert sum(new_runs.values()) >= 2
    assert runs > 0


@pytest.mark.fast
def test_a_batch_is_capped_at_max_batch_size(batching_server: RunningServer) -> None:
    inputs = [np.full((16, 3), i, dtype=np.float32) for i in range(8)]  # 128 rows; the cap is 64
    results = asyncio.run(_concurrent(batching_server.target, "echo", inputs))
    for x, result in zip(inputs, results, strict=True):
        assert isinstance(result, dict), result
        np.testing.assert_array_equal(result["out_FP32"], x)
    sizes = [b.batch_size for b in _stats(batching_server.target, "echo").batch_stats]
    assert max(sizes) <= 64
    assert 64 in sizes  # four requests of 16 rows shared a run


@pytest.mark.fast
def test_a_full_queue_refuses_at_once_and_the_rest_are_served(batching_server: RunningServer) -> None:
    x = np.random.default_rng(0).standard_normal((1, SLOW_WIDTH)).astype(np.float32)
    results = asyncio.run(_concurrent(batching_server.target, "slow", [x] * 12))
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    served = [r for r in results if isinstance(r, dict)]
    assert len(refused) + len(served) == 12, results
    assert refused, "12 requests at once on a queue of 2 behind one instance: some must be refused"
    assert "queue" in str(refused[0])
    assert "slow" in str(refused[0])
    assert len(served) >= 2  # the queue's two places were served
    with Client(batching_server.target) as client:  # and the server goes on serving
        assert client.infer("slow", {"x": x})["y"].shape == (1, SLOW_WIDTH)


@pytest.mark.fast
def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed(batching_server: RunningServer) -> None:
    rows = np.random.default_rng(1).standard_normal((256, SLOW_WIDTH)).astype(np.float32)
    x = rows[:1]
    before = _stats(batching_server.target, "slow")

    async def scenario() -> tuple[object, object]:
        async with AsyncClient(batching_server.target, timeout=30) as client:
            first = asyncio.ensure_future(client.infer("slow", {"x": rows}))  # 256 rows on the only instance
            await asyncio.sleep(0.01)
            late = asyncio.ensure_future(client.infer("slow", {"x": x}, timeout=0.03))
            return tuple(await asyncio.gather(first, late, return_exceptions=True))  # type: ignore[return-value]

    first, late = asyncio.run(scenario())
    assert isinstance(first, dict)
    assert isinstance(late, DeadlineExceeded)
    after = _stats(batching_server.target, "slow")
    # Only the first request ran: the late one was dropped before its batch was formed.
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1


@pytest.mark.fast
def test_a_request_whose_caller_went_away_is_never_computed(batching_server: RunningServer) -> None:
    rows = np.random.default_rng(2).standard_normal((256, SLOW_WIDTH)).astype(np.float32)
    before = _stats(batching_server.target, "slow")

    async def scenario() -> object:
        async with AsyncClient(batching_server.target, timeout=30) as client:
            first = asyncio.ensure_future(client.infer("slow", {"x": rows}))  # 256 rows on the only instance
            await asyncio.sleep(0.01)
            gone = asyncio.ensure_future(client.infer("slow", {"x": rows[:1]}))  # no deadline: waits in the queue
            await asyncio.sleep(0.01)
            gone.cancel()  # the caller leaves: the call is cancelled on the server too
            await asyncio.gather(gone, return_exceptions=True)
            return await first

    assert isinstance(asyncio.run(scenario()), dict)
    time.sleep(0.5)  # let the server finish whatever it would still run
    after = _stats(batching_server.target, "slow")
    assert after.execution_count - before.execution_count == 1  # the cancelled request never ran
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1


@pytest.mark.fast
def test_an_unreadable_config_file_fails_that_model_only(batching_server: RunningServer) -> None:
    with grpc.insecure_channel(batching_server.target) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    states = {m.name: (m.state, m.reason) for m in index.models}
    assert states["broken-config"][0] == "UNAVAILABLE"
    assert "config.pbtxt" in states["broken-config"][1]
    assert "max_batch_size" in states["broken-config"][1]
    assert states["misspelt-knob"][0] == "UNAVAILABLE"  # a knob it does not know is refused, not ignored
    assert "generation_max_batches" in states["misspelt-knob"][1]
    assert states["zero-streams"][0] == "UNAVAILABLE"
    assert "generation_max_streams is 0; it must be >= 1" in states["zero-streams"][1]
    assert states["widths"][0] == "READY"


@pytest.mark.fast
def test_model_config_reports_the_batching_knobs(batching_server: RunningServer) -> None:
    with grpc.insecure_channel(batching_server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        echo = stub.ModelConfig(pb.ModelConfigRequest(name="echo"), timeout=10).config
        slow = stub.ModelConfig(pb.ModelConfigRequest(name="slow"), timeout=10).config
    assert echo.max_batch_size == 64
    assert echo.dynamic_batching.max_queue_delay_microseconds == 200000
    assert slow.dynamic_batching.default_queue_policy.max_queue_size == 2
    assert slow.instance_group[0].count == 1
    assert slow.parameters["intra_op_thread_count"].string_value == "1"
    assert "generation_max_streams" not in slow.parameters  # not set: the server's flag holds
    with grpc.insecure_channel(batching_server.target) as channel:
        widths = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="widths"), timeout=10)
    assert widths.config.parameters["generation_max_streams"].string_value == "12"


def test_batching_can_be_turned_off(own_server: Callable[..., RunningServer], batching_repository: Path) -> None:
    repo = batching_repository.parent / "unbatched"
    if not repo.exists():
        repo.mkdir()
        echo_model(repo / "echo" / "1" / "model.onnx", ["FP32"])
    running = own_server("--no-dynamic-batching", repository=repo)
    inputs = [np.full((1, 3), i, dtype=np.float32) for i in range(16)]
    results = asyncio.run(_concurrent(running.target, "echo", inputs))
    assert all(isinstance(r, dict) for r in results)
    stats = _stats(running.target, "echo")
    assert stats.execution_count == stats.inference_stats.success.count == 16
    assert [b.batch_size for b in stats.batch_stats] == [1]


@pytest.mark.fast
def test_one_bad_request_fails_alone_when_its_batch_fails(batching_server: RunningServer) -> None:
    ids = [np.array([[i % 10]], dtype=np.int64) for i in range(11)] + [np.array([[99]], dtype=np.int64)]
    before = _stats(batching_server.target, "lookup")
    results = asyncio.run(_concurrent(batching_server.target, "lookup", ids))
    for x, result in zip(ids[:-1], results[:-1], strict=True):
        assert isinstance(result, dict), result
        assert result["y"].tolist() == [[[2.0 * x[0, 0], 2.0 * x[0, 0] + 1]]]
    assert isinstance(results[-1], InvalidArgument), results[-1]
    assert "99" in str(results[-1])
    after = _stats(batching_server.target, "lookup")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 11
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def _rowwise_model(path: Path) -> None:
    """Each row costs the same however many there are (no weights to share): a batch gains nothing."""
    nodes, current = [], "x"
    for step in range(6):
        nodes.append(helper.make_node("Sin", [current], [f"s{step}"]))
        current = f"s{step}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "rowwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1 << 19])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1 << 19])],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.fast
def test_requests_are_combined_only_where_a_measured_batch_costs_less_per_row(tmp_path: Path) -> None:
    """The shared-weight model gains from a batch of two and keeps batching; the row-wise one does not and
    runs each request alone, unless batching is asked for in so many words (a queue delay)."""
    _rowwise_model(tmp_path / "rowwise" / "1" / "model.onnx")
    slow_model(tmp_path / "slow" / "1" / "model.onnx")

    def load(name: str, settings: Settings) -> OnnxModel:
        runtime = Runtime.from_settings(settings)
        config = serving_config(tmp_path / name, settings, runtime.cpus)
        return OnnxModel(name, "1", tmp_path / name / "1" / "model.onnx", runtime, config)

    for name, combined in (("slow", True), ("rowwise", False)):
        model = load(name, Settings())
        assert bool(model.batcher.policy.max_batch_size) is combined, name
        assert model_config(model).HasField("dynamic_batching") is combined, name
        model.close()
    asked = load("rowwise", Settings(max_queue_delay_us=100))
    assert asked.batcher.policy.max_batch_size == 256
    asked.close()
