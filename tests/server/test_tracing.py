"""OpenTelemetry: spans for the request, its queue wait and its run, continuing the caller's trace.

The server runs in this process so an in-memory exporter can receive its spans.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from in_process import serving
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from nnserve_client import AsyncClient, NotFound
from nnserve_server.edge.tracing import Tracing

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN:016x}-01"


@pytest.fixture
async def traced_server(model_repository: Path) -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    async with serve_traced(model_repository) as served:
        yield served


@contextlib.asynccontextmanager
async def serve_traced(model_repository: Path) -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    async with serving(model_repository, Tracing.with_processor(SimpleSpanProcessor(exporter))) as server:
        yield server.target, exporter


async def test_a_request_gets_a_server_span_with_queue_and_inference_children(
    traced_server: tuple[str, InMemorySpanExporter],
) -> None:
    target, exporter = traced_server
    async with AsyncClient(target, metadata=[("traceparent", TRACEPARENT), ("x-request-id", "r-1")]) as client:
        await client.infer("digits-fnn", {"input": np.zeros((2, 64), np.float32)}, version="1")
        with pytest.raises(NotFound):
            await client.infer("nope", {"input": np.zeros((1, 64), np.float32)})
    spans = exporter.get_finished_spans()
    served, failed = (s for s in spans if s.name == "ModelInfer")
    # The caller's trace continues: same trace id, the caller's span as parent.
    assert served.kind == SpanKind.SERVER
    assert served.context.trace_id == TRACE_ID
    assert served.parent is not None
    assert served.parent.span_id == CALLER_SPAN
    assert served.attributes is not None
    assert served.attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert served.attributes["nnserve.model"] == "digits-fnn"
    assert served.attributes["nnserve.model_version"] == "1"
    assert served.attributes["nnserve.request_id"] == "r-1"
    assert served.attributes["nnserve.batch_size"] == 2
    assert served.status.status_code != StatusCode.ERROR
    children = sorted((s for s in spans if s.parent and s.parent.span_id == served.context.span_id), key=_start)
    assert [s.name for s in children] == ["queue", "inference"]
    queue, inference = children
    assert _start(served) <= _start(queue) <= _end(queue) <= _start(inference) + 1000  # ns rounding
    assert _end(inference) <= _end(served)
    # A failed call: an error span with its status code and no model spans.
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["rpc.grpc.status_code"] == "NOT_FOUND"
    assert not [s for s in spans if s.parent and s.parent.span_id == failed.context.span_id]


async def test_a_caller_without_trace_context_starts_a_new_trace(
    traced_server: tuple[str, InMemorySpanExporter],
) -> None:
    target, exporter = traced_server
    async with AsyncClient(target) as client:
        assert await client.ready()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "ServerReady"]
    assert span.parent is None  # a new trace when the caller sent none
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == "OK"


async def test_a_generate_stream_gets_one_span_over_its_runs(fast_zoo: tuple[Path, list[object]]) -> None:
    async with serve_traced(fast_zoo[0]) as (target, exporter), AsyncClient(target) as client:
        events = [e async for e in client.generate("chars-lstm", prompt="The ", max_tokens=5, temperature=0)]
        spans = exporter.get_finished_spans()
    assert len(events) == 6  # five pieces and the end
    (stream,) = [s for s in spans if s.name == "Generate"]
    children = {s.name: s for s in spans if s.parent and s.parent.span_id == stream.context.span_id}
    assert set(children) == {"queue", "inference"}
    assert children["inference"].attributes is not None
    assert children["inference"].attributes["nnserve.runs"] >= 5  # one run per generated token at least
    assert _start(stream) <= _start(children["inference"]) <= _end(children["inference"]) <= _end(stream)


def _start(span: object) -> int:
    return int(span.start_time)  # type: ignore[attr-defined]


def _end(span: object) -> int:
    return int(span.end_time)  # type: ignore[attr-defined]


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import json, sys, nnserve_server.edge.app, nnserve_server.process.cli; "
        "print(json.dumps([m for m in sys.modules if m.startswith('opentelemetry')]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
