"""The server's KServe v2 surface in this process, on graphs built with onnx.helper: the fast tier's
server tests (create_server on port 0; the subprocess tests cover start-up, signals and the CLI)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ECHO_TYPES, echo_model
from grpc_health.v1 import health_pb2, health_pb2_grpc
from in_process import serving

from nnserve_client import AsyncClient, InvalidArgument, NotFound
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)


def _value(datatype: str, rows: int) -> np.ndarray:
    dtype = ECHO_TYPES[datatype][1]
    if datatype == "BYTES":
        return np.array([[f"r{r}c{c}".encode() for c in range(3)] for r in range(rows)], dtype=object)
    return (np.arange(rows * 3) % 2 == 1 if datatype == "BOOL" else np.arange(rows * 3)).astype(dtype).reshape(rows, 3)


@pytest.fixture(scope="module")
def echo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("in-process")
    echo_model(root / "echo" / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return root


async def test_every_datatype_goes_in_and_comes_back(echo_repository: Path) -> None:
    async with serving(echo_repository) as server, AsyncClient(server.target) as client:
        inputs = {f"in_{t}": _value(t, rows=2) for t in ECHO_TYPES}
        result = await client.infer("echo", inputs)
        for datatype in ECHO_TYPES:
            np.testing.assert_array_equal(result[f"out_{datatype}"], inputs[f"in_{datatype}"])
            assert result[f"out_{datatype}"].dtype == inputs[f"in_{datatype}"].dtype


async def test_metadata_config_and_health_describe_what_loaded(echo_repository: Path) -> None:
    async with serving(echo_repository) as server, grpc.aio.insecure_channel(server.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = await kserve.ModelMetadata(pb.ModelMetadataRequest(name="echo"))
        assert {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}["in_FP32"] == ("FP32", [-1, 3])
        config = (await kserve.ModelConfig(pb.ModelConfigRequest(name="echo"))).config
        assert config.max_batch_size == 256  # every input and output has a free first dimension
        index = {m.name: m for m in (await kserve.RepositoryIndex(pb.RepositoryIndexRequest())).models}
        assert index["echo"].state == "READY"
        assert index["broken"].state == "UNAVAILABLE"
        assert index["broken"].reason
        health = health_pb2_grpc.HealthStub(channel)
        statuses = {
            name: (await health.Check(health_pb2.HealthCheckRequest(service=name))).status
            for name in ("", "echo", "broken")
        }
        serving_status, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses == {"": serving_status, "echo": serving_status, "broken": not_serving}


async def test_bad_requests_are_refused_with_what_to_fix(echo_repository: Path) -> None:
    async with serving(echo_repository) as server, AsyncClient(server.target) as client:
        with pytest.raises(NotFound, match="echo"):  # the server names the models it has
            await client.infer("ehco", {"in_FP32": np.zeros((1, 3), np.float32)})
        with pytest.raises(InvalidArgument, match="in_FP32"):
            await client.infer("echo", {"in_FP32": np.zeros((1, 4), np.float32)})
        with pytest.raises(InvalidArgument, match="in_INT8"):
            await client.infer("echo", {"in_INT8": np.zeros((1, 3), np.float32)})


async def test_a_request_is_counted_once_in_the_metrics(echo_repository: Path) -> None:
    async with serving(echo_repository) as server, AsyncClient(server.target) as client:
        inputs = {f"in_{t}": _value(t, rows=1) for t in ECHO_TYPES}
        for _ in range(3):
            await client.infer("echo", inputs, outputs=["out_FP32"])
        samples = {
            (s.name, s.labels.get("code")): s.value
            for family in server.metrics.registry.collect()
            for s in family.samples
            if s.labels.get("model") == "echo" and s.labels.get("rpc") == "ModelInfer"
        }
        assert samples[("nnserve_requests_total", "OK")] == 3
