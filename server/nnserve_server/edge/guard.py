"""The one place where errors become gRPC status codes, and where every request is counted.

Servicers raise domain errors (`errors.py`) and never touch status codes. The guard maps
them, turns anything unexpected into INTERNAL with a fixed message (the traceback goes to the
log), and reports each request: its status and duration in the metrics, its id and server timing
in the trailing metadata, and a line in the access log (sampled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from nnserve_contract.codec import TensorError
from nnserve_server.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotAllowed,
    Overloaded,
    RegionNotFound,
    ServingError,
    Unsupported,
)
from nnserve_server.core.metrics import ServerMetrics
from nnserve_server.core.request_record import CURRENT, RequestRecord, request_id_from
from nnserve_server.edge.security import BearerTokenAuth
from nnserve_server.edge.tracing import Tracing

log = logging.getLogger(__name__)
access_log = logging.getLogger("nnserve.access")


_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    RegionNotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    NotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


def status_for(error: Exception) -> grpc.StatusCode | None:
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.UNKNOWN if isinstance(error, ServingError) else None


def _status_and_message(error: Exception, rpc: str) -> tuple[grpc.StatusCode, str]:
    """What the caller is told: the domain error's own message, or a fixed one for a bug."""
    status = status_for(error)
    if status is None:
        log.exception("unexpected error in %s", rpc)
        return grpc.StatusCode.INTERNAL, "internal server error; the server log has details"
    return status, str(error)


