"""OpenTelemetry traces, optional: `--tracing` with the otel extra (pip install 'nnserve-server[otel]').

Off by default, and then nothing here is imported and the request path has no tracing code in it.
On, each RPC gets a server span that continues the caller's trace (W3C `traceparent` metadata), with
child spans for the queue wait and the onnxruntime run, built from the request's record once it is
answered. Spans leave over OTLP, configured by the standard `OTEL_EXPORTER_OTLP_*` variables
(`OTEL_SERVICE_NAME` names the service; nnserve by default).
"""

from __future__ import annotations

import os
import time
from typing import Any

from nnserve_server.core.errors import StartupError
from nnserve_server.core.request_record import RequestRecord


class Tracing:
    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self._provider = provider
        self._tracer = provider.get_tracer("nnserve")
        self._extract = propagate.extract
        self._server_kind = trace.SpanKind.SERVER
        self._set_in_context = trace.set_span_in_context
        self._error = trace.Status(trace.StatusCode.ERROR)
        # Records time with perf_counter_ns; spans want wall-clock nanoseconds.
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()

    @classmethod
    def from_settings(cls, tracing: bool) -> Tracing | None:
        if not tracing:
            return None
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as error:
            raise StartupError(f"--tracing needs OpenTelemetry: pip install 'nnserve-server[otel]' ({error})") from None
        return cls.with_processor(BatchSpanProcessor(OTLPSpanExporter()))

    @classmethod
    def with_processor(cls, processor: Any) -> Tracing:
        """Tracing through one span processor (tests pass an in-memory exporter's)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "nnserve")})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(processor)
        return cls(provider)

    def start(self, method: str, metadata: Any) -> Any:
        """The server span of one call, a child of the caller's span when it sent one."""
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        service, _, rpc = method.lstrip("/").rpartition("/")
        return self._tracer.start_span(
            rpc,
            context=self._extract(carrier),
            kind=self._server_kind,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        )

    def finish(self, span: Any, record: RequestRecord | None) -> None:
        """Close the call's span, with a queue and an inference span when a model ran."""
        ended = time.perf_counter_ns() + self._wall_offset_ns
        if record is None:
            span.end(end_time=ended)
            return
        span.set_attribute("nnserve.request_id", record.request_id)
        span.set_attribute("rpc.grpc.status_code", record.code)
        if record.code != "OK":
            span.set_status(self._error)
        if record.runs:
            span.set_attribute("nnserve.model", record.model)
            span.set_attribute("nnserve.model_version", record.version)
            span.set_attribute("nnserve.batch_size", record.batch_size)
            parent = self._set_in_context(span)
            offset = self._wall_offset_ns
            run_end = record.left_ns + offset
            if record.runs == 1:  # the queue wait, then the run that served it
                run_start = run_end - record.compute_ns
                queue_start = run_start - record.queue_ns
            else:  # a stream of runs (Generate): one span over all of them, with the sums
                run_start = queue_start = record.entered_ns + offset
            queue = self._tracer.start_span("queue", context=parent, start_time=queue_start)
            queue.set_attribute("nnserve.queue_ms", record.queue_ns / 1e6)
            queue.end(end_time=max(queue_start, run_start if record.runs == 1 else run_end))
            inference = self._tracer.start_span("inference", context=parent, start_time=run_start)
            inference.set_attribute("nnserve.runs", record.runs)
            inference.set_attribute("nnserve.compute_ms", record.compute_ns / 1e6)
            inference.set_attribute("nnserve.batch_size", record.batch_size)
            inference.end(end_time=run_end)
        span.end(end_time=ended)

    def shutdown(self) -> None:
        """Send what is buffered (at server stop)."""
        self._provider.shutdown()
