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
from .types import (
    Classification,
    Classifications,
    Embeddings,
    GeneratedImage,
    GenerateEvent,
    GenerationDone,
    InferResult,
    LabelScore,
    ModelInfo,
    Segmentation,
    ServerInfo,
    ServerTiming,
    TaskInput,
    TensorSpec,
    TextPiece,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Classification",
    "Classifications",
    "Client",
    "DeadlineExceeded",
    "Embeddings",
    "FailedPrecondition",
    "GenerateEvent",
    "GeneratedImage",
    "GenerationDone",
    "InferResult",
    "InvalidArgument",
    "LabelScore",
    "ModelInfo",
    "NNServeError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Segmentation",
    "ServerError",
    "ServerInfo",
    "ServerTiming",
    "TaskInput",
    "TensorSpec",
    "TextPiece",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "tls_credentials",
]
