"""What the server counts, in plain integers: one store that ModelStatistics and Prometheus both read.

Each request is accounted once (`ModelStats.count_request`, `RequestStats.count`), with no lock and
no label lookup: everything here is touched on the event loop thread only. The metrics collector
(`metrics.py`) turns these figures into Prometheus families when it is scraped, so a request pays a
few integer additions rather than a dozen prometheus-client calls (each takes a lock).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from prometheus_client.utils import floatToGoString

# 100 us .. 30 s: covers a tiny MLP on loopback and a large model on a busy CPU.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# 10 us .. 1 s: decoding and encoding a request is far cheaper than serving it.
CODEC_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Timing(NamedTuple):
    """Where one request's time went, in nanoseconds; `batch_size` is the rows of its run.
    (A tuple: made for every request, and a frozen dataclass costs several times as much to build.)"""

    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    batch_size: int


class Histogram:
    """Prometheus histogram semantics (a value counts in every bucket whose bound is >= it), kept
    as per-bucket counts; `cumulative()` gives the exposition's running totals."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        total, rows = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            rows.append(("+Inf" if bound == float("inf") else _bound(bound), total))
        return rows


def _bound(value: float) -> str:
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]  # prometheus-client's own spelling of `le`: 1.0, 0.00025, 1e-05


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchStats:
    """One batch size's runs: KServe counts input, compute and output time per execution."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class CodecStats:
    """Decode and encode time of one RPC's requests to one model version."""

    decode: Histogram = field(default_factory=lambda: Histogram(CODEC_BUCKETS))
    encode: Histogram = field(default_factory=lambda: Histogram(CODEC_BUCKETS))


@dataclass(eq=False)
class ModelStats:
    """Everything counted for one loaded model version: KServe's ModelStatistics and the per-model
    Prometheus families (inferences, queue wait, compute, batch size, codec, generation)."""

    name: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)
    queue_wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    generated_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    step_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # streams per decoding step
    inter_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    codec: dict[str, CodecStats] = field(default_factory=dict)  # by RPC
    queue_depth: Callable[[], int] = lambda: 0  # the model's batcher sets it: read at scrape time
    uncombined_runs: int = 0  # combined runs whose outputs lacked the batch's rows (run again one by one)
    load_seconds: float = 0.0

    def count_request(self, success_ns: int, timing: Timing, rows: int) -> None:
        """One request's whole accounting, for KServe statistics and Prometheus alike (written out:
        it runs for every request)."""
        queue_ns, input_ns, infer_ns, output_ns, _ = timing
        for duration, ns in (
            (self.success, success_ns),
            (self.queue, queue_ns),
            (self.compute_input, input_ns),
            (self.compute_infer, infer_ns),
            (self.compute_output, output_ns),
        ):
            duration.count += 1
            duration.ns += ns
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        queue_wait, compute = self.queue_wait, self.compute
        seconds = queue_ns / 1e9
        queue_wait.counts[bisect_left(queue_wait.bounds, seconds)] += 1
        queue_wait.sum += seconds
        seconds = infer_ns / 1e9
        compute.counts[bisect_left(compute.bounds, seconds)] += 1
        compute.sum += seconds

    def count_run(self, timing: Timing) -> None:
        """One onnxruntime run (it may have served several requests)."""
        self.execution_count += 1
        self.batch_size.observe(timing.batch_size)
        batch = self.by_batch_size.get(timing.batch_size)
        if batch is None:
            batch = self.by_batch_size[timing.batch_size] = BatchStats()
        batch.compute_input.add(timing.input_ns)
        batch.compute_infer.add(timing.infer_ns)
        batch.compute_output.add(timing.output_ns)

    def count_alone(self, success_ns: int, infer_ns: int, rows: int) -> None:
        """A request that ran at once in a run of its own (`OnnxModel.infer_now`): `count_run` and
        `count_request` in one step, with no queue, input or output time."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.success.count += 1
        self.success.ns += success_ns
        self.queue.count += 1
        self.compute_input.count += 1
        self.compute_infer.count += 1
        self.compute_infer.ns += infer_ns
        self.compute_output.count += 1
        batch = self.by_batch_size.get(rows)
        if batch is None:
            batch = self.by_batch_size[rows] = BatchStats()
        batch.compute_input.count += 1
        batch.compute_infer.add(infer_ns)
        batch.compute_output.count += 1
        self.batch_size.observe(rows)
        self.queue_wait.counts[0] += 1  # a wait of 0 s: the lowest bucket, the sum unchanged
        self.compute.observe(infer_ns / 1e9)

    def codec_of(self, rpc: str) -> CodecStats:
        stats = self.codec.get(rpc)
        if stats is None:
            stats = self.codec[rpc] = CodecStats()
        return stats


class RequestCount:
    """Requests answered with one (model, version, rpc, code), and how long they took."""

    __slots__ = ("count", "duration")

    def __init__(self) -> None:
        self.count = 0
        self.duration = Histogram(LATENCY_BUCKETS)


class ServerStats:
    """Server-wide figures: requests by model, version, RPC and code; every model version's stats
    (kept after the version is unloaded or replaced: counters never go down)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], RequestCount] = {}
        self.models: list[ModelStats] = []
        self.in_flight: Callable[[], int] = lambda: 0  # the guard sets it: read at scrape time
        # Text generations running now and the cache and state bytes they hold (the app sets it).
        self.generation: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # Calls the transport's front end refused itself, by RPC and code (the app sets it): no request
        # of ours saw them, and they count under no model.
        self.refused_by_transport: Callable[[], dict[tuple[str, str], int]] = dict

    def count(self, model: str, version: str, rpc: str, code: str, seconds: float) -> None:
        key = (model, version, rpc, code)
        entry = self.requests.get(key)
        if entry is None:
            entry = self.requests[key] = RequestCount()
        entry.count += 1
        entry.duration.observe(seconds)

    def model(self, name: str, version: str) -> ModelStats:
        """A fresh store for a version being loaded (a reload starts its KServe statistics anew;
        Prometheus sums every store of the same version, so its counters keep growing)."""
        stats = ModelStats(name, version)
        self.models.append(stats)
        return stats
