"""The server-wide in-flight limit: beyond it RESOURCE_EXHAUSTED at once, and health still answers."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import RunningServer
from test_health_reflection_metrics import SERVING, check, sample

from nnserve_client import Client, ResourceExhausted


def test_requests_beyond_the_in_flight_limit_are_refused_at_once(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--max-in-flight", "2", "--instances", "1")
    slow = {"x": np.ones((1, 1024), np.float32)}
    with Client(running.target, timeout=60, retries=0) as client:

        def call(_: int) -> str:
            try:
                client.infer("slow", slow)
            except ResourceExhausted as error:
                return error.details
            return "served"

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(call, range(36)))
        assert check(running.target, "") == SERVING  # health is not admitted against the limit
        assert client.infer("slow", slow)["y"].shape == (1, 1024)  # and it serves again once calm
    refused = [outcome for outcome in outcomes if outcome != "served"]
    assert refused, outcomes
    assert all("--max-in-flight" in reason for reason in refused), refused[:1]
    assert outcomes.count("served") >= 2, outcomes
    labels = {"model": "slow", "version": "", "rpc": "ModelInfer", "reason": "rejected"}
    assert sample(running.metrics(), "nnserve_request_failures_total", **labels) == len(refused)
