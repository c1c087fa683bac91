"""grpc.health.v1, server reflection and the Prometheus endpoint, against real servers."""

from __future__ import annotations

import re
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nnserve_client import Client, NotFound

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def test_health_overall_services_and_models(server: RunningServer) -> None:
    for service in ("", "inference.GRPCInferenceService", "nnserve.v1.Tasks", "digits-fnn", "echo"):
        assert check(server.target, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        check(server.target, "no-such-model")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_the_current_status(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="digits-fnn"), timeout=5
        )
        first = next(stream)
        stream.cancel()
    assert first.status == SERVING


def list_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        return sorted(s.name for r in responses for s in r.list_services_response.service)


def test_reflection_lists_the_services(server: RunningServer) -> None:
    assert list_services(server.target) == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService",
        "nnserve.v1.Tasks",
    ]


def test_reflection_can_be_turned_off(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--no-reflection")
    with pytest.raises(grpc.RpcError) as caught:
        list_services(running.target)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    for line in metrics.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_by_model_version_rpc_and_code(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()
    with Client(running.target) as client:
        for _ in range(3):
            client.infer("digits-fnn", {"input": np.zeros((1, 64), np.float32)}, version="1")
        client.classify("digits-fnn", np.zeros((2, 64), np.float32))
        with pytest.raises(NotFound):
            client.infer("who-knows", {"input": np.zeros((1, 64), np.float32)})
    text = running.metrics()
    ok = {"model": "digits-fnn", "version": "1", "rpc": "ModelInfer", "code": "OK"}
    assert sample(text, "nnserve_requests_total", **ok) == 3
    assert sample(text, "nnserve_requests_total", model="digits-fnn", version="2", rpc="Classify", code="OK") == 1
    # Unknown names are folded into one label value, so callers cannot grow the series.
    assert sample(text, "nnserve_requests_total", model="unknown", version="", rpc="ModelInfer", code="NOT_FOUND") == 1
    assert "# TYPE nnserve_request_duration_seconds histogram" in text
    count = sample(text, "nnserve_request_duration_seconds_count", **ok)
    assert count == 3
    inf_bucket = sample(text, "nnserve_request_duration_seconds_bucket", **ok, le="+Inf")
    assert inf_bucket == 3
    assert sample(text, "nnserve_model_ready", model="digits-fnn") == 1
