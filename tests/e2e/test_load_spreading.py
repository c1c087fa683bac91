"""One SDK client, three replicas: calls spread round-robin, and stopping a replica loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from nnserve_client import Client
from tests.conftest import ECHO_TYPES, RunningServer
from tests.server.test_health_reflection_metrics import sample


def _inputs() -> dict[str, np.ndarray]:
    return {
        f"in_{t}": np.array([[b"a", b"b", b"c"]], dtype=object) if t == "BYTES" else np.ones((1, 3), dtype)
        for t, (_, dtype) in ECHO_TYPES.items()
    }


def _served(running: RunningServer) -> float:
    return sample(running.metrics(), "nnserve_requests_total", model="echo", version="1", rpc="ModelInfer", code="OK")


def test_three_replicas_share_the_calls(own_server: Callable[..., RunningServer]) -> None:
    servers = [own_server("--grace-period-s", "5") for _ in range(3)]
    inputs = _inputs()
    with Client([s.target for s in servers], timeout=30) as client:
        for _ in range(300):
            assert client.infer("echo", inputs, outputs=["out_FP32"])["out_FP32"].shape == (1, 3)
        shares = [_served(s) for s in servers]
        assert sum(shares) == 300
        assert min(shares) >= 60, f"calls per replica: {shares}; each should have >= 20%"


def test_a_replica_can_stop_mid_run_without_failing_a_call(own_server: Callable[..., RunningServer]) -> None:
    servers = [own_server("--grace-period-s", "5") for _ in range(3)]
    inputs = _inputs()
    with Client([s.target for s in servers], timeout=30) as client:
        # Stop one replica while calls are in flight: every call must still succeed.
        failures: list[BaseException] = []
        done = threading.Event()

        def call_until_done() -> None:
            while not done.is_set():
                try:
                    client.infer("echo", inputs, outputs=["out_FP32"])
                except Exception as error:
                    failures.append(error)

        workers = [threading.Thread(target=call_until_done) for _ in range(4)]
        for worker in workers:
            worker.start()
        before = sum(_served(s) for s in servers)
        assert servers[1].stop() == 0  # SIGTERM: NOT_SERVING, drain, exit
        survivors = [servers[0], servers[2]]
        while sum(_served(s) for s in survivors) < before + 200:
            assert not failures, failures[:3]
            time.sleep(0.05)
        done.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:3]
