"""Errors the SDK raises: every failed call becomes one of these, carrying the server's message and,
from an nnserve server, the call's request id and timing (`.request_id`, `.timing`: quote the id when
you report a problem; the server's logs carry it).

NNServeError                 any failed call (.code: the gRPC status name, .details: the message)
├── InvalidArgument          the request is wrong: fix it before retrying
├── NotFound                 no such model or version
├── ResourceExhausted        too large, or the server is full: back off
├── DeadlineExceeded         the deadline passed before an answer
├── Unavailable              server or model not serving now: retry, maybe elsewhere
├── Unauthenticated          missing or wrong credentials
├── PermissionDenied
├── FailedPrecondition
├── Cancelled
├── Unimplemented            the server does not offer this call
└── ServerError              INTERNAL, UNKNOWN and the rest: the server failed
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from .types import ServerTiming


class NNServeError(Exception):
    """A call that failed: `code` is the gRPC status name, `details` the server's message."""

    def __init__(self, code: str, details: str, timing: ServerTiming | None = None) -> None:
        self.code = code
        self.details = details
        self.timing = timing
        self.request_id = timing.request_id if timing is not None else ""
        super().__init__(f"{code}: {details}" + (f" (request {self.request_id})" if self.request_id else ""))


class InvalidArgument(NNServeError):
    """The request is wrong (a shape, a value, a name): fix it before retrying."""


class NotFound(NNServeError):
    """No such model or version (the message lists what the server has)."""


class ResourceExhausted(NNServeError):
    """Too large, or the server or model is full right now: back off and retry."""


class DeadlineExceeded(NNServeError):
    """The deadline passed before an answer: raise `timeout`, or ask for less."""


class Unavailable(NNServeError):
    """The server or the model is not serving now (starting, stopping, loading): retry, maybe elsewhere."""


class Unauthenticated(NNServeError):
    """Missing or wrong credentials: pass `token=` or TLS credentials."""


class PermissionDenied(NNServeError):
    """The credentials are not allowed this call."""


class FailedPrecondition(NNServeError):
    """The server is not in a state to take this call."""


class Cancelled(NNServeError):
    """The call was cancelled (by the caller, or by a server that was stopping)."""


class Unimplemented(NNServeError):
    """The server does not offer this call or option (the message says which)."""


class ServerError(NNServeError):
    """INTERNAL, UNKNOWN and the rest: the server failed; its log has the details under the request id."""


_BY_CODE: dict[grpc.StatusCode, type[NNServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def from_rpc_error(error: grpc.RpcError) -> NNServeError:
    """The SDK exception for a failed gRPC call."""
    # Sync errors are grpc.Call objects and aio errors are AioRpcError; both have code() and details().
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    try:
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    except Exception:  # an error raised before the call reached a server has none
        trailers = None
    timing = ServerTiming.from_metadata(trailers) if isinstance(trailers, Iterable) else None
    return _BY_CODE.get(code, ServerError)(code.name, details, timing)
