"""Prometheus metrics, registered on a registry that the caller passes in (no module globals).

Every metric is declared once in `METRICS`; the README's table is generated from the same list
(`metrics_table()`, a test compares). Latencies are histograms, not summaries, so they aggregate
across pods. With `--workers N` each worker writes prometheus-client's multiprocess files and the
supervisor's endpoint adds them up; each gauge says how (`multiprocess_mode`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# 100 us .. 30 s: covers a tiny MLP on loopback and a large model on a busy CPU.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# 10 us .. 1 s: decoding and encoding a request is far cheaper than serving it.
CODEC_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048)

# What a failed request's status code counts as in nnserve_request_failures_total.
FAILURE_REASONS = {
    "RESOURCE_EXHAUSTED": "rejected",
    "DEADLINE_EXCEEDED": "deadline",
    "CANCELLED": "cancelled",
    "INVALID_ARGUMENT": "invalid",
    "NOT_FOUND": "not_found",
    "UNAVAILABLE": "unavailable",
    "UNIMPLEMENTED": "unimplemented",
    "INTERNAL": "internal",
    "UNKNOWN": "internal",
}


@dataclass(frozen=True)
class MetricSpec:
    attribute: str  # ServerMetrics' attribute
    name: str  # without the _total a counter gets on exposition
    kind: type[Counter] | type[Gauge] | type[Histogram]
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()
    multiprocess_mode: str = ""  # gauges: how --workers combines the processes' values


MODEL = ("model", "version")
METRICS = (
    MetricSpec("requests", "nnserve_requests", Counter, (*MODEL, "rpc", "code"),
               "gRPC requests answered, by model, version, RPC and status code"),
    MetricSpec("request_duration", "nnserve_request_duration_seconds", Histogram, (*MODEL, "rpc", "code"),
               "Time from a request's arrival to its answer (a stream: to its end)", LATENCY_BUCKETS),
    MetricSpec("failures", "nnserve_request_failures", Counter, (*MODEL, "rpc", "reason"),
               "Failed requests by reason: rejected (queue full), deadline, cancelled, invalid, not_found, "
               "unavailable, unimplemented, internal"),
    MetricSpec("inferences", "nnserve_inferences", Counter, MODEL,
               "Rows (batch items) inferred; with nnserve_batch_size_count, the runs they took"),
    MetricSpec("queue_wait", "nnserve_queue_wait_seconds", Histogram, MODEL,
               "Time a request waited in its model's queue before its run began", LATENCY_BUCKETS),
    MetricSpec("compute", "nnserve_compute_seconds", Histogram, MODEL,
               "onnxruntime time of the run that served a request (its whole batch)", LATENCY_BUCKETS),
    MetricSpec("decode", "nnserve_decode_seconds", Histogram, (*MODEL, "rpc"),
               "Time turning a request into arrays (tensor decoding, image and text preprocessing)", CODEC_BUCKETS),
    MetricSpec("encode", "nnserve_encode_seconds", Histogram, (*MODEL, "rpc"),
               "Time turning results into the response message", CODEC_BUCKETS),
    MetricSpec("batch_size", "nnserve_batch_size", Histogram, MODEL,
               "Rows per onnxruntime run (dynamic batches and batched requests)", BATCH_BUCKETS),
    MetricSpec("generated_tokens", "nnserve_generated_tokens", Histogram, MODEL,
               "Tokens generated per Generate stream", TOKEN_BUCKETS),
    MetricSpec("time_to_first_token", "nnserve_time_to_first_token_seconds", Histogram, MODEL,
               "Time from a Generate request's arrival to its first streamed message", LATENCY_BUCKETS),
    MetricSpec("in_flight", "nnserve_in_flight_requests", Gauge, (),
               "Requests being answered now", multiprocess_mode="livesum"),
    MetricSpec("queue_depth", "nnserve_queue_depth", Gauge, MODEL,
               "Requests waiting in the model's queue, sampled when each run ends", multiprocess_mode="livesum"),
    MetricSpec("model_ready", "nnserve_model_ready", Gauge, ("model",),
               "1 when the model has a version ready to serve, else 0", multiprocess_mode="livemax"),
    MetricSpec("versions_loaded", "nnserve_model_versions_loaded", Gauge, ("model",),
               "Versions of the model loaded and ready", multiprocess_mode="livemax"),
    MetricSpec("load_failures", "nnserve_model_load_failures", Counter, ("model",),
               "Versions that failed to load, so were quarantined (UNAVAILABLE, with the reason in calls to them)"),
    MetricSpec("load_duration", "nnserve_model_load_duration_seconds", Gauge, MODEL,
               "How long the version took to load and warm up", multiprocess_mode="livemax"),
    MetricSpec("provider", "nnserve_execution_provider", Gauge, ("provider",),
               "1 for each onnxruntime execution provider sessions are created with, in order of preference",
               multiprocess_mode="livemax"),
    MetricSpec("provider_fallbacks", "nnserve_provider_fallbacks", Counter, ("provider",),
               "Requested execution providers that were missing at start, so the server fell back"),
)  # fmt: skip


class ServerMetrics:
    """Every nnserve metric on one registry; label children are cached (label sets are bounded)."""

    def __init__(self, registry: CollectorRegistry, process: bool = True) -> None:
        self.registry = registry
        self._by_request: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        for spec in METRICS:
            options: dict[str, Any] = {"registry": registry}
            if spec.buckets:
                options["buckets"] = spec.buckets
            if spec.multiprocess_mode:
                options["multiprocess_mode"] = spec.multiprocess_mode
            setattr(self, spec.attribute, spec.kind(spec.name, spec.help, list(spec.labels), **options))
        if process:  # process_cpu_seconds_total, process_resident_memory_bytes, ... of this process
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    # Declared for the type checker; created from METRICS above.
    requests: Counter
    request_duration: Histogram
    failures: Counter
    inferences: Counter
    queue_wait: Histogram
    compute: Histogram
    decode: Histogram
    encode: Histogram
    batch_size: Histogram
    generated_tokens: Histogram
    time_to_first_token: Histogram
    in_flight: Gauge
    queue_depth: Gauge
    model_ready: Gauge
    versions_loaded: Gauge
    load_duration: Gauge
    load_failures: Counter
    provider: Gauge
    provider_fallbacks: Counter

    def observe_request(self, model: str, version: str, rpc: str, code: str, seconds: float) -> None:
        key = (model, version, rpc, code)
        children = self._by_request.get(key)
        if children is None:
            children = self._by_request[key] = (
                self.requests.labels(model, version, rpc, code),
                self.request_duration.labels(model, version, rpc, code),
            )
        children[0].inc()
        children[1].observe(seconds)
        if code != "OK":
            self.failures.labels(model, version, rpc, FAILURE_REASONS.get(code, "internal")).inc()

    async def model_state_changed(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)


class ModelMetrics:
    """The children one model version observes into, bound once when it loads."""

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self.inferences = metrics.inferences.labels(model, version)
        self.queue_wait = metrics.queue_wait.labels(model, version)
        self.compute = metrics.compute.labels(model, version)
        self.batch_size = metrics.batch_size.labels(model, version)
        self.queue_depth = metrics.queue_depth.labels(model, version)
        self.load_duration = metrics.load_duration.labels(model, version)
        self._metrics = metrics
        self._model = model
        self._version = version
        self._codec: dict[str, tuple[Any, Any]] = {}

    def codec(self, rpc: str) -> tuple[Any, Any]:
        """(decode, encode) histogram children for one RPC."""
        children = self._codec.get(rpc)
        if children is None:
            children = self._codec[rpc] = (
                self._metrics.decode.labels(self._model, self._version, rpc),
                self._metrics.encode.labels(self._model, self._version, rpc),
            )
        return children

    def generation(self) -> tuple[Any, Any]:
        return (
            self._metrics.generated_tokens.labels(self._model, self._version),
            self._metrics.time_to_first_token.labels(self._model, self._version),
        )


def metrics_table() -> str:
    """The README's table of every nnserve metric, from METRICS (a test keeps them in step)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for spec in METRICS:
        kind = spec.kind.__name__.lower()
        name = spec.name + ("_total" if spec.kind is Counter else "")
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "none"
        rows.append(f"| `{name}` | {kind} | {labels} | {spec.help} |")
    rows.append(
        "| `process_*`, `python_info` | gauge, counter | none | CPU seconds, resident and virtual memory, open "
        "files, start time of the server process (prometheus-client's process collector; one process only) |"
    )
    return "\n".join(rows)


def start_metrics_endpoint(
    host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread, int]:
    """Serve /metrics in a background thread; returns the server, its thread and the bound port."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread, server.server_port
