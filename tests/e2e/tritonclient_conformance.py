"""Sends every conformance case (`onnx_cases.py`) to a server with Triton's own client, as a user would.

Usage: tritonclient_conformance.py TARGET CASES RESULTS. CASES is a pickle of [(model, [(input name,
datatype, array)], [output names])] (BF16 as ml_dtypes.bfloat16, as tritonclient 2.73 takes it). RESULTS gets a
pickle of {model: ("ready", {output: array}) | ("error", status code, message) | ("unavailable",
state, reason)}. Runs in its own process: tritonclient and nnserve's stubs both define
`package inference`.
"""

from __future__ import annotations

import pickle
import sys

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(target: str, cases_path: str, results_path: str) -> None:
    with open(cases_path, "rb") as file:
        cases = pickle.load(file)
    client = triton.InferenceServerClient(url=target)
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True).get("models", [])}
    results: dict[str, tuple[object, ...]] = {}
    for model, inputs, outputs in cases:
        listed = index.get(model, {})
        if listed.get("state") != "READY":
            results[model] = ("unavailable", listed.get("state", "missing"), listed.get("reason", ""))
            continue
        sent = []
        for name, datatype, array in inputs:
            tensor = triton.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            sent.append(tensor)
        try:
            answer = client.infer(model, sent, outputs=[triton.InferRequestedOutput(name) for name in outputs])
        except InferenceServerException as error:
            results[model] = ("error", error.status(), error.message())
            continue
        results[model] = ("ready", {name: answer.as_numpy(name) for name in outputs})
    with open(results_path, "wb") as file:
        pickle.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
