"""A real nnserve server in the test's own process: `create_server` on port 0 over a repository, for
tests where starting `nnserve serve` as a subprocess is not the point (the fast tier among them)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from nnserve_server.core.metrics import ServerMetrics
from nnserve_server.core.repository import ModelRepository
from nnserve_server.core.runtime import Runtime
from nnserve_server.edge.app import create_server, set_serving
from nnserve_server.edge.tracing import Tracing
from nnserve_server.settings import Settings


@dataclass(frozen=True)
class InProcess:
    target: str
    metrics: ServerMetrics
    repository: ModelRepository


@contextlib.asynccontextmanager
async def serving(repository: Path, tracing: Tracing | None = None, **settings: Any) -> AsyncIterator[InProcess]:
    """Load `repository`, start the server on 127.0.0.1:0 with `settings` (Settings fields), stop it after."""
    config = Settings(model_repository=repository, port=0, metrics_port=-1, **settings)
    metrics = ServerMetrics(CollectorRegistry(), process=False)
    models = ModelRepository(repository, Runtime.from_settings(config), config, metrics)
    server = create_server(config, models, metrics, tracing)
    await models.load_all()
    await server.grpc_server.start()
    await set_serving(server, models, True)
    try:
        yield InProcess(f"127.0.0.1:{server.port}", metrics, models)
    finally:
        await server.grpc_server.stop(0)
        await models.close()
