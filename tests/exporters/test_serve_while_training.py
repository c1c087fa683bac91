"""`make serve` on a repository not built yet: the server answers at once and each model joins it as
soon as it is trained (the zoo in --fast mode, one job, so the later families are still training)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import start_command
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve_client import Client, Unavailable

ALL_MODELS = 12


def _serve(repository: Path) -> list[str]:
    return [
        sys.executable, "-m", "nnserve_exporters.cli", "serve", "--repository", str(repository), "--fast",
        "--jobs", "1", "--", "--port", "0", "--metrics-port", "-1",
    ]  # fmt: skip


def test_the_zoo_is_served_while_it_trains_and_a_built_one_at_once(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    running = start_command(_serve(repository))
    try:
        assert "training: " in running.log()  # the banner names the models still training
        with Client(running.target, retries=0) as client:
            with pytest.raises(Unavailable, match=r"model 'digits-gan' is being trained; ready (in about \d+ s|any)"):
                client.classify("digits-gan", texts=["x"])
            deadline = time.monotonic() + 240
            while len([m for m in client.models() if m.ready]) < ALL_MODELS:
                assert time.monotonic() < deadline, running.log()[-3000:]
                assert running.process.poll() is None, running.log()[-3000:]
                time.sleep(0.5)
            assert client.classify("digits-fnn", [[0.0] * 64])[0].label  # served, by the server that was up all along
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="digits-gan"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 60
        while "the whole zoo is built" not in running.log():
            assert time.monotonic() < deadline, running.log()[-3000:]
            time.sleep(0.2)
        assert not (repository / ".training.json").exists()
        assert not list(tmp_path.glob("*.partial"))
    finally:
        running.process.send_signal(signal.SIGINT)
        running.process.wait(30)

    started = time.monotonic()
    again = start_command(_serve(repository))  # complete: the server alone, at once
    try:
        assert time.monotonic() - started < 30
        assert f"{ALL_MODELS} models ready" in again.log()
        assert "training" not in again.log()
    finally:
        again.stop()
