"""Train PyTorch models and export them as self-describing, verified ONNX files for nnserve."""

__version__ = "0.1.0"

from .api import ParityError, export, verify

__all__ = ["ParityError", "export", "verify"]
