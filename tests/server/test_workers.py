"""`--workers N`: several processes on one port, one metrics endpoint that adds them up."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import ECHO_TYPES, RunningServer
from tests.server.test_health_reflection_metrics import sample


def _worker_pids(running: RunningServer) -> list[int]:
    match = re.search(r"workers \(SO_REUSEPORT\), pids ([\d, ]+)", running.log())
    assert match, running.log()
    return [int(pid) for pid in match.group(1).split(", ")]


def _echo_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    for datatype, (_, dtype) in ECHO_TYPES.items():
        array = np.array([[b"a", b"b", b"c"]], dtype=object) if datatype == "BYTES" else np.ones((1, 3), dtype)
        request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[1, 3])
        request.raw_input_contents.append(codec.to_raw(array))
    return request


def _send(target: str, count: int) -> None:
    """`count` requests, each on a connection of its own: the kernel picks a worker per connection."""
    request = _echo_request()
    for _ in range(count):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            assert len(response.outputs) == len(ECHO_TYPES)


def test_workers_share_the_port_and_their_metrics_add_up(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--workers", "2")
    pids = _worker_pids(running)
    assert len(set(pids)) == 2
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    _send(running.target, 30)
    # Each worker counted its own requests; the one endpoint shows their sum, histograms included.
    text = running.metrics()
    echo = {"model": "echo", "version": "1"}
    assert sample(text, "nnserve_requests_total", **echo, rpc="ModelInfer", code="OK") == 30
    assert sample(text, "nnserve_request_duration_seconds_count", **echo, rpc="ModelInfer", code="OK") == 30
    assert sample(text, "nnserve_inferences_total", **echo) == 30
    assert sample(text, "nnserve_batch_size_bucket", **echo, le="+Inf") == 30
    assert sample(text, "nnserve_compute_seconds_count", **echo) == 30
    # Gauges: ready if any live worker has it; in flight and queued are sums over the live workers.
    assert sample(text, "nnserve_model_ready", model="echo") == 1
    assert sample(text, "nnserve_model_versions_loaded", model="echo") == 1
    assert sample(text, "nnserve_in_flight_requests") == 0
    assert sample(text, "nnserve_queue_depth", **echo) == 0
    # Shared memory is off in workers (a region registered with one would be unknown to the others): said so.
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert "system_shared_memory" not in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
        with pytest.raises(grpc.RpcError) as refused:
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--workers above 1" in str(refused.value.details())

    # A worker that dies is started again, and the port keeps serving meanwhile. (Connections the
    # kernel had already queued on the dead worker's socket are reset: that is for client retries.)
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "exited with" not in running.log():
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.05)
    _send(running.target, 10)
    while running.log().count("is ready") < 3:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.2)
    assert "starting it again" in running.log()
    _send(running.target, 10)
    # The dead worker's counts stay in the sum (counters never go down): 50 in all.
    assert (
        sample(running.metrics(), "nnserve_requests_total", model="echo", version="1", rpc="ModelInfer", code="OK")
        == 50
    )
    assert running.stop() == 0


@pytest.mark.fast
def test_worker_metrics_sum_counters_and_combine_gauges_by_mode() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from nnserve_server.core.metrics import ServerMetrics
    from nnserve_server.process.worker_metrics import WorkerMetrics, _read

    def exposition(requests: int, ready: int, in_flight: int) -> str:
        metrics = ServerMetrics(CollectorRegistry(), process=False)
        for _ in range(requests):
            metrics.stats.count("echo", "1", "ModelInfer", "OK", 0.001)
        metrics.model_ready.labels("echo").set(ready)
        metrics.stats.in_flight = lambda: in_flight
        return generate_latest(metrics.registry).decode()

    merged = WorkerMetrics()
    for index, text in enumerate((exposition(3, 1, 2), exposition(4, 0, 5))):
        headers, samples = _read(text)
        merged._headers.update(headers)
        merged._last[index] = samples
    registry = CollectorRegistry()
    registry.register(merged)
    text = generate_latest(registry).decode()
    echo = {"model": "echo", "version": "1", "rpc": "ModelInfer", "code": "OK"}
    assert sample(text, "nnserve_requests_total", **echo) == 7
    assert sample(text, "nnserve_request_duration_seconds_count", **echo) == 7
    assert sample(text, "nnserve_model_ready", model="echo") == 1  # livemax
    assert sample(text, "nnserve_in_flight_requests") == 7  # livesum
    assert "process_cpu_seconds_total" not in text  # one process's figures are not added up
    merged.retire(0)  # its counters stay in the sum, its gauges leave with it
    text = generate_latest(registry).decode()
    assert sample(text, "nnserve_requests_total", **echo) == 7
    assert sample(text, "nnserve_model_ready", model="echo") == 0
    assert sample(text, "nnserve_in_flight_requests") == 5


def test_workers_exit_when_their_supervisor_is_killed(own_server: Callable[..., RunningServer]) -> None:
    """A supervisor killed with -9 runs no cleanup: the kernel tells the workers (SIGTERM, a drain)."""
    running = own_server("--workers", "2", "--grace-period-s", "1")
    pids = _worker_pids(running)
    running.process.kill()
    running.process.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), pids


def _alive(pid: int) -> bool:
    """Running, not a zombie (the workers' parent is gone; init reaps them)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
