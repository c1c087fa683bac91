"""Errors the SDK raises: every failed call becomes one of these, carrying the server's message.

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

import grpc


class NNServeError(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(NNServeError):
    pass


class NotFound(NNServeError):
    pass


class ResourceExhausted(NNServeError):
    pass


class DeadlineExceeded(NNServeError):
    pass


class Unavailable(NNServeError):
    pass


class Unauthenticated(NNServeError):
    pass


class PermissionDenied(NNServeError):
    pass


class FailedPrecondition(NNServeError):
    pass


class Cancelled(NNServeError):
    pass


class Unimplemented(NNServeError):
    pass


class ServerError(NNServeError):
    pass


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
    return _BY_CODE.get(code, ServerError)(code.name, details)
