"""Attacks a hidden battery found (issue 32), in a bounded, loopback-only form, so that they stay fixed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from nnserve_client import Client
from nnserve_client.errors import InvalidArgument, ResourceExhausted
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc


def _png(width: int, height: int, noise: bool = False) -> bytes:
    pixels = (  # noise of 2 bits a pixel: slow to decode, yet about 5 MB at this size
        np.random.default_rng(0).integers(0, 4, (height, width), dtype=np.uint8) * 64
        if noise
        else np.zeros((height, width), np.uint8)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _probe_latencies(target: str, stop_after_s: float) -> list[float]:
    """Health checks one after another for `stop_after_s`, as a kubelet would send them: their durations."""
    took = []
    with grpc.insecure_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        ends = time.monotonic() + stop_after_s
        while time.monotonic() < ends:
            began = time.monotonic()
            check(health_pb2.HealthCheckRequest(), timeout=10)
            took.append(time.monotonic() - began)
            time.sleep(0.02)
    return took


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_images_past_the_request_budget_are_refused_from_their_headers(
    transport: str, own_server: Callable[..., RunningServer]
) -> None:
    """96 blank 4000x4000 PNGs (about 1.5 G pixels, little on the wire) in one Classify: refused before any is
    decoded, saying what the budget is."""
    running = own_server("--transport", transport)
    blank = _png(4000, 4000)
    with Client(running.target, retries=0) as client:
        began = time.monotonic()
        with pytest.raises(InvalidArgument, match=r"more than 16777216 pixels together \(--max-request-pixels\)"):
            client.classify("digits-fnn", images=[blank] * 96)
        assert time.monotonic() - began < 2  # decoding them would take tens of seconds
        assert len(client.classify("digits-fnn", images=[_png(8, 8)])) == 1


def test_decoding_large_images_leaves_health_checks_answered(own_server: Callable[..., RunningServer]) -> None:
    """Two callers each send four 4000x4000 noise PNGs (allowed here: 64 M pixels a request). Decoding runs in
    a worker thread, so health checks beside them keep being answered (on the loop, each waited for a whole
    request's decoding: 0.6 s and more here)."""
    running = own_server("--max-request-pixels", str(64 * 1000 * 1000))
    noise = _png(4000, 4000, noise=True)

    def classify() -> int:
        with Client(running.target, retries=0, timeout=60) as client:
            return len(client.classify("digits-fnn", images=[noise] * 4))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        probes = pool.submit(_probe_latencies, running.target, 4.0)
        time.sleep(0.2)
        answers = [pool.submit(classify) for _ in range(2)]
        assert [a.result() for a in answers] == [4] * 2
        took = probes.result()
    assert max(took) < 0.3, sorted(took)[-5:]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_slow_connections_to_the_metrics_port_take_neither_threads_nor_the_grpc_port(
    own_server: Callable[..., RunningServer],
) -> None:
    """500 connections that never send a request (a slowloris): the metrics server holds a few, each for
    at most its timeout, with a fixed pool of threads; gRPC answers meanwhile, and /metrics once they go."""
    running = own_server()
    assert running.metrics_port is not None
    before = _threads(running.process.pid)
    idle = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", running.metrics_port), timeout=5))
        time.sleep(0.5)
        assert _threads(running.process.pid) <= before + 5
        assert max(_probe_latencies(running.target, 1.0)) < 0.5
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert "nnserve_in_flight_requests" in running.metrics()
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert _threads(running.process.pid) <= before + 5


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param(
            "native",
            marks=pytest.mark.xfail(
                strict=True, reason="pygrpc-native 0.5.0 inflates a request before Python sees it; no option refuses"
            ),
        ),
        "grpcio",
    ],
)
def test_a_compressed_bomb_is_refused_before_it_is_inflated(
    transport: str, own_server: Callable[..., RunningServer]
) -> None:
    """256 MiB of zeros, gzip-compressed to about 260 KiB: refused without inflating (peak memory grows by
    far less than the bomb's size), and the server answers on."""
    running = own_server("--transport", transport)
    before = _peak_rss_kb(running.process.pid)
    refused = _send_bomb(running.target)
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Compression algorithm 'gzip' is disabled" in str(refused.details())
    assert _peak_rss_kb(running.process.pid) - before < 64 << 10  # KiB: well under the bomb's 256 MiB
    with Client(running.target) as client:
        assert client.infer("digits-fnn", {"input": np.zeros((1, 64), np.float32)})["logits"].shape == (1, 10)


