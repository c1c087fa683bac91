"""The wire contract that nnserve's SDK, server and exporters share.

- `nnserve_contract.stubs`: the generated protobuf and gRPC stubs of protos/ (`make protos`).
- `nnserve_contract.codec`: the one place where protobuf tensors meet numpy.
- `nnserve_contract.model_spec`: the schema of the ONNX metadata that exporters write and the server reads.

It imports nothing else of nnserve's, ships in the nnserve-client distribution (grpcio, protobuf and
numpy only), and every other package imports it rather than the SDK's private modules.
"""