def _refuse_malformed(request: Any, rpc: str) -> None:
    if isinstance(request, _Malformed):
        raise InvalidInput(f"the request is not a valid {rpc} request message: {request.error}")


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the behavior can refuse it properly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc answers a parse failure inside its own deserializer with UNKNOWN; callers deserve
    # INVALID_ARGUMENT and a message, so the failure is carried into the behavior instead.
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:
            return _Malformed(error)

    return parse


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A servicer may answer with its response already serialized (ModelInfer's fast lane): sent as it is."""
    if serialize is None:
        return None

    def serialize_unless_bytes(response: Any) -> bytes:
        return response if response.__class__ is bytes else serialize(response)

    return serialize_unless_bytes


_RPC_NAMES: dict[str, str] = {}  # "/package.Service/Method" -> "Method", for every wrapped method


class InFlight:
    """Counts requests being answered, so shutdown can wait for them and not for endless streams
    (the in-flight gauge reads `count` when scraped)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if not self.count:
            self._idle.clear()
        self.count += 1

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class StatusGuard:
    """Wraps every method of our services once, at registration: errors to statuses, metrics, in-flight.

    A grpc.aio ServerInterceptor would do the same, but it runs for every call and builds a new
    method handler each time; wrapping the handlers once costs nothing per call.
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        known_model: Callable[[str], bool],
        access_log_sample: float = 0.0,
        access_log_failures: bool = True,
        tracing: Tracing | None = None,
        max_in_flight: int = 0,
        auth: BearerTokenAuth | None = None,
        send_limit: int = 0,
        stall_timeout_s: float = 0.0,
    ) -> None:
        self._metrics = metrics
        self._stall_timeout_s = stall_timeout_s or None
        self._auth = auth
        self._send_limit = send_limit or 1 << 62
        self._max_in_flight = max_in_flight or 1 << 62
        self._tracing = tracing
        self._known_model = known_model
        self._access_sample = access_log_sample
        self._access_failures = access_log_failures
        self.in_flight = InFlight()
        metrics.stats.in_flight = lambda: self.in_flight.count
        self._stats = metrics.stats

    def register(self, server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """`add_to_server(servicer, server)` (a generated `add_*_to_server`), with every method wrapped."""
        add_to_server(servicer, _WrappingRegistrar(server, self))

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        _RPC_NAMES[method] = method.rsplit("/", 1)[-1]  # named once here, not on every call
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(handler.stream_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_bidi(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """A bidirectional stream (ModelStreamInfer): each request on it is counted by `serve_in_stream`;
        the stream itself is not (it may live for hours, and shutdown waits for requests, not streams).
        An error of the stream as a whole ends it with its status."""

        async def behavior(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for message in inner(requests, context):
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as error:
                status, message = _status_and_message(error, "ModelStreamInfer")
                await context.abort(status, message)

        return behavior

    async def serve_in_stream(
        self,
        rpc: str,
        metadata: Any,
        request: Any,
        work: Callable[[], Awaitable[None]],
        peer: Callable[[], str] | None = None,
    ) -> str | None:
        """One request of a stream, admitted, counted and logged like a call of its own (in its own task).
        Returns None when it was answered, else the error to answer it with ("CODE: message")."""
        record = RequestRecord(rpc, request_id_from(metadata), time.perf_counter_ns())
        if self._auth is not None:
            record.grant = self._auth.grant_of(metadata)
        record.peer = peer
        CURRENT.set(record)
        self.in_flight.enter()
        try:
            self._admit(request, record)
            await work()
            return None
        except asyncio.CancelledError:
            record.code = "CANCELLED"
            raise
        except Exception as error:
            status, message = _status_and_message(error, rpc)
            record.code, record.message = status.name, message
            return f"{status.name}: {message} (request {record.request_id})"
        finally:
            self._close(record, request, None)

    def _wrap(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record, response = self._open(method, context), None
            try:
                self._admit(request, record)
                response = await inner(request, context)
                self._within_send_limit(response)
                context.set_trailing_metadata(record.trailing_metadata(time.perf_counter_ns()))
                return response
            except asyncio.CancelledError:
                record.code = "CANCELLED"
                raise
            except Exception as error:
                await self._fail(error, record, context, request)
            finally:
                self._close(record, request, response)

        return behavior

    def _wrap_stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        """As `_wrap`, for server-streaming RPCs: errors before or between messages map the same way."""

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> None:
            record = self._open(method, context)
            try:
                self._admit(request, record)
                async with contextlib.aclosing(inner(request, context)) as messages:
                    async for message in messages:
                        if not record.first_message_ns:
                            record.first_message_ns = time.perf_counter_ns()
                        self._within_send_limit(message)
                        await self._write(context, message)
                context.set_trailing_metadata(record.trailing_metadata(time.perf_counter_ns()))
            except (asyncio.CancelledError, GeneratorExit):
                record.code = "CANCELLED"
                raise
            except Exception as error:
                await self._fail(error, record, context, request)
            finally:
                self._close(record, request, None)

        return behavior

    async def _write(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        """One message of a server stream, written here rather than yielded, so that a client that takes
        none for --stream-stall-timeout-s ends its stream: 256 Generate streams that never read held
        every generation slot of a model for as long as their connection stayed open."""
        if self._stall_timeout_s is None:
            await context.write(message)
            return
        try:
            async with asyncio.timeout(self._stall_timeout_s):  # a timer, no task per message
                await context.write(message)
        except TimeoutError:
            raise Overloaded(
                f"the client took no message for {self._stall_timeout_s:g} s (--stream-stall-timeout-s): the "
                "stream is ended and its slot freed; read the stream as it comes"
            ) from None

    def _open(self, method: str, context: grpc.aio.ServicerContext) -> RequestRecord:
        """Start the call's record, current for its task (each call runs in a task of its own), and
        with --tracing its span."""
        metadata = context.invocation_metadata()
        record = RequestRecord(_RPC_NAMES[method], request_id_from(metadata), time.perf_counter_ns())
        if self._tracing is not None:
            record.span = self._tracing.start(method, metadata)
        if self._auth is not None:
            record.grant = self._auth.grant_of(metadata)
        record.peer = context.peer
        CURRENT.set(record)
        self.in_flight.enter()
        return record

    def _within_send_limit(self, response: Any) -> None:
        """An answer grpc would not send (past --max-message-bytes) is refused here, as the failure it is:
        counted and logged RESOURCE_EXHAUSTED, where grpc would log a traceback and the metrics an OK."""
        size = len(response) if response.__class__ is bytes else response.ByteSize()
        if size > self._send_limit:
            raise Overloaded(
                f"the answer is {size} bytes, above the {self._send_limit} the server sends (--max-message-bytes); "
                "ask for fewer rows or outputs, or use shared memory"
            )

    def _admit(self, request: Any, record: RequestRecord) -> None:
        if self.in_flight.count > self._max_in_flight:  # this request is already counted
            raise Overloaded(
                f"the server is answering {self._max_in_flight} requests, its limit (--max-in-flight); "
                "retry with backoff, or add replicas"
            )
        _refuse_malformed(request, record.rpc)
        if record.grant is not None:  # a token with a grant: the models it may name
            record.grant.check(record.rpc, request)

    async def _fail(
        self, error: Exception, record: RequestRecord, context: grpc.aio.ServicerContext, request: Any
    ) -> None:
        """End the call with the status `error` maps to. grpc.aio's abort sends the status at once, so
        the call is reported first: whoever sees the error also sees it counted."""
        status, message = _status_and_message(error, record.rpc)
        record.code = status.name
        record.message = message
        self._close(record, request, None)
        await context.abort(status, message, record.trailing_metadata(time.perf_counter_ns()))

    @property
    def traces(self) -> bool:
        return self._tracing is not None

    def answered(self, record: RequestRecord, request: Any) -> None:
        """A call answered outside a wrapped handler (`infer_burst`), reported as one: metrics, access log."""
        record.reported = True
        self._report(record, request, None)

    def _close(self, record: RequestRecord, request: Any, response: Any) -> None:
        if record.reported:
            return
        record.reported = True
        self.in_flight.exit()
        self._report(record, request, response)
        if record.span is not None:  # before an abort sends the status: whoever sees the error sees its span
            self._tracing.finish(record.span, record)  # type: ignore[union-attr]

    def _report(self, record: RequestRecord, request: Any, response: Any) -> None:
        ended_ns = time.perf_counter_ns()
        code = record.code = record.code or "OK"
        if record.model:  # the version that served it, also when the caller named none
            model, version = record.model, record.version
        else:
            model, version = self._labels(request, response)
        self._stats.count(model, version, record.rpc, code, (ended_ns - record.started_ns) / 1e9)
        stats = record.stats
        if stats is not None and code == "OK":
            codec = stats.codec_of(record.rpc)
            codec.decode.observe((record.entered_ns - record.started_ns) / 1e9)
            codec.encode.observe((ended_ns - record.left_ns) / 1e9)
            if record.first_message_ns and record.tokens:
                stats.generated_tokens.observe(record.tokens)
                stats.time_to_first_token.observe((record.first_message_ns - record.started_ns) / 1e9)
        failed = code != "OK"
        if (failed and self._access_failures) or (self._access_sample and random.random() < self._access_sample):
            fields = {
                "request_id": record.request_id,
                "rpc": record.rpc,
                "model": model,
                "version": version,
                "code": code,
                "duration_ms": round((ended_ns - record.started_ns) / 1e6, 3),
                "queue_ms": round(record.queue_ns / 1e6, 3),
                "compute_ms": round(record.compute_ns / 1e6, 3),
                "batch_size": record.batch_size,
            }
            if record.grant is not None:
                fields["caller"] = record.grant.label  # the token's label, never the token
            if failed:  # why, in the caller's words too: the message it got, and the name it asked for
                fields["message"] = record.message[:300]
                if model == "unknown":
                    requested = getattr(request, "model_name", None) or getattr(request, "name", None) or ""
                    fields["requested_model"] = repr(str(requested)[:64])
            access_log.info("%s %s %s", record.rpc, model or "-", code, extra={"fields": fields})

    def _labels(self, request: Any, response: Any) -> tuple[str, str]:
        # Only names the repository knows become label values: callers cannot grow the series.
        name = getattr(request, "model_name", None) or getattr(request, "name", None) or ""
        if not name:
            return "", ""
        if not self._known_model(name):
            return "unknown", ""
        version = getattr(response, "model_version", "") if response is not None else ""
        return name, version


class _WrappingRegistrar:
    """Stands in for the server while a generated `add_*_to_server` registers a service."""

    def __init__(self, server: grpc.aio.Server, guard: StatusGuard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods arrive, by name, in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self._guard.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
