"""Any ONNX model, served as Triton serves it: the onnx package's node test graphs through tritonclient.

Every graph that raw onnxruntime runs correctly (`onnx_cases.py`) goes into a repository, the repository is
served, and Triton's own client sends each graph its inputs as the graph declares them. Each must be served
with raw onnxruntime's outputs (within onnx's tolerances), or refused at load with a reason that names the
tensor whose type KServe v2 cannot carry. With first dimensions freed and no config, Triton's batching rule
applies, and the only other answer allowed is INVALID_ARGUMENT naming the inputs whose first dimensions
disagree or fall outside 1..max_batch_size. Never INTERNAL, never a wrong answer.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import onnx_cases
import pytest
from conftest import run_tritonclient, start_server

SCRIPT = Path(__file__).with_name("tritonclient_conformance.py")
_CARRIES_NONE = re.compile(r"(input|output) '([^']*)' is (\S+), which no KServe v2 datatype carries")


def _wire(value: np.ndarray, datatype: str) -> np.ndarray:
    """As tritonclient takes it: BYTES as bytes objects (BF16 as ml_dtypes.bfloat16, as it is)."""
    if datatype == "BYTES":
        return np.array([onnx_cases._text(v) for v in value.reshape(-1)], dtype=object).reshape(value.shape)
    return value


def _judge(case: onnx_cases.Case, result: tuple[object, ...], variant: str) -> str:
    """'served', 'refused at load', 'refused by the batching rule', or what went wrong."""
    if not case.servable:
        if result[0] == "unavailable" and _CARRIES_NONE.search(str(result[2])):
            return "refused at load"
        return f"wrong: {case.types} has no KServe datatype, yet {result}"
    if result[0] == "unavailable":
        return f"wrong: not loaded: {result[1:]}"
    if result[0] == "error":
        _, code, message = result
        batching = "disagree on the batch size" in str(message) or "is outside 1.." in str(message)
        if variant == "freed" and code == "StatusCode.INVALID_ARGUMENT" and batching:
            return "refused by the batching rule"
        return f"wrong: {code}: {message}"
    answered = result[1]
    assert isinstance(answered, dict)
    for name, expected in case.outputs.items():
        if not onnx_cases.similar(expected, answered[name], case.rtol, case.atol):
            return f"wrong: output {name} {answered[name]!r} where raw onnxruntime gives {expected!r}"
    return "served"


@pytest.mark.slow
@pytest.mark.parametrize("variant", onnx_cases.VARIANTS)
def test_every_onnx_graph_served_as_onnxruntime_runs_it_or_refused_at_load(
    variant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    cases, left_out = onnx_cases.build(repository, variant)
    assert len(cases) > 1500, left_out  # the onnx package's node tests: about 1,630 run right on onnxruntime
    sent = [(c.model, [(n, t, _wire(v, t)) for n, t, v in c.inputs], list(c.outputs)) for c in cases]
    (tmp_path / "cases.pickle").write_bytes(pickle.dumps(sent))
    server = start_server(repository, "--metrics-port", "-1", within_s=600)
    try:
        done = run_tritonclient(
            SCRIPT, server.target, str(tmp_path / "cases.pickle"), str(tmp_path / "results.pickle"), timeout=600
        )
        assert done.returncode == 0, done.stderr
        results = pickle.loads((tmp_path / "results.pickle").read_bytes())
    finally:
        server.stop()
    verdicts: dict[str, list[str]] = {}
    for case in cases:
        verdicts.setdefault(_judge(case, results[case.model], variant), []).append(case.model)
    counts = {verdict: len(models) for verdict, models in verdicts.items() if not verdict.startswith("wrong")}
    wrong = {model: verdict for verdict, models in verdicts.items() if verdict.startswith("wrong") for model in models}
    with capsys.disabled():
        print(f"\nONNX conformance ({variant}): {len(cases)} graphs raw onnxruntime runs right; {counts}; "
              f"wrong {len(wrong)}; left out {left_out}")  # fmt: skip
    assert not wrong, dict(list(wrong.items())[:10])
    assert counts.get("served", 0) > (1000 if variant == "freed" else 1400)
    if variant != "freed":  # shapes as declared: nothing refused but types
        assert "refused by the batching rule" not in counts
