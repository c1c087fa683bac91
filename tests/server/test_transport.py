"""The transport seam (`edge/transport.py`): which gRPC server serves, and the whole surface on both.

`auto` takes the native front end (pygrpc-native) unless a setting needs grpcio; the start-up line
and `nnserve_transport_info` say which serves and why. Every RPC of both services, streams both ways,
health, reflection, token auth and shared memory are sent through each transport; on the native one,
ModelInfer calls that arrive together share one onnxruntime run (`servicers/infer_burst.py`).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from conftest import SHARED_MEMORY, RunningServer, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_health_reflection_metrics import sample

from nnserve_client import Client
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_contract.stubs import tasks_pb2, tasks_pb2_grpc
from nnserve_server.core.errors import StartupError
from nnserve_server.edge import transport
from nnserve_server.settings import Settings

TOKEN = "s3cret-token"
PIXELS = np.random.default_rng(7).random((1, 64), dtype=np.float32)


@pytest.mark.parametrize(
    ("flags", "name", "reason"),
    [
        ([], "native", "auto"),
        (["--transport", "grpcio"], "grpcio", "--transport grpcio"),
        (["--max-connection-age-s", "30"], "grpcio", "auto: the native front end has no connection age"),
        (["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"], "grpcio", "auto: the native front end has no TLS"),
        (["--transport", "native"], "native", "--transport native"),
        (["--auth-token-file", "t"], "grpcio", "auto: with bearer tokens only grpcio refuses a tokenless call"),
        (["--access-file", "a.toml"], "grpcio", "auto: with bearer tokens only grpcio refuses a tokenless call"),
        (["--transport", "native", "--auth-token-file", "t"], "native", "--transport native; tokens checked by"),
    ],
)
@pytest.mark.fast
def test_auto_takes_native_unless_a_setting_needs_grpcio(flags: list[str], name: str, reason: str) -> None:
    chosen = transport.choose(Settings.load(flags, environ={}))
    assert chosen.name == name
    assert chosen.reason.startswith(reason)


@pytest.mark.parametrize(
    "flags", [["--max-connection-age-s", "30"], ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"]]
)
@pytest.mark.fast
def test_native_refuses_what_only_grpcio_serves(flags: list[str]) -> None:
    with pytest.raises(StartupError, match="--transport native cannot serve"):
        transport.choose(Settings.load(["--transport", "native", *flags], environ={}))


@pytest.mark.fast
def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="transport 'h3' is not one of auto, native, grpcio"):
        Settings.load(["--transport", "h3"], environ={})


@pytest.mark.parametrize(
    ("flags", "said"),
    [([], 'transport="native"'), (["--max-connection-age-s", "60"], 'transport="grpcio"')],
)
def test_the_banner_and_a_metric_say_which_transport_serves(
    own_server: Callable[..., RunningServer], flags: list[str], said: str
) -> None:
    running = own_server(*flags)
    name = said.split('"')[1]
    assert f"; transport {name} (" in running.log()
    info = [line for line in running.metrics().splitlines() if line.startswith("nnserve_transport_info{")]
    assert len(info) == 1, info
    assert said in info[0]
    assert info[0].endswith(" 1.0"), info


@pytest.fixture(scope="module", params=["native", "grpcio"])
def served(request: pytest.FixtureRequest, fast_zoo: tuple[Path, list[object]]) -> Iterator[RunningServer]:
    running = start_server(fast_zoo[0], "--transport", request.param, "--max-tokens", "500", *SHARED_MEMORY)
    assert f"transport {request.param}" in running.log()
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log(), running.log()[-3000:]


def _infer_request(pixels: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits-fnn", id="smoke")
    request.inputs.add(name="input", datatype="FP32", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    return request


def test_every_kserve_rpc_works(served: RunningServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "nnserve"
        assert stub.ModelReady(pb.ModelReadyRequest(name="digits-fnn")).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="digits-fnn")).inputs[0].name == "input"
        assert stub.ModelConfig(pb.ModelConfigRequest(name="digits-fnn")).config.name == "digits-fnn"
        answers = [stub.ModelInfer(_infer_request(PIXELS)) for _ in range(3)]  # the second on: the fast lane
        for answer in answers:
            assert answer.id == "smoke"
            assert answer.outputs[0].shape == [1, 10]
            assert answer.raw_output_contents == answers[0].raw_output_contents
        typed = pb.ModelInferRequest(model_name="digits-fnn")
        typed.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(PIXELS[0])
        assert stub.ModelInfer(typed).raw_output_contents == answers[0].raw_output_contents
        streamed = list(stub.ModelStreamInfer(iter([_infer_request(PIXELS)] * 3)))
        assert [s.error_message for s in streamed] == [""] * 3
        assert all(s.infer_response.raw_output_contents == answers[0].raw_output_contents for s in streamed)
        assert stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits-fnn")).model_stats[0].inference_count >= 7
        assert any(m.name == "chars-lstm" for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits-cnn"))
        with pytest.raises(grpc.RpcError) as refused:
            stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_system_shared_memory_works(served: RunningServer) -> None:
    region = shared_memory.SharedMemory(create=True, size=PIXELS.nbytes + 40)
    try:
        region.buf[: PIXELS.nbytes] = PIXELS.tobytes()
        with grpc.insecure_channel(served.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="in", key=f"/{region.name}", byte_size=PIXELS.nbytes + 40)
            )
            assert "in" in stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
            request = pb.ModelInferRequest(model_name="digits-fnn")
            tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
            tensor.parameters["shared_memory_region"].string_param = "in"
            tensor.parameters["shared_memory_byte_size"].int64_param = PIXELS.nbytes
            from_memory = stub.ModelInfer(request).raw_output_contents
            assert from_memory == stub.ModelInfer(_infer_request(PIXELS)).raw_output_contents
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"))
    finally:
        region.close()
        region.unlink()


def test_every_task_rpc_works_and_a_stream_can_be_cancelled(served: RunningServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        tasks = tasks_pb2_grpc.TasksStub(channel)
        assert "chars-lstm" in [m.name for m in tasks.ListModels(tasks_pb2.ListModelsRequest()).models]
        assert tasks.GetModel(tasks_pb2.GetModelRequest(name="digits-fnn")).task == "classify"
    with Client(served.target) as client:
        digits = np.zeros((1, 8, 8), np.float32)
        assert len(client.classify("digits-fnn", digits)) == 1
        assert client.encode("sentence-minilm", texts=["a short text"]).vectors.shape[0] == 1
        assert client.generate_text("chars-lstm", "ab", max_tokens=5, seed=1) == client.generate_text(
            "chars-lstm", "ab", max_tokens=5, seed=1
        )
        stream = client.generate("chars-transformer", prompt="The ", max_tokens=500, temperature=1.0, seed=3)
        for _, _ in zip(range(3), stream, strict=False):
            pass
        stream.close()
        assert len(client.generate_text("chars-gru", "x", max_tokens=3)) == 3


def test_health_check_watch_and_reflection(served: RunningServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "digits-fnn"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        watch = health.Watch(health_pb2.HealthCheckRequest(service="digits-fnn"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
        assert {"inference.GRPCInferenceService", "nnserve.v1.Tasks", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("name", ["native", "grpcio"])
def test_a_token_guards_every_rpc_on_both_paths_and_health_on_native(
    own_server: Callable[..., RunningServer], tmp_path: Path, name: str
) -> None:
    """Also once ModelInfer's plan exists. On native the front end checks the token at the headers, for
    health checks too (`nnserve health --token-file` sends it); grpcio keeps health open."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    running = own_server("--transport", name, "--auth-token-file", str(token_file))
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            stub.ModelInfer(_infer_request(PIXELS), metadata=good)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_infer_request(PIXELS), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ModelStreamInfer(iter([_infer_request(PIXELS)]), metadata=metadata))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=good).status == serving
        if name == "grpcio":
            assert health.Check(health_pb2.HealthCheckRequest()).status == serving
        else:
            with pytest.raises(grpc.RpcError) as refused:
                health.Check(health_pb2.HealthCheckRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "needs 'authorization: Bearer <token>'" in str(refused.value.details())
    probe = [sys.executable, "-m", "nnserve_server.process.cli", "health", "--target", running.target]
    with_token = subprocess.run([*probe, "--token-file", str(token_file)], capture_output=True, text=True)
    assert with_token.returncode == 0, with_token.stdout
    without = subprocess.run(probe, capture_output=True, text=True)
    assert without.returncode == (1 if name == "native" else 0), without.stdout
    # Refused calls name no model. On native the front end refused them before Python saw them, and it
    # names only the methods it serves itself (not the bidirectional ModelStreamInfer).
    metrics = running.metrics()
    for rpc in ("ModelInfer", "ModelStreamInfer" if name == "grpcio" else "other"):
        refused = {"model": "", "version": "", "rpc": rpc}
        assert sample(metrics, "nnserve_requests_total", **refused, code="UNAUTHENTICATED") == 2, rpc
        assert sample(metrics, "nnserve_request_failures_total", **refused, reason="unauthenticated") == 2, rpc
    health = {"model": "", "version": "", "rpc": "Check", "code": "UNAUTHENTICATED"}
    assert sample(metrics, "nnserve_requests_total", **health) == (2 if name == "native" else 0)


def _burst(target: str, inputs: list[np.ndarray]) -> list[bytes]:
    async def send() -> list[bytes]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answers = await asyncio.gather(*(stub.ModelInfer(_infer_request(x)) for x in inputs))
            return [a.raw_output_contents[0] for a in answers]

    return asyncio.run(send())


def test_modelinfer_calls_that_arrive_together_share_a_run_and_each_gets_its_own_rows(
    own_server: Callable[..., RunningServer],
) -> None:
    """On the native transport: 64 calls sent at once reach Python in few bursts; each burst's calls to
    one model take one onnxruntime run. Every caller still gets the answer to its own input."""
    running = own_server("--transport", "native")
    rng = np.random.default_rng(3)
    inputs = [rng.random((1, 64), dtype=np.float32) for _ in range(64)]
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        alone = [stub.ModelInfer(_infer_request(x)).raw_output_contents[0] for x in inputs]

        def runs_and_requests() -> tuple[int, int]:
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits-fnn")).model_stats
            return sum(s.execution_count for s in stats), sum(s.inference_stats.success.count for s in stats)

        shared = 0
        for _ in range(10):  # the client's calls may trickle in one by one; bursts come within a few tries
            runs, requests = runs_and_requests()
            together = _burst(running.target, inputs)
            for answer, expected in zip(together, alone, strict=True):
                np.testing.assert_allclose(
                    np.frombuffer(answer, np.float32), np.frombuffer(expected, np.float32), rtol=1e-5, atol=1e-6
                )
            after_runs, after_requests = runs_and_requests()
            assert after_requests - requests == 64
            shared = max(shared, 64 - (after_runs - runs))
            if shared >= 8:
                break
        assert shared >= 8, f"64 calls sent together took {64 - shared} runs: they should share runs"
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits-fnn")).model_stats
        assert max(b.batch_size for s in stats for b in s.batch_stats) > 1
    assert "nnserve_batch_size_bucket" in running.metrics()


def test_the_lane_and_the_general_path_together_answer_right_and_count_exactly(
    own_server: Callable[..., RunningServer],
) -> None:
    """The burst lane runs on the transport's thread while the event loop serves the general path (typed
    contents, streams) for the same model: every answer is right and no request goes uncounted."""
    running = own_server("--transport", "native")
    typed = pb.ModelInferRequest(model_name="digits-fnn")
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(PIXELS[0])
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        expected = stub.ModelInfer(_infer_request(PIXELS)).raw_output_contents[0]

        def totals() -> tuple[int, float]:
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits-fnn")).model_stats
            served = sum(s.inference_stats.success.count for s in stats)
            counted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in running.metrics().splitlines()
                if line.startswith("nnserve_requests_total{")
                and 'rpc="ModelInfer"' in line
                and 'code="OK"' in line
                and 'model="digits-fnn"' in line
            )
            return served, counted

        served, counted = totals()

        async def load() -> list[bytes]:
            async with grpc.aio.insecure_channel(running.target) as aio_channel:
                aio_stub = pb_grpc.GRPCInferenceServiceStub(aio_channel)
                raw = [aio_stub.ModelInfer(_infer_request(PIXELS)) for _ in range(300)]
                general = [aio_stub.ModelInfer(typed) for _ in range(100)]
                answers = await asyncio.gather(*raw, *general)
                streamed = [r async for r in aio_stub.ModelStreamInfer(iter([_infer_request(PIXELS)] * 50))]
            return [a.raw_output_contents[0] for a in answers] + [
                s.infer_response.raw_output_contents[0] for s in streamed
            ]

        want = np.frombuffer(expected, np.float32)
        for answer in asyncio.run(load()):
            np.testing.assert_allclose(np.frombuffer(answer, np.float32), want, rtol=1e-5)
        after_served, after_counted = totals()
        assert after_served - served == 450  # 300 raw, 100 typed, 50 streamed
        assert after_counted - counted == 400  # the stream's requests count under ModelStreamInfer
