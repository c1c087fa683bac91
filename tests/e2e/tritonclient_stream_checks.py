"""Triton's own stream APIs against an nnserve server (the zoo): prints one JSON object of what it saw.

Sync `start_stream` / `async_stream_infer`, the aio `stream_infer`, and a language model streamed in
Triton's LLM convention (text_input, max_tokens, stream; responses flagged triton_final_response).
Runs in tritonclient's own venv.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

PIXELS = (np.arange(64, dtype=np.float32).reshape(1, 64) % 17) / 16


def _pixels() -> list[triton.InferInput]:
    x = triton.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(PIXELS)
    return [x]


def _llm(prompt: str, stream: bool, empty_final: bool = False) -> list[triton.InferInput]:
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tokens = triton.InferInput("max_tokens", [1], "INT32")
    tokens.set_data_from_numpy(np.array([8], dtype=np.int32))
    streamed = triton.InferInput("stream", [1], "BOOL")
    streamed.set_data_from_numpy(np.array([stream]))
    temperature = triton.InferInput("temperature", [1], "FP32")
    temperature.set_data_from_numpy(np.array([0.0], dtype=np.float32))
    return [text, tokens, streamed, temperature]


def _sync(target: str, seen: dict[str, object]) -> None:
    client = triton.InferenceServerClient(url=target)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for request_id in ("s1", "s2", "s3"):
        client.async_stream_infer("digits-fnn", _pixels(), request_id=request_id)
    client.async_stream_infer("no-such-model", _pixels(), request_id="bad")
    got = [answers.get(timeout=30) for _ in range(4)]
    ids = sorted(r.get_response().id for r, e in got if e is None)
    errors = [str(e) for r, e in got if e is not None]
    logits = [r.as_numpy("logits").tolist() for r, e in got if e is None]
    seen["sync_ids"], seen["sync_errors"], seen["sync_logits_equal"] = ids, errors, all(x == logits[0] for x in logits)

    # A language model, streamed: one response per piece, the last flagged final.
    for request_id, empty in (("llm", False), ("llm-empty", True)):
        # tritonclient's own flag (it sends Triton's triton_enable_empty_final_response)
        client.async_stream_infer(
            "chars-lstm", _llm("The ", True), request_id=request_id, enable_empty_final_response=empty
        )
        pieces, finals = [], []
        while True:
            result, error = answers.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            pieces.append(text[0].decode() if text is not None else None)
            finals.append(final)
            if final:
                break
        seen[f"{request_id}_pieces"], seen[f"{request_id}_finals"] = pieces, finals
    client.stop_stream()
    whole = client.infer("chars-lstm", _llm("The ", False)).as_numpy("text_output")[0].decode()
    seen["llm_whole"] = whole
    # What a client reads before it streams: the LLM view, and that the model answers decoupled.
    for model in ("chars-lstm", "chars-transformer", "digits-fnn"):
        meta = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True)["config"]
        seen[f"{model}_metadata"] = {
            "inputs": [[t["name"], t["datatype"]] for t in meta["inputs"]],
            "outputs": [[t["name"], t["datatype"]] for t in meta["outputs"]],
        }
        seen[f"{model}_config"] = {
            "decoupled": config.get("model_transaction_policy", {}).get("decoupled", False),
            "optional": sorted(i["name"] for i in config["input"] if i.get("optional")),
            "outputs": [o["name"] for o in config["output"]],
        }
    client.close()


async def _aio(target: str, seen: dict[str, object]) -> None:
    client = triton_aio.InferenceServerClient(url=target)

    async def requests():  # type: ignore[no-untyped-def]
        for request_id in ("a1", "a2"):
            yield {"model_name": "digits-fnn", "inputs": _pixels(), "request_id": request_id}

    ids = []
    async for result, error in client.stream_infer(inputs_iterator=requests()):
        assert error is None, error
        ids.append(result.get_response().id)
    seen["aio_ids"] = sorted(ids)
    await client.close()


if __name__ == "__main__":
    found: dict[str, object] = {}
    _sync(sys.argv[1], found)
    asyncio.run(_aio(sys.argv[1], found))
    print(json.dumps(found))
