"""The transport's ceiling: a grpc.aio server speaking KServe v2 with no model behind it (`--native`: on
pygrpc-native's asyncio server, the transport nnserve serves on by default).

It reads the model file's input and output specs (onnxruntime reads the graph; nothing runs) and
answers ModelInfer with a response of the same size a real model returns, built once. Requests are
still parsed by protobuf, as any Python server speaking this protocol must. Same process layout as
nnserve: one asyncio process, grpc.aio, the same message-size options.

    python -m benchmarks.bare_server --model-repository DIR --port 0   (prints "listening on HOST:PORT")

With `--run-model` it also runs the model once per request (onnxruntime, one thread, on a fixed
input prepared at start; nothing is decoded or encoded): the floor of any server that runs the
model in the process that speaks gRPC, whatever else its request path costs.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import onnxruntime as ort

from benchmarks.load import example_inputs
from nnserve_contract.codec import datatype_of
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_contract.stubs import model_config_pb2 as config_pb

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class _Model:
    def __init__(self, name: str, path: Path, run: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = name
        self.session = session if run else None
        self.inputs = [
            (a.name, _DTYPES[a.type], [d if isinstance(d, int) else -1 for d in a.shape]) for a in session.get_inputs()
        ]
        self.outputs = [
            (a.name, _DTYPES[a.type], [d if isinstance(d, int) else -1 for d in a.shape]) for a in session.get_outputs()
        ]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        self.metadata = pb.ModelMetadataResponse(
            name=name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=n, datatype=datatype_of(np.dtype(t)), shape=s) for n, t, s in self.inputs],
            outputs=[tensor(name=n, datatype=datatype_of(np.dtype(t)), shape=s) for n, t, s in self.outputs],
        )
        config_type = {np.float32: config_pb.TYPE_FP32, np.int64: config_pb.TYPE_INT64, np.int32: config_pb.TYPE_INT32}
        self.config = pb.ModelConfigResponse(
            config=config_pb.ModelConfig(
                name=name,
                platform="onnxruntime_onnx",
                max_batch_size=256,
                input=[config_pb.ModelInput(name=n, data_type=config_type[t], dims=s[1:]) for n, t, s in self.inputs],
                output=[
                    config_pb.ModelOutput(name=n, data_type=config_type[t], dims=s[1:]) for n, t, s in self.outputs
                ],
            )
        )
        self._responses: dict[int, pb.ModelInferResponse] = {}
        self.inferences = 0
        self.feed = example_inputs(session.get_inputs())  # what the clients send
        self.output_names = [n for n, _, _ in self.outputs]

    def response(self, batch: int) -> pb.ModelInferResponse:
        """A batch's response: the sizes a real model returns, made once per batch size."""
        if batch not in self._responses:
            response = pb.ModelInferResponse(model_name=self.name, model_version="1")
            for name, dtype, shape in self.outputs:
                dims = [batch, *(d if d > 0 else 1 for d in shape[1:])]
                response.outputs.add(name=name, datatype=datatype_of(np.dtype(dtype)), shape=dims)
                response.raw_output_contents.append(np.zeros(dims, dtype).tobytes())
            self._responses[batch] = response
        return self._responses[batch]


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: dict[str, _Model]) -> None:
        self._models = models

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._models)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare", version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        return self._models[request.name].metadata

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        return self._models[request.name].config

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        """Only the inference count: the bench divides the server's CPU by it."""
        model = self._models[request.name]
        return pb.ModelStatisticsResponse(
            model_stats=[pb.ModelStatistics(name=model.name, version="1", inference_count=model.inferences)]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        batch = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        model = self._models[request.model_name]
        model.inferences += batch
        if model.session is not None:
            model.session.run(model.output_names, model.feed)
        return model.response(batch)


def _blocking(method: Any) -> Any:
    """The async handler as a plain function: the handlers above never suspend, so one send runs them."""

    def call(self: Any, request: Any, context: Any) -> Any:
        try:
            method(self, request, context).send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError(f"{method.__name__} suspended")

    return call


class SyncBareServicer(BareServicer):
    """The same answers through grpcio's thread-pool server (`--sync`)."""


for _name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
              "ModelStatistics", "ModelInfer"):  # fmt: skip
    setattr(SyncBareServicer, _name, _blocking(getattr(BareServicer, _name)))


def _options(reuse_port: bool) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def run_sync(models: dict[str, _Model], host: str, port: int, reuse_port: bool, threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=_options(reuse_port))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncBareServicer(models), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"listening on {host}:{bound}", flush=True)
    server.wait_for_termination()


def load(repository: Path, run: bool = False) -> dict[str, _Model]:
    paths = sorted(repository.glob("*/1/model.onnx"))
    return {p.parent.parent.name: _Model(p.parent.parent.name, p, run) for p in paths}


async def run(models: dict[str, _Model], host: str, port: int, reuse_port: bool, native: bool = False) -> None:
    if native:  # the same server on pygrpc-native's front end: HTTP/2 in Rust, the servicer unchanged
        import pygrpc_native.aio

        server = pygrpc_native.aio.server(options=_options(reuse_port))
    else:
        server = grpc.aio.server(options=_options(reuse_port))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(models), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--run-model", action="store_true", help="run the model once per request")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--native", action="store_true", help="on pygrpc-native's asyncio server (nnserve's default)")
    parser.add_argument("--sync", type=int, default=0, metavar="THREADS", help="grpcio's thread-pool server instead")
    args = parser.parse_args()
    if args.sync:
        run_sync(load(args.model_repository, args.run_model), args.host, args.port, args.reuse_port, args.sync)
        return
    main_coroutine = run(
        load(args.model_repository, args.run_model), args.host, args.port, args.reuse_port, args.native
    )
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(main_coroutine)
    else:
        asyncio.run(main_coroutine)


if __name__ == "__main__":
    main()
