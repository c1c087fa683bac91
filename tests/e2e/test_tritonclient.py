"""Triton's own client (`tritonclient[grpc]`) works against nnserve unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import RunningServer, run_tritonclient

from nnserve_client import Client

CHECKS = Path(__file__).with_name("tritonclient_checks.py")


def test_tritonclient_end_to_end(server: RunningServer) -> None:
    done = run_tritonclient(CHECKS, server.target)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] is True
    assert seen["ready"] is True
    assert seen["model_ready"] is True
    assert "statistics" in seen["server_extensions"]
    assert seen["metadata"]["versions"] == ["1", "2"]
    assert seen["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert seen["metadata"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert seen["config"] == {
        "max_batch_size": 256,
        "input": [["input", "TYPE_FP32", ["64"]]],
        "output": [["logits", "TYPE_FP32", ["10"]]],
    }
    assert seen["raw"] == {"shape": [3, 10], "id": "t-1"}
    assert seen["typed_equals_raw"] is True
    assert seen["stats_inference_count"] >= 6
    assert ["digits-fnn", "2", "READY"] in seen["index"]
    assert seen["unknown_model_status"] == "StatusCode.NOT_FOUND"
    assert "classification" in seen["server_extensions"]
    # class_count=3: each row's three highest logits, as Triton writes them, with the model's labels.
    logits = np.array(seen["raw_logits"], dtype=np.float32)
    for row, classes in zip(logits, seen["classes"], strict=True):
        top = np.argsort(-row)[:3]
        assert classes == [f"{row[i]:f}:{i}:{i}" for i in top]  # digits-fnn's labels are "0".."9"

    # The same numbers as our own SDK gives for the same input.
    x = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17) / 16
    with Client(server.target) as client:
        ours = client.infer("digits-fnn", {"input": x})["logits"]
    assert ours.argmax(axis=1).tolist() == seen["argmax"]


def test_tritonclient_shared_memory_workflow(server: RunningServer) -> None:
    done = run_tritonclient(CHECKS.with_name("tritonclient_shm_checks.py"), server.target)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert "system_shared_memory" in seen["server_extensions"]
    assert seen["status"] == [["tc-input", "/nnserve_tc_input", 768], ["tc-output", "/nnserve_tc_output", 120]]
    assert seen["shape"] == [3, 10]
    assert seen["shm_equals_plain"] is True
    assert seen["twice"][0] == "StatusCode.ALREADY_EXISTS"
    assert "already registered" in seen["twice"][1]
    assert seen["too_small"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "needs 120 bytes" in seen["too_small"][1]
    assert seen["after_unregister"] == ["tc-output"]


def test_tritonclient_streams_requests_and_a_language_model(zoo_server: RunningServer) -> None:
    done = run_tritonclient(CHECKS.with_name("tritonclient_stream_checks.py"), zoo_server.target)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["sync_ids"] == ["s1", "s2", "s3"]
    assert seen["sync_logits_equal"] is True
    assert len(seen["sync_errors"]) == 1
    assert "unknown model 'no-such-model'" in seen["sync_errors"][0]
    assert seen["aio_ids"] == ["a1", "a2"]
    # Streamed: 8 tokens, one piece each (no stop strings), only the last flagged final; the pieces
    # make the text the unary call gives at once (greedy, so the same).
    assert len(seen["llm_pieces"]) == 8
    assert seen["llm_finals"] == [False] * 7 + [True]
    assert "".join(seen["llm_pieces"]) == seen["llm_whole"]
    # enable_empty_final_response: the pieces, then an empty response that only says "final".
    assert seen["llm-empty_pieces"][:-1] == seen["llm_pieces"]
    assert seen["llm-empty_pieces"][-1] is None
    assert seen["llm-empty_finals"] == [False] * 8 + [True]
    # ModelMetadata and ModelConfig describe the LLM view of both LMs, decoupled; a plain model is not.
    for lm in ("chars-lstm", "chars-transformer"):
        metadata, config = seen[f"{lm}_metadata"], seen[f"{lm}_config"]
        assert metadata["inputs"][0] == ["text_input", "BYTES"]
        assert {"max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "stop"} == set(config["optional"])
        assert metadata["outputs"] == [["text_output", "BYTES"]]
        assert config == {"decoupled": True, "optional": config["optional"], "outputs": ["text_output"]}
    assert seen["digits-fnn_config"]["decoupled"] is False
    assert seen["digits-fnn_metadata"]["outputs"] == [["logits", "FP32"]]
