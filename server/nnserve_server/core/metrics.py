"""Prometheus metrics: the families nnserve exports, and the collector that reads them at scrape time.

Every metric is declared once in `METRICS`; docs/operations.md's table is generated from the same list
(`metrics_table()`, a test compares). Latencies are histograms, not summaries, so they aggregate
across pods. Figures counted per request (requests, latencies, inferences, batch sizes, ...) live in
`stats.py` as plain integers and become families only when the endpoint is scraped; the rest (model
state, load failures, providers) are ordinary prometheus-client gauges and counters, set rarely.
With `--workers N` the supervisor adds up its workers' expositions (`process/worker_metrics.py`); each gauge says how
(`multiprocess_mode`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from nnserve_server.core.errors import StartupError
from nnserve_server.core.stats import CodecStats, ModelStats, ServerStats
from nnserve_server.core.stats import Histogram as Buckets

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
    "UNAUTHENTICATED": "unauthenticated",
    "PERMISSION_DENIED": "permission_denied",
}


@dataclass(frozen=True)
class MetricSpec:
    attribute: str  # ServerMetrics' attribute
    name: str  # without the _total a counter gets on exposition
    kind: type[Counter] | type[Gauge] | type[Histogram]
    labels: tuple[str, ...]
    help: str
    per_request: bool = False  # counted in stats.py, exported by the collector; else a prometheus-client object
    multiprocess_mode: str = ""  # gauges: how --workers combines the processes' values


MODEL = ("model", "version")
METRICS = (
    MetricSpec("requests", "nnserve_requests", Counter, (*MODEL, "rpc", "code"),
               "gRPC requests answered, by model, version, RPC and status code", per_request=True),
    MetricSpec("request_duration", "nnserve_request_duration_seconds", Histogram, (*MODEL, "rpc", "code"),
               "Time from a request's arrival to its answer (a stream: to its end)", per_request=True),
    MetricSpec("failures", "nnserve_request_failures", Counter, (*MODEL, "rpc", "reason"),
               "Failed requests by reason: rejected (queue full), deadline, cancelled, invalid, not_found, "
               "unavailable, unimplemented, unauthenticated, permission_denied, internal", per_request=True),
    MetricSpec("inferences", "nnserve_inferences", Counter, MODEL,
               "Rows (batch items) inferred; with nnserve_batch_size_count, the runs they took", per_request=True),
    MetricSpec("queue_wait", "nnserve_queue_wait_seconds", Histogram, MODEL,
               "Time a request waited in its model's queue before its run began", per_request=True),
    MetricSpec("compute", "nnserve_compute_seconds", Histogram, MODEL,
               "onnxruntime time of the run that served a request (its whole batch)", per_request=True),
    MetricSpec("decode", "nnserve_decode_seconds", Histogram, (*MODEL, "rpc"),
               "Time turning a request into arrays (tensor decoding, image and text preprocessing)", per_request=True),
    MetricSpec("encode", "nnserve_encode_seconds", Histogram, (*MODEL, "rpc"),
               "Time turning results into the response message", per_request=True),
    MetricSpec("batch_size", "nnserve_batch_size", Histogram, MODEL,
               "Rows per onnxruntime run (dynamic batches and batched requests)", per_request=True),
    MetricSpec("uncombined_runs", "nnserve_uncombined_runs", Counter, MODEL,
               "Combined runs whose outputs lacked the batch's rows: their requests ran again one by one, and the "
               "model no longer combines requests", per_request=True),
    MetricSpec("generated_tokens", "nnserve_generated_tokens", Histogram, MODEL,
               "Tokens generated per Generate stream", per_request=True),
    MetricSpec("time_to_first_token", "nnserve_time_to_first_token_seconds", Histogram, MODEL,
               "Time from a Generate request's arrival to its first streamed message", per_request=True),
    MetricSpec("step_rows", "nnserve_generation_step_rows", Histogram, MODEL,
               "Streams advanced by one decoding step of a text generation (tokens per step)", per_request=True),
    MetricSpec("inter_token", "nnserve_inter_token_seconds", Histogram, MODEL,
               "Time between a text generation's consecutive tokens", per_request=True),
    MetricSpec("in_flight", "nnserve_in_flight_requests", Gauge, (),
               "Requests being answered now", per_request=True, multiprocess_mode="livesum"),
    MetricSpec("generation_streams", "nnserve_generation_streams", Gauge, (),
               "Text generations running now (Generate and the LLM convention)", per_request=True,
               multiprocess_mode="livesum"),
    MetricSpec("generation_memory", "nnserve_generation_memory_bytes", Gauge, (),
               "Cache and state bytes the running generations hold, against --generation-memory-mb",
               per_request=True, multiprocess_mode="livesum"),
    MetricSpec("queue_depth", "nnserve_queue_depth", Gauge, MODEL,
               "Requests waiting in the model's queue, read when scraped", per_request=True,
               multiprocess_mode="livesum"),
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
    MetricSpec("transport", "nnserve_transport_info", Gauge, ("transport", "reason"),
               "1 for the gRPC transport that serves (native or grpcio), with why it was chosen",
               multiprocess_mode="livemax"),
    MetricSpec("build", "nnserve_build_info", Gauge, ("version", "onnxruntime"),
               "1, labelled with nnserve's version and the onnxruntime that runs the models",
               multiprocess_mode="livemax"),
    MetricSpec("provider_fallbacks", "nnserve_provider_fallbacks", Counter, ("provider",),
               "Requested execution providers that were missing at start, so the server fell back"),
)  # fmt: skip


class ServerMetrics:
    """Every nnserve metric on one registry: the per-request figures in `stats` (read at scrape time
    by a collector), the rarely set ones as prometheus-client objects."""

    def __init__(self, registry: CollectorRegistry, process: bool = True) -> None:
        self.registry = registry
        self.stats = ServerStats()
        for spec in METRICS:
            if spec.per_request:
                continue
            options: dict[str, Any] = {"registry": registry}
            if spec.multiprocess_mode:
                options["multiprocess_mode"] = spec.multiprocess_mode
            setattr(self, spec.attribute, spec.kind(spec.name, spec.help, list(spec.labels), **options))
        registry.register(StatsCollector(self.stats))
        if process:  # process_cpu_seconds_total, process_resident_memory_bytes, ... of this process
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    # Declared for the type checker; created from METRICS above.
    model_ready: Gauge
    versions_loaded: Gauge
    load_duration: Gauge
    load_failures: Counter
    provider: Gauge
    provider_fallbacks: Counter
    transport: Gauge
    build: Gauge

    async def model_state_changed(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)


_SPECS = {spec.attribute: spec for spec in METRICS}


def _family(attribute: str) -> Any:  # a Counter-, Gauge- or HistogramMetricFamily
    spec = _SPECS[attribute]
    kind = {Counter: CounterMetricFamily, Gauge: GaugeMetricFamily, Histogram: HistogramMetricFamily}[spec.kind]
    return kind(spec.name, spec.help, labels=spec.labels)


def _add_histogram(family: Any, labels: list[str], buckets: Buckets) -> None:
    family.add_metric(labels, buckets.cumulative(), buckets.sum)


class StatsCollector:
    """Turns `ServerStats` into Prometheus families when scraped (on the endpoint's thread: it only
    reads integers the event loop writes, so a scrape may be a request behind, never torn)."""

    def __init__(self, stats: ServerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        requests, durations, failures = _family("requests"), _family("request_duration"), _family("failures")
        failed: dict[tuple[str, str, str, str], int] = {}
        counts: dict[tuple[str, str, str, str], int] = {}
        for labels, entry in list(stats.requests.items()):
            counts[labels] = entry.count
            _add_histogram(durations, list(labels), entry.duration)
        for (rpc, code), count in stats.refused_by_transport().items():
            counts[("", "", rpc, code)] = counts.get(("", "", rpc, code), 0) + count
        for (model, version, rpc, code), count in counts.items():
            requests.add_metric([model, version, rpc, code], count)
            if code != "OK":
                key = (model, version, rpc, FAILURE_REASONS.get(code, "internal"))
                failed[key] = failed.get(key, 0) + count
        for key, count in failed.items():
            failures.add_metric(list(key), count)
        yield from (requests, durations, failures)
        yield from self._per_model(_by_version(list(stats.models)))
        in_flight = _family("in_flight")
        in_flight.add_metric([], stats.in_flight())
        yield in_flight
        streams, held = stats.generation()
        generation_streams, generation_memory = _family("generation_streams"), _family("generation_memory")
        generation_streams.add_metric([], streams)
        generation_memory.add_metric([], held)
        yield from (generation_streams, generation_memory)

    def _per_model(self, versions: dict[tuple[str, str], list[ModelStats]]) -> Iterator[Metric]:
        shown_once_counted = ("generated_tokens", "time_to_first_token", "step_rows", "inter_token")
        names = ("inferences", "queue_wait", "compute", "batch_size", *shown_once_counted)
        families = {name: _family(name) for name in (*names, "decode", "encode", "queue_depth", "uncombined_runs")}
        for (model, version), stores in versions.items():
            labels = [model, version]
            families["inferences"].add_metric(labels, sum(s.inference_count for s in stores))
            families["uncombined_runs"].add_metric(labels, sum(s.uncombined_runs for s in stores))
            for name in ("queue_wait", "compute", "batch_size"):
                _add_histogram(families[name], labels, _summed(getattr(s, name) for s in stores))
            for name in shown_once_counted:
                total = _summed(getattr(s, name) for s in stores)
                if total.count:  # shown once a stream has been counted, as before
                    _add_histogram(families[name], labels, total)
            codec: dict[str, list[CodecStats]] = {}
            for store in stores:
                for rpc, figures in list(store.codec.items()):
                    codec.setdefault(rpc, []).append(figures)
            for rpc, parts in codec.items():
                _add_histogram(families["decode"], [*labels, rpc], _summed(p.decode for p in parts))
                _add_histogram(families["encode"], [*labels, rpc], _summed(p.encode for p in parts))
            families["queue_depth"].add_metric(labels, stores[-1].queue_depth())
        yield from families.values()


def _by_version(stores: list[ModelStats]) -> dict[tuple[str, str], list[ModelStats]]:
    grouped: dict[tuple[str, str], list[ModelStats]] = {}
    for store in stores:
        grouped.setdefault((store.name, store.version), []).append(store)
    return grouped


def _summed(histograms: Iterable[Buckets]) -> Buckets:
    parts = list(histograms)
    if len(parts) == 1:
        return parts[0]
    total = Buckets(parts[0].bounds)
    for part in parts:
        total.add(part)
    return total


def metrics_table() -> str:
    """docs/operations.md's table of every nnserve metric, from METRICS (a test keeps them in step)."""
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


