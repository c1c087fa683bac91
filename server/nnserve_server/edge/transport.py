"""The transport: which gRPC server carries the calls, chosen once at start-up (`--transport`).

- `native`: pygrpc-native's front end. HTTP/2 and gRPC (framing, flow control, deadlines,
  cancellation) run in Rust outside the GIL and hand calls to Python in batches; unary and
  server-streaming methods are served there, bidirectional ones (ModelStreamInfer, reflection) by a
  grpc.aio server behind it on a Unix socket. It has no TLS and cannot close connections by age.
- `grpcio`: grpc.aio, grpc-core's HTTP/2 in C++ under the GIL: TLS, mutual TLS and connection age.
- `auto` (the default): native unless a setting needs what only grpcio has; the reason is kept and
  the start-up line and the `nnserve_transport_info` gauge say which transport serves and why.

Bearer tokens (`--auth-token-file`, `--access-file`): pygrpc-native 0.5.0 hands Python a call only with
its whole request read, so a Python check refuses a tokenless call after its body is in memory. Its
front end checks tokens itself, at the headers, but for every method, health checks included, which
Kubernetes' probes cannot pass. So `auto` takes grpcio with tokens (refused unread, health open), and
`--transport native` with tokens has the front end check them: bodies of tokenless calls are never
read, and health checks need the token too (`nnserve health --token-file`).

Nothing outside this module knows which one serves: both are `grpc.aio.Server`s to the app.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from nnserve_server.core.errors import StartupError
from nnserve_server.settings import TRANSPORTS, Settings

log = logging.getLogger(__name__)

_, NATIVE, GRPCIO = TRANSPORTS
NATIVE_PACKAGE = "pygrpc_native"


@dataclass(frozen=True)
class Transport:
    name: str  # native | grpcio
    reason: str  # why this one: shown in the start-up line and the info gauge


def _needs_grpcio(settings: Settings) -> list[str]:
    """What the settings ask for that only grpcio's server does."""
    needs = []
    if settings.tls_cert_file:
        needs.append("TLS (--tls-cert-file)")
    if settings.max_connection_age_s:
        needs.append("connection age (--max-connection-age-s)")
    return needs


def _tokens(settings: Settings) -> bool:
    return bool(settings.auth_token_file or settings.access_file)


TOKENS_ON_GRPCIO = (
    "auto: with bearer tokens only grpcio refuses a tokenless call before reading it and keeps health open"
)
TOKENS_AT_THE_FRONT = "tokens checked by the front end at the headers, health checks included"


def native_installed() -> bool:
    return importlib.util.find_spec(NATIVE_PACKAGE) is not None


def choose(settings: Settings) -> Transport:
    """The transport `settings.transport` resolves to, and why; a refusal when `native` cannot serve them."""
    needs = _needs_grpcio(settings)
    if settings.transport == GRPCIO:
        return Transport(GRPCIO, "--transport grpcio")
    if settings.transport == NATIVE:
        if needs:
            raise StartupError(
                f"--transport native cannot serve {' and '.join(needs)}: use --transport grpcio, or auto"
            )
        if not native_installed():
            raise StartupError("--transport native, but pygrpc-native is not installed: pip install pygrpc-native")
        return Transport(NATIVE, "--transport native" + (f"; {TOKENS_AT_THE_FRONT}" if _tokens(settings) else ""))
    if needs:
        return Transport(GRPCIO, f"auto: the native front end has no {' and no '.join(needs)}")
    if _tokens(settings):
        return Transport(GRPCIO, TOKENS_ON_GRPCIO)
    if not native_installed():
        # A dependency of nnserve-server: missing only in a hand-made environment. Said in the banner.
        log.warning("pygrpc-native is not installed: serving on grpcio")
        return Transport(GRPCIO, "auto: pygrpc-native is not installed")
    return Transport(NATIVE, "auto")


# A handler of the calls of one method that arrived together: (calls, respond) -> the ids it answered.
# calls: (call id, request bytes, (metadata, peer, seconds left)); respond(call id, bytes, trailing metadata).
BurstHandler = Callable[[Sequence[tuple[int, bytes, tuple[Any, str, float | None]]], Callable[..., object]], set[int]]


