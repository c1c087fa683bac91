"""nnserve's Python SDK: KServe v2 inference and nnserve's task API over gRPC.

Installs with grpcio, protobuf and numpy only: no torch, no onnxruntime.
"""

from .client import AsyncClient, Client, tls_credentials
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NNServeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .types import Classification, LabelScore, ModelInfo, ServerInfo, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Classification",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "LabelScore",
    "ModelInfo",
    "NNServeError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "ServerInfo",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "tls_credentials",
]
