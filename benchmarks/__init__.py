"""Side-by-side benchmarks: nnserve vs raw onnxruntime in-process vs a bare grpc.aio server."""
