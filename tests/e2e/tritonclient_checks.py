"""Calls an nnserve server with Triton's own client; prints one JSON object of what it saw.

Runs in its own process: tritonclient and nnserve's stubs both define `package inference`, and one
protobuf descriptor pool cannot hold both.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc


def main(target: str) -> dict[str, object]:
    client = triton.InferenceServerClient(url=target)
    seen: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits-fnn"),
        "server_extensions": list(client.get_server_metadata(as_json=True)["extensions"]),
    }
    meta = client.get_model_metadata("digits-fnn", as_json=True)
    seen["metadata"] = {"inputs": meta["inputs"], "outputs": meta["outputs"], "versions": meta["versions"]}
    config = client.get_model_config("digits-fnn", as_json=True)["config"]
    seen["config"] = {
        "max_batch_size": config.get("max_batch_size"),
        "input": [(i["name"], i["data_type"], i["dims"]) for i in config["input"]],
        "output": [(o["name"], o["data_type"], o["dims"]) for o in config["output"]],
    }

    x = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17) / 16
    raw_input = triton.InferInput("input", [3, 64], "FP32")
    raw_input.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer("digits-fnn", [raw_input], outputs=[triton.InferRequestedOutput("logits")], request_id="t-1")
    raw_logits = result.as_numpy("logits")
    seen["raw"] = {"shape": list(raw_logits.shape), "id": result.get_response().id}

    # The classification extension: top-3 "value:index:label" strings per row.
    top = client.infer("digits-fnn", [raw_input], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    seen["classes"] = [[item.decode() for item in row] for row in top.as_numpy("logits").tolist()]
    seen["raw_logits"] = raw_logits.tolist()

    # Typed contents: tritonclient always sends raw bytes, so build the request with its own protos.
    request = service_pb2.ModelInferRequest(model_name="digits-fnn")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)
    typed = stub.ModelInfer(request)
    typed_logits = np.frombuffer(typed.raw_output_contents[0], dtype=np.float32).reshape(3, 10)
    seen["typed_equals_raw"] = bool(np.array_equal(typed_logits, raw_logits))
    seen["argmax"] = raw_logits.argmax(axis=1).tolist()

    stats = client.get_inference_statistics("digits-fnn", as_json=True)["model_stats"]
    seen["stats_inference_count"] = sum(int(s.get("inference_count", 0)) for s in stats)
    index = client.get_model_repository_index(as_json=True)["models"]
    seen["index"] = sorted((m["name"], m.get("version", ""), m.get("state", "")) for m in index)
    try:
        client.infer("no-such-model", [raw_input])
    except triton.InferenceServerException as error:
        seen["unknown_model_status"] = error.status()
    client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
