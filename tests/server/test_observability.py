"""Metrics that say where the time went, trailing-metadata timings, JSON logs with request ids.

Each test sends a known sequence of requests to a server of its own and checks exact counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from test_health_reflection_metrics import sample

from nnserve_client import Client, GenerationDone, InvalidArgument, NotFound
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_server.core.request_record import request_id_from

FNN_V1 = {"model": "digits-fnn", "version": "1"}


def pixels(rows: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(rows).random((rows, 64), dtype=np.float32)}


def test_a_known_sequence_gives_exact_counts_and_buckets(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()
    with Client(running.target) as client:
        for _ in range(3):
            client.infer("digits-fnn", pixels(1), version="1")
        client.infer("digits-fnn", pixels(4), version="1")  # one request carrying a batch of 4
        with pytest.raises(InvalidArgument):
            client.infer("digits-fnn", {"input": np.zeros((1, 63), np.float32)}, version="1")
        with pytest.raises(NotFound):
            client.infer("who-knows", pixels(1))
        client.classify("digits-fnn", np.zeros((2, 64), np.float32))  # version 2, the latest
    text = running.metrics()

    ok = {**FNN_V1, "rpc": "ModelInfer", "code": "OK"}
    assert sample(text, "nnserve_requests_total", **ok) == 4
    assert sample(text, "nnserve_request_duration_seconds_count", **ok) == 4
    assert sample(text, "nnserve_request_duration_seconds_bucket", **ok, le="+Inf") == 4
    # Failures by reason; the refused request never reached a version, the unknown name is folded.
    invalid = {"model": "digits-fnn", "version": "", "rpc": "ModelInfer"}
    assert sample(text, "nnserve_request_failures_total", **invalid, reason="invalid") == 1
    assert sample(text, "nnserve_requests_total", **invalid, code="INVALID_ARGUMENT") == 1
    unknown = {"model": "unknown", "version": "", "rpc": "ModelInfer", "reason": "not_found"}
    assert sample(text, "nnserve_request_failures_total", **unknown) == 1
    # Rows, runs and their sizes: warm-up runs are not counted.
    assert sample(text, "nnserve_inferences_total", **FNN_V1) == 7
    assert sample(text, "nnserve_batch_size_count", **FNN_V1) == 4
    assert sample(text, "nnserve_batch_size_sum", **FNN_V1) == 7
    assert sample(text, "nnserve_batch_size_bucket", **FNN_V1, le="1.0") == 3
    assert sample(text, "nnserve_batch_size_bucket", **FNN_V1, le="2.0") == 3
    assert sample(text, "nnserve_batch_size_bucket", **FNN_V1, le="4.0") == 4
    # Where the time went, one observation per served request.
    for name in ("nnserve_queue_wait_seconds", "nnserve_compute_seconds"):
        assert sample(text, f"{name}_count", **FNN_V1) == 4, name
        assert sample(text, f"{name}_sum", **FNN_V1) > 0, name
    for name in ("nnserve_decode_seconds", "nnserve_encode_seconds"):
        assert sample(text, f"{name}_count", **FNN_V1, rpc="ModelInfer") == 4, name
        assert sample(text, f"{name}_count", model="digits-fnn", version="2", rpc="Classify") == 1, name
    assert sample(text, "nnserve_requests_total", model="digits-fnn", version="2", rpc="Classify", code="OK") == 1
    assert sample(text, "nnserve_inferences_total", model="digits-fnn", version="2") == 2
    # Gauges: nothing in flight or queued now; state, versions, load time, provider, process.
    assert sample(text, "nnserve_in_flight_requests") == 0
    assert sample(text, "nnserve_queue_depth", **FNN_V1) == 0
    assert sample(text, "nnserve_model_ready", model="digits-fnn") == 1
    assert sample(text, "nnserve_model_versions_loaded", model="digits-fnn") == 2
    assert sample(text, "nnserve_model_load_duration_seconds", **FNN_V1) > 0
    assert sample(text, "nnserve_execution_provider", provider="CPUExecutionProvider") == 1
    assert sample(text, "process_resident_memory_bytes") > 10e6
    assert sample(text, "process_cpu_seconds_total") > 0


def test_rejected_requests_are_counted_by_reason(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--max-queue-size", "1", "--instances", "1")
    slow = {"x": np.ones((1, 1024), np.float32)}
    with Client(running.target, timeout=30, retries=0) as client:
        client.infer("slow", slow)  # a run takes tens of ms: queued requests wait

        # Far more concurrent calls than one instance and a queue of one can hold: some are refused.
        def call(_: int) -> str:
            try:
                client.infer("slow", slow)
            except Exception as error:
                return type(error).__name__
            return "ok"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(32)))
    text = running.metrics()
    rejected = outcomes.count("ResourceExhausted")
    assert rejected > 0, outcomes
    labels = {"model": "slow", "version": "", "rpc": "ModelInfer"}
    assert sample(text, "nnserve_request_failures_total", **labels, reason="rejected") == rejected
    assert sample(text, "nnserve_requests_total", **labels, code="RESOURCE_EXHAUSTED") == rejected


def test_responses_carry_the_request_id_and_server_timing(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()
    with Client(running.target, metadata=[("x-request-id", "order-42")]) as client:
        result = client.infer("digits-fnn", pixels(3), version="1")
        timing = result.timing
        assert timing is not None
        assert timing.request_id == "order-42"
        assert timing.batch_size == 3
        assert timing.compute > 0
        assert timing.server >= timing.compute
        ranked = client.classify("digits-fnn", np.zeros((2, 64), np.float32))
        assert ranked.timing is not None
        assert ranked.timing.batch_size == 2
    with Client(running.target) as client:
        first = client.infer("digits-fnn", pixels(1)).timing
        second = client.infer("digits-fnn", pixels(1)).timing
        assert first is not None
        assert second is not None
        assert len(first.request_id) == 16
        assert first.request_id != second.request_id  # made by the server when the caller sets none
    # Failed calls carry the id too; a caller's id over 128 characters is replaced.
    with grpc.insecure_channel(running.target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        with pytest.raises(grpc.RpcError) as caught:
            infer(pb.ModelInferRequest(model_name="nope"), metadata=[("x-request-id", "x" * 129)], timeout=10)
        trailing = dict(caught.value.trailing_metadata())
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(trailing["x-request-id"]) == 16
        assert trailing["nnserve-timing"].startswith("server=")
        assert "queue" not in trailing["nnserve-timing"]  # no model ran


def test_json_logs_carry_the_request_id_and_an_access_line(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--log-format", "json", "--access-log-sample", "1")
    with Client(running.target, metadata=[("x-request-id", "trace-me")]) as client:
        client.infer("digits-fnn", pixels(2), version="1")
        with pytest.raises(NotFound):
            client.infer("who-knows", pixels(1))
    running.stop()
    lines = [line for line in running.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, the start-up banner included, is one JSON object
    assert any("nnserve listening on" in r["message"] for r in records)
    assert any(r["logger"].startswith("nnserve_server") and r["level"] == "INFO" for r in records)
    access = [r for r in records if r["logger"] == "nnserve.access"]
    assert [(r["rpc"], r["model"], r["code"]) for r in access] == [
        ("ModelInfer", "digits-fnn", "OK"),
        ("ModelInfer", "unknown", "NOT_FOUND"),
    ]
    served = access[0]
    assert served["request_id"] == "trace-me"
    assert served["version"] == "1"
    assert served["batch_size"] == 2
    assert served["duration_ms"] >= served["compute_ms"] > 0
    refused = access[1]  # a failure says why, and which name the caller asked for (folded to "unknown")
    assert refused["message"].startswith("unknown model 'who-knows'")
    assert refused["requested_model"] == "'who-knows'"


def test_the_access_log_keeps_failures_and_samples_successes(own_server: Callable[..., RunningServer]) -> None:
    running = own_server()  # defaults: successes not logged, failures logged, text format
    with Client(running.target) as client:
        for _ in range(5):
            client.infer("digits-fnn", pixels(1))
        with pytest.raises(NotFound):
            client.infer("who-knows", pixels(1))
    running.stop()
    access = [line for line in running.log().splitlines() if " nnserve.access: " in line]
    assert len(access) == 1, access
    assert "ModelInfer unknown NOT_FOUND" in access[0]
    assert "request_id=" in access[0]


@pytest.mark.fast
def test_a_callers_request_id_is_kept_only_when_usable() -> None:
    assert request_id_from((("x-request-id", "abc-123"),)) == "abc-123"
    for unusable in ("", "a\x7fb", "é", "x" * 129):
        made = request_id_from((("x-request-id", unusable),))
        assert made != unusable
        assert len(made) == 16


def test_generation_counts_tokens_and_time_to_first_token(zoo_server: RunningServer) -> None:
    model = "chars-lstm"
    labels = {"model": model, "version": "1"}

    def generation_metrics() -> tuple[float, ...]:
        text = zoo_server.metrics()
        if "nnserve_inter_token_seconds_count" not in text:  # shown once a stream was counted
            return (*(sample(text, name, **labels) for name in names[:3]), 0.0, 0.0, 0.0)
        return tuple(sample(text, name, **labels) for name in names)

    names = (
        "nnserve_generated_tokens_count", "nnserve_generated_tokens_sum", "nnserve_time_to_first_token_seconds_count",
        "nnserve_inter_token_seconds_count", "nnserve_generation_step_rows_count", "nnserve_generation_step_rows_sum",
    )  # fmt: skip
    streams, tokens, first, gaps, steps, rows = generation_metrics()
    with Client(zoo_server.target) as client:
        events = list(client.generate(model, prompt="The ", max_tokens=12, temperature=0.8, seed=3))
    done = events[-1]
    assert isinstance(done, GenerationDone)
    assert done.generated_tokens == 12
    after = generation_metrics()
    assert after[:3] == (streams + 1, tokens + done.generated_tokens, first + 1)
    # The first token comes from the prompt's call; each of the other 11 is a decoding step with a gap.
    assert after[3] == gaps + 11
    assert after[5] - rows == 11  # one stream: a row in each of its steps (alone, or beside others')
    assert after[4] - steps <= 11
