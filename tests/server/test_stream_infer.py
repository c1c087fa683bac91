"""ModelStreamInfer with our own stubs: many requests on one stream, each answered with its id; a bad
one answered with its error while the stream goes on; the per-stream limit; cancellation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from test_health_reflection_metrics import sample

from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

PIXELS = (np.arange(64, dtype=np.float32).reshape(1, 64) % 17) / 16


def fnn(request_id: str, model: str = "digits-fnn") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(PIXELS.tobytes())
    return request


def slow(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[64, 1024])
    request.raw_input_contents.append(np.ones((64, 1024), np.float32).tobytes())
    return request


def test_every_request_on_a_stream_is_answered_with_its_id_and_a_bad_one_with_its_error(
    server: RunningServer,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        plain = stub.ModelInfer(fnn("unary"), timeout=10)
        requests = [fnn("a"), fnn("b"), fnn("c", model="no-such-model"), fnn("d"), pb.ModelInferRequest(id="e")]
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(answers) == len(requests)
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["a", "b", "c", "d", "e"]
    for request_id in "abd":
        answer = by_id[request_id]
        assert answer.error_message == ""
        assert answer.infer_response.model_name == "digits-fnn"
        assert answer.infer_response.raw_output_contents == plain.raw_output_contents  # the same logits
    assert by_id["c"].error_message.startswith("NOT_FOUND: unknown model 'no-such-model'")
    assert by_id["e"].error_message.startswith("NOT_FOUND: unknown model ''")
    assert "(request " in by_id["c"].error_message  # the request id the server logged it under


def test_each_stream_request_is_counted_like_a_call(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        list(stub.ModelStreamInfer(iter([fnn("1"), fnn("2"), fnn("3", model="nope")]), timeout=30))
    text = running.metrics()
    labels = {"model": "digits-fnn", "version": "2", "rpc": "ModelStreamInfer"}
    assert sample(text, "nnserve_requests_total", **labels, code="OK") == 2
    assert (
        sample(text, "nnserve_requests_total", model="unknown", version="", rpc="ModelStreamInfer", code="NOT_FOUND")
        == 1
    )


def test_a_stream_beyond_its_limit_is_refused_per_request_and_goes_on(
    own_server: Callable[..., RunningServer],
) -> None:
    running = own_server("--max-stream-requests", "2", "--no-dynamic-batching")
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([slow(str(i)) for i in range(8)]), timeout=60))
        after = list(stub.ModelStreamInfer(iter([fnn("later")]), timeout=30))
    refused = [a for a in answers if a.error_message]
    served = [a for a in answers if not a.error_message]
    assert len(answers) == 8
    assert refused, "8 slow requests at once on a stream limited to 2 in flight"
    assert len(served) >= 2
    assert all("RESOURCE_EXHAUSTED: this stream has 2 requests in flight" in a.error_message for a in refused)
    assert after[0].infer_response.id == "later"
    assert after[0].error_message == ""


def test_cancelling_a_stream_ends_its_work_in_flight(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--no-dynamic-batching")

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(6):
            yield slow(str(i))
        time.sleep(30)  # keep the stream open: the client cancels it first

    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests(), timeout=60)
        first = next(call)
        assert first.error_message == ""
        call.cancel()
    deadline = time.monotonic() + 10
    while sample(running.metrics(), "nnserve_in_flight_requests") != 0:
        assert time.monotonic() < deadline, running.metrics()
        time.sleep(0.1)
    with grpc.insecure_channel(running.target) as channel:  # and the server goes on
        assert pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(fnn("next"), timeout=10).id == "next"


@pytest.mark.fast
def test_a_client_that_stops_reading_holds_a_bounded_number_of_answers() -> None:
    """`stream_infer` itself, with work that answers faster than the client reads: the work waits at its
    next answer once the stream's queue is full, and every answer still arrives, in order per request."""
    import asyncio
    from collections.abc import AsyncIterator, Awaitable

    from nnserve_server.edge.servicers.streaming import stream_infer

    produced = 0

    async def serve(request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        nonlocal produced
        for piece in range(200):
            produced += 1
            yield pb.ModelInferResponse(id=f"{request.id}:{piece}")

    async def account(request: pb.ModelInferRequest, work: Callable[[], Awaitable[None]]) -> str | None:
        await work()
        return None

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for index in range(3):
            yield pb.ModelInferRequest(id=str(index))

    async def client() -> list[str]:
        answers = stream_infer(requests(), serve, account, limit=8, max_queued=16)
        received = [(await anext(answers)).infer_response.id]
        await asyncio.sleep(0.2)  # the client stops reading: the work runs until the queue is full
        stalled_at = produced
        assert stalled_at <= 16 + 1 + 3  # the queue, the one read, one answer in hand per request
        received += [answer.infer_response.id async for answer in answers]
        assert produced == 600
        return received

    received = asyncio.run(client())
    assert len(received) == 600
    for index in range(3):
        assert [r for r in received if r.startswith(f"{index}:")] == [f"{index}:{p}" for p in range(200)]
