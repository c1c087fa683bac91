"""nnserve's gRPC model server: self-describing ONNX models over KServe v2 and nnserve's task API."""

__version__ = "0.1.0"
