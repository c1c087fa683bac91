"""Who may call: TLS or mutual TLS for the gRPC port, and a bearer token checked on every RPC.

Both are off unless configured, and then cost nothing: no interceptor is installed without a token.
Health checks stay open (Kubernetes probes carry no token), everything else, reflection included,
needs `authorization: Bearer <token>`, compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nnserve_server.core.errors import StartupError
from nnserve_server.settings import Settings

OPEN_METHODS = "/grpc.health.v1.Health/"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read the {what} {path}: {error.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (client certificates required when a client CA is given)."""
    if not settings.tls_cert_file:
        return None
    chain = _read(settings.tls_cert_file, "TLS certificate")
    key = _read(settings.tls_key_file, "TLS key")
    client_ca = _read(settings.tls_client_ca_file, "client CA bundle") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def read_token(settings: Settings) -> str | None:
    if not settings.auth_token_file:
        return None
    token = _read(settings.auth_token_file, "auth token file").decode("utf-8", "replace").strip()
    if not token:
        raise StartupError(f"the auth token file {settings.auth_token_file} is empty")
    return token


class BearerTokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """UNAUTHENTICATED, before any work, for a call without the right bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def allows(self, metadata: Any) -> bool:
        """Whether a call with this metadata carries the token (the lane of `infer_burst` asks first)."""
        return hmac.compare_digest(_given_token(metadata), self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        given = _given_token(details.invocation_metadata)
        handler = await continuation(details)
        if hmac.compare_digest(given, self._expected) or handler is None:
            return handler
        reason = "wrong bearer token" if given else "this server needs 'authorization: Bearer <token>' metadata"
        return _refusal(handler, reason)


def _given_token(metadata: Any) -> bytes:
    """The call's `authorization` metadata, as bytes (empty when it has none)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return b""


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # an async generator, as a streaming handler must be

    kinds = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kinds)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kinds)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kinds)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kinds)
