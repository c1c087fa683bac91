"""The serving core: numpy and onnxruntime, nothing of gRPC (the edge calls in; nothing here calls out)."""