def test_a_tokenless_compressed_bomb_is_refused_uninflated_on_native_with_tokens(
    own_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """The native front end checks tokens before it inflates: without a token the bomb is refused at the
    headers (it took +529 MiB when Python checked the token after the front end had inflated it)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    running = own_server("--transport", "native", "--auth-token-file", str(token))
    before = _peak_rss_kb(running.process.pid)
    assert _send_bomb(running.target).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _peak_rss_kb(running.process.pid) - before < 64 << 10  # KiB


def _send_bomb(target: str) -> grpc.RpcError:
    """A ModelInfer of 256 MiB of zeros, gzip-compressed to about 260 KiB; the error it ends with."""
    request = pb.ModelInferRequest(model_name="digits-fnn", raw_input_contents=[bytes(256 << 20)])
    request.inputs.add(name="input", datatype="FP32", shape=[(256 << 20) // 256, 64])
    options = [("grpc.max_send_message_length", -1)]
    with (
        grpc.insecure_channel(target, compression=grpc.Compression.Gzip, options=options) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    return caught.value


def _rapid_reset(target: str, streams: int) -> str:
    """CVE-2023-44487's pattern: HEADERS of a ModelInfer, then RST_STREAM, again and again on one connection.
    Returns how the server ended it ("" when it took them all)."""
    import h2.connection
    import h2.events
    import h2.exceptions

    host, port = target.split(":")
    connection = h2.connection.H2Connection()
    headers = [
        (":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":authority", target), ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        sock.setblocking(False)
        try:
            for index in range(streams):
                stream = connection.get_next_available_stream_id()
                connection.send_headers(stream, headers)
                connection.reset_stream(stream)
                if index % 100 == 99:
                    sock.setblocking(True)
                    sock.sendall(connection.data_to_send())
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        received = sock.recv(1 << 20)
                        if not received:
                            return "closed"
                        for event in connection.receive_data(received):
                            if isinstance(event, h2.events.ConnectionTerminated):
                                return f"GOAWAY {event.additional_data!r}"
        except (BrokenPipeError, ConnectionResetError, h2.exceptions.ProtocolError) as error:
            return type(error).__name__
    return ""


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_a_rapid_reset_flood_costs_bounded_memory(transport: str, own_server: Callable[..., RunningServer]) -> None:
    """40,000 streams opened and reset at once: grpcio with no stream cap kept 260 MB after it; with
    --max-concurrent-streams (1024) the process grows by a few MB, and the native front sends GOAWAY
    too_many_resets. Either way the server answers on."""
    running = own_server("--transport", transport)
    pid = running.process.pid
    before = _rss_kb(pid)
    ended = _rapid_reset(running.target, 40_000)
    time.sleep(1)
    assert _rss_kb(pid) - before < 64 << 10, (ended, _rss_kb(pid) - before)  # KiB
    if transport == "native":
        assert "too_many_resets" in ended
    assert max(_probe_latencies(running.target, 0.5)) < 0.5


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


@contextlib.contextmanager
def _unread_generate_streams(target: str, model: str, count: int, token: str = "") -> Iterator[socket.socket]:
    """`count` Generate streams on one HTTP/2 connection whose receive window is 0: the server may send
    them no message at all, and the client never opens the window (a client that reads nothing)."""
    import h2.config
    import h2.connection
    import h2.settings

    from nnserve_contract.stubs import tasks_pb2

    host, port = target.split(":")
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    request = tasks_pb2.GenerateRequest(model_name=model)
    if model == "digits-gan":
        request.num_samples = 256  # a message per image: the stream's send buffer fills at once
    else:
        request.prompt, request.max_tokens = "The ", 2000
    body = request.SerializeToString()
    headers = [
        (":method", "POST"), (":scheme", "http"), (":path", "/nnserve.v1.Tasks/Generate"), (":authority", target),
        ("content-type", "application/grpc"), ("te", "trailers"),
        *([("authorization", f"Bearer {token}")] if token else []),
    ]  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        connection.initiate_connection()
        connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        for _ in range(count):
            stream = connection.get_next_available_stream_id()
            connection.send_headers(stream, headers)
            connection.send_data(stream, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(connection.data_to_send())
        time.sleep(0.5)  # the server has taken them
        yield sock


def _generate(target: str, token: str = "", timeout: float = 5) -> str:
    with Client(target, retries=0, token=token or None) as client:
        return client.generate_text("chars-lstm", "The ", max_tokens=8, timeout=timeout)


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_streams_whose_client_reads_nothing_leave_the_others_answered(
    transport: str, own_server: Callable[..., RunningServer], fast_zoo: tuple[Path, list[object]]
) -> None:
    """With 48 image streams that read nothing open on the native transport, another client's Generate
    timed out in 3 of 4 tries: pygrpc-native 0.5.0 waits for a behind client's room on a thread of the
    loop's default pool (6 on 2 CPUs). The transport now waits with an asyncio sleep, no thread (the stall
    timeout is off here: no stream is ended)."""
    running = own_server(
        "--transport", transport, "--stream-stall-timeout-s", "0", "--generation-max-streams-per-client", "0",
        repository=fast_zoo[0],
    )  # fmt: skip
    with _unread_generate_streams(running.target, "digits-gan", 48):
        time.sleep(1.5)
        assert len(_generate(running.target, timeout=5)) == 8


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_a_stream_whose_client_reads_nothing_is_ended_and_its_slot_freed(
    transport: str, own_server: Callable[..., RunningServer], fast_zoo: tuple[Path, list[object]]
) -> None:
    running = own_server(
        "--transport", transport, "--generation-max-streams", "4", "--stream-stall-timeout-s", "1",
        repository=fast_zoo[0],
    )  # fmt: skip
    with _unread_generate_streams(running.target, "chars-lstm", 4):
        with pytest.raises(ResourceExhausted, match="generation-max-streams"):
            _generate(running.target)  # every slot held
        time.sleep(1.5)
        assert len(_generate(running.target)) == 8  # the stalled streams were ended: their slots are free
    assert running.log().count("the client took no message for 1 s (--stream-stall-timeout-s)") >= 4


def test_one_client_takes_at_most_its_share_of_a_models_generations(
    own_server: Callable[..., RunningServer], fast_zoo: tuple[Path, list[object]], tmp_path: Path
) -> None:
    """A client is its token's label (else its IP address): one that fills its share is refused, others
    still generate."""
    access = tmp_path / "access.toml"
    access.write_text(
        "".join(
            f'[[token]]\nlabel = "{name}"\ntoken = "{name}-secret"\nmodels = ["*"]\ngroups = ["inference"]\n'
            for name in ("greedy", "other")
        )
    )
    running = own_server(
        "--access-file", str(access), "--generation-max-streams-per-client", "3", repository=fast_zoo[0]
    )
    with _unread_generate_streams(running.target, "chars-lstm", 3, token="greedy-secret"):
        with pytest.raises(ResourceExhausted, match="token greedy, its share of the server"):
            _generate(running.target, token="greedy-secret")
        assert len(_generate(running.target, token="other-secret")) == 8


def test_a_segment_request_is_bounded_and_gives_its_memory_back(
    own_server: Callable[..., RunningServer], fast_zoo: tuple[Path, list[object]]
) -> None:
    """The zoo's U-Net on one 2048x2048 PNG (7 KB, within --max-image-pixels) peaked at 2.4 GB and kept
    2.2 GB (onnxruntime's arena); Segment takes at most --max-segment-pixels (2 MP: 0.9 GB at the peak
    here), refused from the header, and segmentation models run without the arena."""
    from nnserve_server.core.model import OnnxModel
    from nnserve_server.core.runtime import Runtime
    from nnserve_server.core.serving_config import serving_config
    from nnserve_server.settings import Settings

    running = own_server(repository=fast_zoo[0])
    with Client(running.target) as client:
        with pytest.raises(InvalidArgument, match=r"2048x2048 pixels; at most 2097152 are segmented \(--max-segment"):
            client.segment("shapes-unet", _png(2048, 2048))
        assert client.segment("shapes-unet", _png(1448, 1448)).mask.shape == (1448, 1448)  # the most it takes
    settings = Settings()
    runtime, folder = Runtime.from_settings(settings), fast_zoo[0] / "shapes-unet"
    config = serving_config(folder, settings, runtime.cpus)
    unet = OnnxModel("shapes-unet", "1", folder / "1" / "model.onnx", runtime, config)
    assert not unet.session.session.get_session_options().enable_cpu_mem_arena
    unet.close()


def _unauthenticated_bodies(target: str, count: int, size: int) -> list[grpc.StatusCode]:
    """`count` ModelInfer calls of `size` bytes each, at once, with no token."""
    request = pb.ModelInferRequest(model_name="digits-fnn", raw_input_contents=[bytes(size)])
    request.inputs.add(name="input", datatype="FP32", shape=[size // 256, 64])
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def call(_: int) -> grpc.StatusCode:
            try:
                stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as error:
                return error.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            return list(pool.map(call, range(count)))


@pytest.mark.parametrize("transport", ["native", "grpcio"])
def test_calls_without_a_token_are_refused_without_their_bodies_buffered(
    transport: str, own_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """64 unauthenticated 8 MiB ModelInfer calls at once: all UNAUTHENTICATED, and the server's peak memory
    grows by far less than the 512 MiB they carry (they were read and parsed first: +528 MB; on native,
    checked by Python after the front end had read them: +450 MB)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    running = own_server("--transport", transport, "--auth-token-file", str(token))
    before = _peak_rss_kb(running.process.pid)
    codes = _unauthenticated_bodies(running.target, 64, 8 << 20)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    grown = _peak_rss_kb(running.process.pid) - before
    assert grown < 160 << 10, f"peak grew by {grown >> 10} MiB"  # KiB: 39-103 MiB seen; the bodies are 512