def serve_bursts(server: grpc.aio.Server, method: str, handler: BurstHandler) -> bool:
    """Give the calls of `method` that reach Python together to `handler` first (native transport only;
    what it does not answer takes the method's registered handler). False where the transport cannot."""
    set_burst = getattr(server, "set_burst_handler", None)
    if set_burst is None:
        return False
    set_burst(method, handler)
    return True


def refusals(server: grpc.aio.Server) -> Callable[[], dict[tuple[str, str], int]]:
    """What reads the calls the native front end refused before Python saw them (tokenless, when it
    checks tokens), by RPC and code; the front end names only the methods it serves itself: the
    bidirectional ones, which it passes to the grpc.aio server behind it, and unknown ones count under
    the RPC "other". It holds the server weakly: the metrics that keep it must not keep the server,
    whose front end would then go with whichever thread the cyclic collector ran on."""
    if getattr(server, "refused_by_front", None) is None:
        return dict
    held = weakref.ref(server)

    def read() -> dict[tuple[str, str], int]:
        alive = held()
        return alive.refused_by_front() if alive is not None else {}  # type: ignore[attr-defined]

    return read


def io_threads(settings: Settings, cpus: int) -> int:
    """The native front end's tokio threads: --native-io-threads, or one per two CPUs the server may use.
    On two CPUs one thread answered the bench MLP faster than the package's default of two (c=1 p50
    0.24-0.26 against 0.29-0.31 ms, c=32 16.5-17.3k against 13.5-14.8k/s, interleaved): the threads
    share the cores with the Python thread and the load."""
    return settings.native_io_threads or max(1, cpus // 2)


def build(
    transport: Transport,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    options: Sequence[tuple[str, Any]],
    native_io_threads: int = 1,
    token_digests: Sequence[bytes] = (),
) -> grpc.aio.Server:
    """An unstarted server of the chosen transport, with grpc.aio's interface. `token_digests`: the
    SHA-256 of each bearer token, which the native front end then checks at the headers (module doc)."""
    if transport.name == NATIVE:
        return _native_server(interceptors, options, native_io_threads, token_digests)
    return grpc.aio.server(interceptors=interceptors or None, options=options)


class _Methods(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Handlers by full method path, as a plain generic handler (not a per-service one)."""

    def __init__(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = {f"/{service}/{name}": handler for name, handler in handlers.items()}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(details.method)


UNAUTHENTICATED_AT_THE_FRONT = (
    "this server needs 'authorization: Bearer <token>' metadata with a token it knows (health checks too)"
)


def _native_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    options: Sequence[tuple[str, Any]],
    io_threads: int,
    token_digests: Sequence[bytes],
) -> grpc.aio.Server:
    # `import pygrpc_native.aio`, not `from pygrpc_native import aio`: in 0.5.0 the package's lazy
    # __getattr__ answers the latter by importing it the same way, and recurses until RecursionError.
    import pygrpc_native.aio as native_aio
    from pygrpc_native import EVENT_CALL, STREAM_CLOSED, STREAM_FULL

    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]

    class NativeServer(native_aio.Server):  # type: ignore[misc]
        """The package's asyncio server, with two changes made here (the package is pinned: both use its
        internals, `_dispatch`, `_on_events`, `_table`, `_front`, `_loop` and `_stopping`, as 0.5.0 has
        them, and `_native_server` its `_front_args`; a test of each fails if they move).

        Bursts: the package's dispatch thread hands each batch of calls from its front end to the event
        loop (`_on_events`), which makes a task and a context per call. A burst handler gets the calls of
        its method first, in one piece, on the dispatch thread (`_dispatch`).

        Bidirectional methods (ModelStreamInfer, reflection): pygrpc-native 0.5.0 gives the grpc.aio server
        behind it only the registered handlers of such methods, and drops the service's generic handler;
        grpc.aio 1.75 finds methods through generic handlers alone, so every bidirectional call answered
        UNIMPLEMENTED "Method not found!". Each one is also given to it as a plain generic handler, which
        the package passes on."""

        _burst_method = ""
        _burst: BurstHandler | None = None
        _burst_id = -1

        def refused_by_front(self) -> dict[tuple[str, str], int]:
            """From the front end's own counters (on when it checks tokens): UNAUTHENTICATED is the
            only code it gives before Python sees a call."""
            figures = self._front.metrics() if self._front is not None else None
            if not figures:
                return {}
            methods = figures.get("methods", {})
            counts = {
                (path.rsplit("/", 1)[-1], "UNAUTHENTICATED"): int(method["status"][unauthenticated]["count"])
                for path, method in methods.items()
                if unauthenticated in method.get("status", {})
            }
            return {key: count for key, count in counts.items() if count}

        def set_burst_handler(self, method: str, handler: BurstHandler) -> None:
            self._burst_method, self._burst = method, handler

        async def start(self) -> None:
            await super().start()
            ids = [index for index, (path, _) in enumerate(self._table) if path == self._burst_method]
            self._burst_id = ids[0] if ids else -1

        def _respond(self, call_id: int, data: bytes, trailing: Sequence[tuple[str, str]]) -> None:
            self._front.respond(call_id, data, trailing_metadata=list(trailing))  # type: ignore[union-attr]

        def _dispatch(self) -> None:
            """The package's dispatch thread (it waits for the front end's batches with the GIL released),
            with the burst handler run right here instead of on the event loop: a call it answers costs no
            hop to the loop's thread, which took a quarter of a lone call's time in the server. The rest go
            to the loop as before."""
            front, loop = self._front, self._loop
            assert front is not None  # set by start(), which starts this thread
            assert loop is not None
            while (events := front.recv_batch_details(64)) is not None:
                if self._burst is not None and not self._stopping:
                    events = self._answer_bursts(events)
                    if not events:
                        continue
                try:
                    loop.call_soon_threadsafe(self._on_events, events)
                except RuntimeError:  # the loop was closed without stop()
                    front.close()
                    return

        def _answer_bursts(self, events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            """The events the burst handler left: its method's calls go to it first, in one piece."""
            burst, method_id = self._burst, self._burst_id
            calls = [
                (call_id, payload, details)
                for kind, call_id, method, payload, _, details in events
                if kind == EVENT_CALL and method == method_id
            ]
            if not calls or burst is None:
                return events
            try:
                answered = burst(calls, self._respond)
            except Exception:  # a bug of the lane must not lose calls: the general path answers them all
                log.exception("the burst handler of %s failed; its calls go the general path", self._burst_method)
                return events
            if not answered:
                return events
            return [event for event in events if event[0] != EVENT_CALL or event[1] not in answered]

        async def _send(self, call: Any, context: Any, response: Any) -> bool:
            """A server stream's message, sent as the package sends it but for a client that is behind:
            0.5.0 then waits for room in `stream_send` on the loop's default executor, a thread per such
            stream (6 threads on 2 CPUs), and the other streams' sends queue behind them. Here the wait is
            an asyncio sleep: no thread, and cancelled with the stream (--stream-stall-timeout-s)."""
            data = self._encode(call, context, response)
            if data is None:
                return False
            context._initial_sent = True
            front, pause = self._front, 0.001
            assert front is not None  # started
            while (sent := front.stream_try_send(call.call_id, data)) == STREAM_FULL:
                await asyncio.sleep(pause)
                pause = min(2 * pause, 0.05)
            return bool(sent != STREAM_CLOSED)

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            super().add_registered_method_handlers(service, handlers)
            streamed = {name: handler for name, handler in handlers.items() if handler.request_streaming}
            if streamed:
                self.add_generic_rpc_handlers([_Methods(service, streamed)])

    server = NativeServer(interceptors=interceptors or None, options=list(options), io_threads=io_threads)
    if token_digests:  # arguments of the front end that 0.5.0's server takes from no option
        server._front_args["bearer_token_sha256"] = list(token_digests)
        server._front_args["unauthenticated_message"] = UNAUTHENTICATED_AT_THE_FRONT
        server._front_args["metrics"] = True  # for `refused_by_front`
    return server
