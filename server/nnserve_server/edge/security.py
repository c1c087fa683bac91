"""Who may call: TLS or mutual TLS for the gRPC port, and bearer tokens checked on every RPC.

Both are off unless configured, and then cost nothing: no interceptor is installed without a token.
Health checks stay open (Kubernetes probes carry no token), everything else, reflection included,
needs `authorization: Bearer <token>`; on the native transport the front end checks tokens first, on
health checks too (`edge/transport.py`). One token (`--auth-token-file`) opens everything; an access
file (`--access-file`) gives each token a label, the models it may name (fnmatch patterns) and the
API groups it may call (`GROUPS`). A token the server does not know is UNAUTHENTICATED and a method
outside its groups PERMISSION_DENIED, both before the request is read; a model outside its patterns
is PERMISSION_DENIED before any work (`Grant.check`, from the guard). Tokens are kept and compared
as SHA-256 digests, never as text, and logs name a token by its label.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import tomllib

from nnserve_server.core.errors import NotAllowed, StartupError
from nnserve_server.core.request_record import CURRENT
from nnserve_server.settings import Settings

OPEN_METHODS = "/grpc.health.v1.Health/"

# The API groups of the access file, and the methods in each (by their last name; reflection is metadata).
GROUPS: dict[str, tuple[str, ...]] = {
    "inference": ("ModelInfer", "ModelStreamInfer", "Classify", "Generate", "Encode", "Segment"),
    "metadata": (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
        "ModelStatistics", "RepositoryIndex", "ListModels", "GetModel", "ServerReflectionInfo",
    ),
    "repository": ("RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting", "LogSettings"),
    "shared_memory": (
        "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    ),
}  # fmt: skip
_GROUP_OF = {method: group for group, methods in GROUPS.items() for method in methods}
# Requests whose `name` is a model's (elsewhere `name` is a region's, and models go in `model_name`).
_NAMED_MODEL = frozenset(("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics", "GetModel"))


@dataclass(frozen=True)
class Grant:
    """What one token may do."""

    label: str
    models: tuple[str, ...]  # fnmatch patterns of model names
    groups: frozenset[str]
    token_sha256: bytes  # of the bare token: what the native front end checks at the headers

    def may_see(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def permits(self, rpc: str, request: Any) -> bool:
        """Whether this token may make this call as it is: the method's group, the models it names."""
        return _GROUP_OF.get(rpc) in self.groups and not self._forbidden_model(rpc, request)

    def check(self, rpc: str, request: Any) -> None:
        """NotAllowed when the request names a model outside this token's patterns."""
        name = self._forbidden_model(rpc, request)
        if name:
            raise NotAllowed(f"token '{self.label}' may not use model '{name}'; it may use {list(self.models)}")

    def _forbidden_model(self, rpc: str, request: Any) -> str:
        """The first model the request names outside this token's patterns; empty when there is none."""
        names = [getattr(request, "model_name", "")]
        if rpc in _NAMED_MODEL:
            names.append(getattr(request, "name", ""))
        return next((name for name in names if name and not self.may_see(name)), "")


def _digest(header: bytes) -> bytes:
    return hashlib.sha256(header).digest()


