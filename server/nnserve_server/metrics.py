"""Prometheus metrics, registered on a registry that the caller passes in (no module globals).

Latencies are histograms, not summaries, so they aggregate across pods.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# 100 us .. 30 s: covers a tiny MLP on loopback and a large model on a busy CPU.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "nnserve_requests",
            "gRPC requests answered, by model, version, RPC and status code",
            ["model", "version", "rpc", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "nnserve_request_duration_seconds",
            "Time from the request's arrival to its answer, by model, version and RPC",
            ["model", "version", "rpc"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_ready = Gauge(
            "nnserve_model_ready",
            "1 when the model has a version ready to serve, else 0",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",  # with --workers: ready while any live worker has it
        )
        self.provider_fallbacks = Counter(
            "nnserve_provider_fallbacks",
            "Requested execution providers that were missing at start, so the server fell back",
            ["provider"],
            registry=registry,
        )

    def observe_request(self, model: str, version: str, rpc: str, code: str, seconds: float) -> None:
        # labels() takes a lock and builds a key per call; the children are kept (label sets are bounded).
        key = (model, version, rpc, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(model, version, rpc, code),
                self.request_duration.labels(model, version, rpc),
            )
        children[0].inc()
        children[1].observe(seconds)

    async def model_state_changed(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)


def start_metrics_endpoint(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread, int]:
    """Serve /metrics in a background thread; returns the server, its thread and the bound port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread, server.server_port
