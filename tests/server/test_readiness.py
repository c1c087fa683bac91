"""Readiness that tells the truth: with --strict-readiness (Triton's name) the server's health, its
inference service's and ServerReady say SERVING only while every model of the repository is ready.
Liveness and each model's own health stay apart."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from conftest import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
PROBED = ("", "inference.GRPCInferenceService")  # what the Kubernetes probes ask for


def _repository(model_repository: Path, tmp_path: Path, broken: bool) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(model_repository / "digits-fnn", repo / "digits-fnn")
    if broken:
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    return repo


def _readiness(target: str) -> tuple[bool, list[int], int, bool, bool]:
    """ServerReady, the probed health statuses, digits-fnn's health, ServerLive, ModelReady(digits-fnn)."""
    with grpc.insecure_channel(target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        probed = [health.Check(health_pb2.HealthCheckRequest(service=name)).status for name in PROBED]
        model = health.Check(health_pb2.HealthCheckRequest(service="digits-fnn")).status
        return (
            kserve.ServerReady(pb.ServerReadyRequest()).ready,
            probed,
            model,
            kserve.ServerLive(pb.ServerLiveRequest()).live,
            kserve.ModelReady(pb.ModelReadyRequest(name="digits-fnn")).ready,
        )


def test_strict_readiness_waits_for_every_model(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    """A model that fails to load keeps the server not ready; the models that loaded still answer."""
    running = own_server("--strict-readiness", repository=_repository(model_repository, tmp_path, broken=True))
    assert _readiness(running.target) == (False, [NOT_SERVING, NOT_SERVING], SERVING, True, True)
    assert "strict readiness: NOT ready until every model is" in running.log()
    with grpc.insecure_channel(running.target) as channel:
        request = pb.ModelInferRequest(model_name="digits-fnn")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
        assert pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request).outputs[0].shape == [1, 10]


def test_strict_readiness_follows_loads_and_does_not_wait_for_a_model_unloaded_on_request(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    repo = _repository(model_repository, tmp_path, broken=True)
    running = own_server("--strict-readiness", repository=repo)
    assert _readiness(running.target)[:2] == (False, [NOT_SERVING, NOT_SERVING])
    shutil.rmtree(repo / "broken" / "1")
    shutil.copytree(repo / "digits-fnn" / "1", repo / "broken" / "1")  # fixed on disk, then loaded
    with grpc.insecure_channel(running.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        assert _readiness(running.target)[:2] == (True, [SERVING, SERVING])
        kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"))
        assert _readiness(running.target)[:2] == (True, [SERVING, SERVING])  # unloaded on purpose


def test_without_strict_readiness_a_started_server_is_ready_whatever_loaded(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    running = own_server(repository=_repository(model_repository, tmp_path, broken=True))
    assert _readiness(running.target) == (True, [SERVING, SERVING], SERVING, True, True)
    assert "strict readiness" not in running.log()


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnserve_server.process.cli", "check", "--model-repository", str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_loads_every_model_and_fails_on_one_that_does_not_load(model_repository: Path, tmp_path: Path) -> None:
    """`nnserve check`, which the zoo image runs as its serving user: exit 0 only when every model loads."""
    good = _check(_repository(model_repository, tmp_path / "good", broken=False))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "digits-fnn version 1: READY" in good.stdout
    assert "1 of 1 model ready" in good.stdout
    bad = _check(_repository(model_repository, tmp_path / "bad", broken=True))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "broken version 1: UNAVAILABLE (" in bad.stdout
    assert "1 of 2 models ready" in bad.stdout
    assert _check(tmp_path / "nowhere").returncode == 1