def read_access_file(path: str) -> dict[bytes, Grant]:
    """The access file's tokens, by the digest of their `Bearer <token>` header. TOML:

    [[token]]
    label = "search-team"           # what logs call the token
    token = "..."                   # the secret itself
    models = ["sentence-*"]         # fnmatch patterns; ["*"]: every model
    groups = ["inference", "metadata"]
    """
    try:
        entries = tomllib.loads(Path(path).read_text())["token"]
    except OSError as error:
        raise StartupError(f"cannot read the access file {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError) as error:
        raise StartupError(f"the access file {path} is not a TOML list of [[token]] tables: {error}") from None
    grants: dict[bytes, Grant] = {}
    labels: set[str] = set()
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        where = f"the access file {path}, token {index + 1}"
        label, token = str(entry.get("label", "")), str(entry.get("token", ""))
        models, groups = entry.get("models", []), entry.get("groups", [])
        if not label or not token.strip() or label in labels:
            raise StartupError(f"{where}: needs a label of its own and a non-empty token")
        if not isinstance(models, list) or not models or not isinstance(groups, list) or not groups:
            raise StartupError(f"{where} ('{label}'): models and groups are non-empty lists")
        unknown = sorted(set(map(str, groups)) - set(GROUPS))
        if unknown:
            raise StartupError(f"{where} ('{label}'): unknown groups {unknown}; the groups are {list(GROUPS)}")
        digest = _digest(f"Bearer {token.strip()}".encode())
        if digest in grants:
            raise StartupError(f"{where} ('{label}'): the same token as '{grants[digest].label}'")
        labels.add(label)
        bare = _digest(token.strip().encode())
        grants[digest] = Grant(label, tuple(map(str, models)), frozenset(map(str, groups)), bare)
    if not grants:
        raise StartupError(f"the access file {path} names no [[token]]")
    return grants


def read_grants(settings: Settings) -> dict[bytes, Grant] | None:
    """The tokens the server takes (None: no token needed): the access file's, or the one token file's."""
    if settings.access_file:
        return read_access_file(settings.access_file)
    token = read_token(settings)
    if token is None:
        return None
    return {_digest(f"Bearer {token}".encode()): Grant("token", ("*",), frozenset(GROUPS), _digest(token.encode()))}


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
    """UNAUTHENTICATED for a call without a known bearer token, PERMISSION_DENIED for a method outside the
    token's groups. `unread`: refuse before the request is read (grpcio); pygrpc-native 0.5.0 has read the
    whole request before Python sees the call, and answers a unary method given a streaming handler INTERNAL."""

    def __init__(
        self, grants: dict[bytes, Grant], unread: bool = False, counted: Callable[[str, str], None] | None = None
    ) -> None:
        """`counted(rpc, code)`: told of each call refused here (the guard never sees them)."""
        self._grants = grants
        self._unread = unread
        self._counted = counted

    def grant_of(self, metadata: Any) -> Grant | None:
        """The grant of the call's token; None when it has none the server knows (a digest's dict lookup:
        what the caller sends is hashed first, so no comparison runs over the secret itself)."""
        given = _given_token(metadata)
        return self._grants.get(_digest(given)) if given else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return handler
        grant = self.grant_of(details.invocation_metadata)
        method = details.method.rsplit("/", 1)[-1]
        if grant is None:
            given = _given_token(details.invocation_metadata)
            reason = "wrong bearer token" if given else "this server needs 'authorization: Bearer <token>' metadata"
            return self._refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED, reason)
        group = _GROUP_OF.get(method)
        if group not in grant.groups:
            reason = (
                f"token '{grant.label}' may not call {method} (API group {group or 'none'}); "
                f"it may call {sorted(grant.groups)}"
            )
            return self._refusal(handler, method, grpc.StatusCode.PERMISSION_DENIED, reason)
        return handler

    def _refusal(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, reason: str
    ) -> grpc.RpcMethodHandler:
        if self._counted is not None:
            self._counted(method, code.name)
        return _refusal(handler, code, reason, self._unread)


def visible_models(names: Iterable[str]) -> list[str]:
    """The model names the current caller may see: all, unless its token's grant says otherwise."""
    record = CURRENT.get()
    grant = record.grant if record is not None else None
    return list(names) if grant is None else [name for name in names if grant.may_see(name)]


def _given_token(metadata: Any) -> bytes:
    """The call's `authorization` metadata, as bytes (empty when it has none)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return b""


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, reason: str, unread: bool) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `code`. `unread`: before its request is read, as a client-streaming
    handler (whatever the method's kind) that never iterates its requests, with no deserializer; a unary
    handler has grpc read and parse the whole message first (64 tokenless 8 MiB calls at once took the grpcio
    transport's peak memory up by 524 MiB; refused unread, by 42 MiB)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, reason)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, reason)
        yield  # an async generator, as a streaming handler must be

    serializer = handler.response_serializer
    if unread:
        if handler.unary_unary is not None or handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=serializer)
    kinds = {"request_deserializer": handler.request_deserializer, "response_serializer": serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kinds)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kinds)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kinds)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kinds)
