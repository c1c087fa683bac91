"""Start-up, model load and unload, quarantine of a broken model, and graceful shutdown."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_health_reflection_metrics import NOT_SERVING, SERVING, check, sample

from nnserve_client import AsyncClient, Client, InvalidArgument, NotFound, Unavailable
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc


def test_unload_then_load(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()
    x = np.zeros((1, 64), np.float32)
    with grpc.insecure_channel(running.target) as channel, Client(running.target) as client:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits-fnn"))
        assert check(running.target, "digits-fnn") == NOT_SERVING
        assert client.model_ready("digits-fnn") is False
        with pytest.raises(Unavailable, match="UNLOADED"):
            client.classify("digits-fnn", x)
        states = {(m.name, m.version): m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert states[("digits-fnn", "2")] == "UNLOADED"
        assert client.infer("slow", {"x": np.zeros((1, 1024), np.float32)})  # the others still serve
        assert sample(running.metrics(), "nnserve_model_ready", model="digits-fnn") == 0

        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits-fnn"))
        assert check(running.target, "digits-fnn") == SERVING
        assert client.classify("digits-fnn", x)[0].label in "0123456789"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("../etc", InvalidArgument, "not allowed"),
        ("/abs/path", InvalidArgument, "not allowed"),
        ("a\x00b", InvalidArgument, "not allowed"),
        ("missing-model", NotFound, "no model 'missing-model'"),
    ],
)
def test_load_refuses_bad_names(server: RunningServer, name: str, error: type[Exception], message: str) -> None:
    from nnserve_client.errors import from_rpc_error

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
    mapped = from_rpc_error(caught.value)
    assert isinstance(mapped, error)
    assert message in mapped.details


def test_a_corrupt_model_is_quarantined(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(model_repository / "digits-fnn", repo / "digits-fnn")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    running = own_server(repository=repo)
    with Client(running.target) as client:
        assert client.model_ready("digits-fnn")
        assert not client.model_ready("broken")
        with pytest.raises(Unavailable, match="failed to load"):
            client.infer("broken", {})
    assert check(running.target, "broken") == NOT_SERVING
    assert "model broken version 1 failed to load" in running.log()
    text = running.metrics()
    assert sample(text, "nnserve_model_load_failures_total", model="broken") == 1
    assert sample(text, "nnserve_model_ready", model="broken") == 0
    assert sample(text, "nnserve_model_ready", model="digits-fnn") == 1


def test_missing_provider_refuses_to_start(model_repository: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*CUDAExecutionProvider.*not available"):
        start_server(model_repository, "--providers", "cuda,cpu")


def _refused_start(*flags: str) -> str:
    """`nnserve serve` that must refuse: one line on stderr, exit 1, no traceback, before any model loads."""
    command = [sys.executable, "-m", "nnserve_server.process.cli", "serve", "--log-level", "INFO", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "loaded model" not in done.stderr, done.stderr  # refused before the first model loads
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_busy_port_or_a_missing_repository_refuses_to_start_in_one_line(
    server: RunningServer, model_repository: Path, tmp_path: Path
) -> None:
    busy_grpc = _refused_start("--model-repository", str(model_repository), "--port", str(server.port))
    assert f"cannot bind the gRPC port 127.0.0.1:{server.port}; is it in use?" in busy_grpc
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        busy_metrics = _refused_start(
            "--model-repository", str(model_repository), "--port", "0", "--metrics-port", str(metrics_port)
        )
    assert f"cannot bind the metrics endpoint 127.0.0.1:{metrics_port}" in busy_metrics
    missing = _refused_start("--model-repository", str(tmp_path / "no-such-dir"), "--port", "0")
    assert f"the model repository {tmp_path / 'no-such-dir'} does not exist" in missing
    assert "--poll-interval-s to wait for it" in missing


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["nnserve_server.process.cli", "serve", "--port", "abc"], "nnserve serve: argument --port: invalid"),
        (["nnserve_server.process.cli", "serve", "--workers", "0"], "workers is 0; use 1..64"),
        (["nnserve_exporters.cli", "zoo", "--jobs", "x"], "nnserve-export zoo: argument --jobs: invalid int value"),
        (["nnserve_exporters.cli", "zoo", "--only", "nope"], "argument --only: invalid choice: 'nope'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(command: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_provider_fallback_is_logged_and_counted(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--providers", "cuda,cpu", "--allow-provider-fallback")
    assert "falling back" in running.log()
    assert sample(running.metrics(), "nnserve_provider_fallbacks_total", provider="CUDAExecutionProvider") == 1
    with Client(running.target) as client:
        assert client.classify("digits-fnn", np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_requests_in_flight(own_server: Callable[..., RunningServer], signum: int) -> None:
    running = own_server("--grace-period-s", "30")
    statuses: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(running.target) as channel:
            request = health_pb2.HealthCheckRequest(service="")
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=60):
                    statuses.append(response.status)
                    watching.set()
            except grpc.RpcError:
                pass  # the server went away after reporting NOT_SERVING

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(10)

    async def load() -> list[object]:
        async with AsyncClient(running.target, timeout=60) as client:
            # About 13 GFLOP a request: eight of them took 0.4 s here, so a fixed sleep before the signal
            # sometimes came after the last answer; 24 of them, and the signal once the server counts them.
            x = np.ones((256, 1024), np.float32)
            calls = [asyncio.ensure_future(client.infer("slow", {"x": x})) for _ in range(24)]
            for _ in range(200):  # the signal once the server says requests are in flight
                if await asyncio.to_thread(lambda: sample(running.metrics(), "nnserve_in_flight_requests")):
                    break
                await asyncio.sleep(0.01)
            running.process.send_signal(signum)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(load())
    assert running.process.wait(60) == 0
    watcher.join(10)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert all(r["y"].shape == (256, 1024) for r in results)  # type: ignore[index]
    assert statuses[0] == SERVING
    assert NOT_SERVING in statuses
    draining = re.search(r"draining (\d+) requests", running.log())
    assert draining is not None
    assert int(draining.group(1)) >= 1  # the signal really came mid-load
    assert "stopped" in running.log()
