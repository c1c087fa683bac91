"""Assembles the server: repository, servicers, health, reflection, metrics; runs it until a signal.

`create_server` builds and binds (port 0 picks a free port, which it returns) without starting, so
tests and `serve` share it. `serve` adds the life cycle: load, start, wait for SIGTERM or SIGINT,
go NOT_SERVING, let in-flight requests finish within the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from nnserve_contract.stubs import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from nnserve_server import __version__
from nnserve_server.core import logs
from nnserve_server.core.errors import StartupError
from nnserve_server.core.generation import Generations, GenerationSettings
from nnserve_server.core.metrics import MetricsEndpoint, ServerMetrics
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.shared_memory import SharedMemoryRegions
from nnserve_server.core.tasks import Limits
from nnserve_server.edge import listening, transport
from nnserve_server.edge.guard import InFlight, StatusGuard
from nnserve_server.edge.security import BearerTokenAuth, read_grants, server_credentials
from nnserve_server.edge.servicers.infer_burst import InferBurst
from nnserve_server.edge.servicers.kserve import KServeServicer, ServerState
from nnserve_server.edge.servicers.plain import ShapeCache
from nnserve_server.edge.servicers.tasks import TasksServicer
from nnserve_server.edge.tracing import Tracing
from nnserve_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    tasks_pb2.DESCRIPTOR.services_by_name["Tasks"].full_name,
)
MODEL_INFER = f"/{SERVICE_NAMES[0]}/ModelInfer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FLUSH_S = 0.5  # after the last request: time for its response to leave before the server stops


@dataclass
class Server:
    grpc_server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    state: ServerState
    in_flight: InFlight
    shared_memory: SharedMemoryRegions | None
    transport: transport.Transport

    async def drain(self, grace_s: float) -> bool:
        """Refuse new calls, let the requests in flight finish (up to `grace_s`), then stop.

        Long-lived streams (health Watch, reflection) would hold grpc's own grace period open
        to its end, so they are cut as soon as the requests are done. True if all finished.
        """
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace_s))
        finished = await self.in_flight.wait_idle(grace_s)
        # The last handlers have returned, but their responses may still be on their way out:
        # give grpc a moment to finish on its own before cutting what is left (Watch streams).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), FLUSH_S)
        await self.grpc_server.stop(0)
        await stopping
        return finished


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    if not settings.max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
    ]


def _shared_memory(settings: Settings, tokens: bool) -> SharedMemoryRegions | None:
    if not settings.shared_memory:
        return None
    if tokens and not settings.shared_memory_with_auth:
        # A caller with the token could map any shared-memory object of the server's user (other clients'
        # regions included) and have outputs written into it: a separate decision, not a default.
        log.info("system shared memory is off: the server has an auth token (--shared-memory-with-auth to allow)")
        return None
    patterns = tuple(p.strip().lstrip("/") for p in settings.shared_memory_keys.split(",") if p.strip())
    return SharedMemoryRegions(patterns=patterns, max_bytes=settings.shared_memory_max_mb << 20)


def create_server(
    settings: Settings,
    repository: ModelRepository,
    metrics: ServerMetrics,
    tracing: Tracing | None = None,
    cpus: int = 2,
) -> Server:
    """Build the gRPC server with every service registered, bound but not started."""
    grants = read_grants(settings)
    chosen = transport.choose(settings)
    refused = functools.partial(metrics.stats.count, "", "", seconds=0.0)  # refused calls name no model
    auth = BearerTokenAuth(grants, unread=chosen.name == transport.GRPCIO, counted=refused) if grants else None
    guard = StatusGuard(
        metrics,
        repository.knows,
        access_log_sample=settings.access_log_sample,
        access_log_failures=settings.access_log_failures,
        tracing=tracing,
        max_in_flight=settings.max_in_flight,
        auth=auth,
        send_limit=settings.max_message_bytes,
        stall_timeout_s=settings.stream_stall_timeout_s,
    )
    metrics.transport.labels(chosen.name, chosen.reason).set(1)
    server = transport.build(
        chosen,
        [auth] if auth else [],
        [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            # grpcio's default has no cap: 40,000 streams opened and reset at once kept 260 MB
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            # identity (bit 0) only, unless asked: a 260 KiB gzip bomb inflated to 256 MiB before the limit
            ("grpc.compression_enabled_algorithms_bitset", 0b111 if settings.request_compression else 0b1),
            *_connection_age(settings),
        ],
        transport.io_threads(settings, cpus),
        [grant.token_sha256 for grant in grants.values()] if grants else (),
    )
    metrics.stats.refused_by_transport = transport.refusals(server)
    state = ServerState(repository.all_ready if settings.strict_readiness else None)
    shared_memory = _shared_memory(settings, bool(grants))
    generations = Generations(GenerationSettings.from_settings(settings))  # one for both APIs
    metrics.stats.generation = lambda: (generations.running, generations.budget.used)
    shapes = ShapeCache()  # ModelInfer's remembered shapes, for the general path and the burst lane
    guard.register(
        server,
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        KServeServicer(
            repository,
            state,
            Limits.from_settings(settings),
            settings.repository_control,
            shared_memory,
            guard,
            max_stream_requests=settings.max_stream_requests,
            generations=generations,
            shapes=shapes,
        ),
    )
    transport.serve_bursts(
        server,
        MODEL_INFER,
        InferBurst(repository, guard, auth, settings.max_message_bytes, shapes),
    )
    guard.register(server, tasks_pb2_grpc.add_TasksServicer_to_server, TasksServicer(repository, settings, generations))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    try:
        port = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:  # grpcio raises "Failed to bind to address" where older releases returned 0
        port = 0
    if port == 0:
        raise StartupError(f"cannot bind the gRPC port {settings.host}:{settings.port}; is it in use?")

    async def model_health(name: str, ready: bool) -> None:
        await health_servicer.set(name, SERVING if ready and state.ready else NOT_SERVING)
        if settings.strict_readiness and state.ready:  # the server's own readiness follows its models'
            await _set_overall(health_servicer, state.serving)

    repository.on_state_change(model_health)
    repository.on_state_change(metrics.model_state_changed)
    return Server(server, port, health_servicer, state, guard.in_flight, shared_memory, chosen)


async def set_serving(server: Server, repository: ModelRepository, serving: bool) -> None:
    """Flip overall, per-service and per-model health together."""
    server.state.ready = serving
    if not serving:
        await server.health.enter_graceful_shutdown()  # every name NOT_SERVING, and it stays so
        return
    await _set_overall(server.health, server.state.serving)
    for name in repository.names():
        await server.health.set(name, SERVING if repository.is_ready(name) else NOT_SERVING)


async def _set_overall(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """The server's own health (`""`) and its services' (what the Kubernetes probes ask for)."""
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, SERVING if serving else NOT_SERVING)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


async def check_repository(settings: Settings) -> bool:
    """Load every model of the repository as `serve` does, print one line per version, and say whether
    every model has a ready version (`nnserve check`: an image build runs it as the user that serves)."""
    if not settings.model_repository.is_dir():
        raise StartupError(f"the model repository {settings.model_repository} does not exist")
    repository = ModelRepository(settings.model_repository, Runtime.from_settings(settings), settings)
    await repository.load_all()
    names = repository.names()
    for name in names:
        for entry in repository.versions(name):
            print(f"{name} version {entry.version}: {entry.state}" + (f" ({entry.reason})" if entry.reason else ""))
    ready = [name for name in names if repository.is_ready(name)]
    print(f"{len(ready)} of {_count(len(names), 'model')} ready in {settings.model_repository}")
    await repository.close()
    return bool(names) and len(ready) == len(names)


@dataclass
class Running:
    """What `start_up` made and `shut_down` takes apart."""

    server: Server
    repository: ModelRepository
    endpoint: MetricsEndpoint
    tracing: Tracing | None


async def serve(settings: Settings) -> None:
    """The server's life: start-up, then serving until SIGTERM or SIGINT (polling the repository if
    asked), then the shutdown that drains what is in flight."""
    running = await start_up(settings)
    stop = _stop_on_signals()
    await _until(stop, running, settings)
    await shut_down(running, settings)


async def start_up(settings: Settings) -> Running:
    """Metrics, the repository, the gRPC server (its port bound first: refused now if busy), the models
    loaded, then SERVING and the start-up line."""
    runtime = Runtime.from_settings(settings)
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for provider in runtime.missing_providers:
        metrics.provider_fallbacks.labels(provider).inc()
    for provider in runtime.providers:
        metrics.provider.labels(provider).set(1)
    metrics.build.labels(__version__, runtime.onnxruntime_version).set(1)
    if not settings.model_repository.is_dir() and not settings.poll_interval_s:
        raise StartupError(
            f"the model repository {settings.model_repository} does not exist: build one (make zoo, or "
            f"nnserve-export zoo --out {settings.model_repository}), point --model-repository at one, or give "
            "--poll-interval-s to wait for it"
        )
    repository = ModelRepository(settings.model_repository, runtime, settings, metrics)
    tracing = Tracing.from_settings(settings.tracing)
    server = create_server(settings, repository, metrics, tracing, runtime.cpus)
    endpoint = MetricsEndpoint(settings.metrics_host, settings.metrics_port, registry)
    await repository.load_all()
    await server.grpc_server.start()
    await set_serving(server, repository, True)
    running = Running(server, repository, endpoint, tracing)
    _announce(running, settings)
    return running


def _announce(running: Running, settings: Settings) -> None:
    """The start-up line: where it listens, what is ready and training, which transport serves and why."""
    server, repository = running.server, running.repository
    ready = [n for n in repository.names() if repository.is_ready(n)]
    training = sorted(repository.training())
    banner = listening.line(
        settings.host,
        server.port,
        running.endpoint.address,
        f"{_count(len(ready), 'model')} ready: {', '.join(ready) or 'none'}"
        + (f"; {len(training)} training: {', '.join(training)}" if training else "")
        + f"; transport {server.transport.name} ({server.transport.reason})"
        + (
            f"; strict readiness: {'ready' if server.state.serving else 'NOT ready until every model is'}"
            if settings.strict_readiness
            else ""
        ),
    )
    logs.announce(banner, settings.log_format)
    logs.announce(f"try: nnserve-client --target {settings.host}:{server.port} models", settings.log_format)


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _until(stop: asyncio.Event, running: Running, settings: Settings) -> None:
    """Serve until `stop` is set, polling the repository meanwhile when --poll-interval-s asks."""
    if settings.poll_interval_s > 0:
        await running.repository.poll(settings.poll_interval_s, stop)
    else:
        await stop.wait()


async def shut_down(running: Running, settings: Settings) -> None:
    """NOT_SERVING, the requests in flight drained for up to the grace period, then everything closed."""
    server = running.server
    log.info(
        "shutting down: NOT_SERVING, draining %d requests for up to %.1f s",
        server.in_flight.count,
        settings.grace_period_s,
    )
    await set_serving(server, running.repository, False)
    if not await server.drain(settings.grace_period_s):
        log.warning("grace period over: requests still in flight were cancelled")
    await running.repository.close()
    if server.shared_memory is not None:
        server.shared_memory.close()
    if running.tracing is not None:
        running.tracing.shutdown()
    running.endpoint.shutdown()
    log.info("stopped")