METRICS_THREADS = 4  # scrapes answered at once
METRICS_CONNECTIONS = 32  # connections held at once (answered or waiting); beyond, closed at once
METRICS_TIMEOUT_S = 5.0  # for a connection to send its request and take its answer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is no news


class _BoundedServer(WSGIServer):
    """A WSGI server with a fixed pool of threads, a cap on the connections it holds and a timeout on each:
    2,000 slow connections to prometheus-client's own server made 1,995 threads and stalled the process."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections the kernel completes while all slots are taken

    def server_activate(self) -> None:
        super().server_activate()
        self._pool = ThreadPoolExecutor(METRICS_THREADS, thread_name_prefix="metrics")
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: the scraper retries on its next interval
            return
        request.settimeout(METRICS_TIMEOUT_S)
        self._pool.submit(self._answer, request, client_address)

    def _answer(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client that went away or timed out: nothing to tell anyone
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        pool = getattr(self, "_pool", None)  # none when the bind failed (socketserver closes, then raises)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class MetricsEndpoint:
    """/metrics over HTTP in a background thread, or nothing when the port is negative (metrics off).

    Bound before the models load, so a busy port is said at once; `address` is what the start-up
    line says of it. Bounded (`_BoundedServer`): slow or idle connections cost a slot for at most
    METRICS_TIMEOUT_S, never a thread each, and cannot touch the gRPC port.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._server: WSGIServer | None = None
        self.address = "metrics off"
        if port < 0:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
        try:
            self._server = make_server(
                host, port, make_wsgi_app(registry), server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as error:
            raise StartupError(
                f"cannot bind the metrics endpoint {host}:{port} ({error.strerror}); is it in use?"
            ) from None
        threading.Thread(target=self._server.serve_forever, name="metrics-accept", daemon=True).start()
        self.address = f"metrics at http://{host}:{self._server.server_port}/metrics"

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
