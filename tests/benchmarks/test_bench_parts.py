"""The benchmark's baseline must be honest: the bare server answers what a real model would, in size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from benchmarks import bare_server, load, models
from benchmarks.run import PINNED, ROOT, write_input_data
from benchmarks.targets import BARE, NATIVE, SHM_CLIENT, TRITON, targets
from nnserve_contract import codec
from nnserve_contract.model_spec import ModelSpec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_exporters import api
from nnserve_server.edge import listening


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("bench") / "models"
    api.export(
        models.mlp().eval(),
        torch.rand(2, 64),
        ModelSpec(
            task="classify",
            labels=tuple(str(i) for i in range(10)),
        ),
        out=repo / models.MLP / "1" / "model.onnx",
        output_names=("logits",),
    )
    return repo


def test_perf_analyzer_is_given_the_values_raw_onnxruntime_runs(mlp_repository: Path, tmp_path: Path) -> None:
    """Not its own random bytes (NaNs, denormals, |x| up to 3.4e38), which models run slower on."""
    import onnxruntime as ort

    path = mlp_repository / models.MLP / "1" / "model.onnx"
    write_input_data(path, tmp_path / "data")
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    written = np.frombuffer((tmp_path / "data" / "input").read_bytes(), np.float32)
    assert [f.name for f in (tmp_path / "data").iterdir()] == ["input"]
    np.testing.assert_array_equal(written, load.example_inputs(inputs)["input"].ravel())
    assert written.size == 64
    assert written.min() >= 0
    assert written.max() < 1


@pytest.mark.parametrize("flags", [[], ["--run-model"], ["--sync", "2"]])
def test_the_bare_server_answers_with_the_sizes_a_real_model_returns(mlp_repository: Path, flags: list[str]) -> None:
    command = [sys.executable, "-m", "benchmarks.bare_server", "--model-repository", str(mlp_repository), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        said = listening.find(process.stdout.readline())
        assert said is not None, "the bare server did not say where it listens"
        with grpc.insecure_channel(f"127.0.0.1:{said.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name=models.MLP), timeout=10).config
            assert list(config.input[0].dims) == [64]
            request = pb.ModelInferRequest(model_name=models.MLP)
            request.inputs.add(name="input", datatype="FP32", shape=[3, 64])
            request.raw_input_contents.append(np.zeros((3, 64), np.float32).tobytes())
            response = stub.ModelInfer(request, timeout=10)
        assert list(response.outputs[0].shape) == [3, 10]
        logits = codec.from_raw(response.raw_output_contents[0], "FP32", [3, 10])
        assert logits.shape == (3, 10)  # 120 bytes, what the MLP itself returns for 3 rows
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_the_run_only_server_runs_the_model_and_the_bare_one_does_not(mlp_repository: Path) -> None:
    ran = bare_server.load(mlp_repository, run=True)[models.MLP]
    assert ran.session is not None
    (logits,) = ran.session.run(ran.output_names, ran.feed)
    assert logits.shape == (1, 10)
    assert bare_server.load(mlp_repository)[models.MLP].session is None


def test_the_raw_load_generator_reports_throughput_and_its_own_cpu(mlp_repository: Path) -> None:
    path = mlp_repository / models.MLP / "1" / "model.onnx"
    command = [sys.executable, "-m", "benchmarks.load", "raw", "--model-path", str(path), "--seconds", "0.3"]
    started = time.perf_counter()
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert result["requests"] > 10
    assert result["throughput"] > 0
    assert result["errors"] == {}
    assert 0 < result["cpu_s"] < time.perf_counter() - started + 5


def test_targets_are_judged_from_ratios_of_the_same_run() -> None:
    def cell(
        system: str, concurrency: int, throughput: float, p50: float, server_us: float = float("nan"), errors: int = 0
    ) -> dict[str, object]:
        return {"model": models.MLP, "system": system, "client": "perf_analyzer", "concurrency": concurrency,
                "throughput": throughput, "p50_ms": p50, "p99_ms": 2 * p50, "server_us": server_us,
                "stack": NATIVE if system != TRITON else "C++ front end", "errors": errors}  # fmt: skip

    results = {
        "cells": [
            cell(TRITON, 32, 1000.0, 5.0),
            cell(f"{TRITON} (again)", 32, 1200.0, 5.0),
            cell("nnserve", 32, 1500.0, 5.0, server_us=100.0),
            cell("nnserve (again)", 32, 1800.0, 5.0, server_us=120.0),
            {**cell("nnserve", 32, 9000.0, 1.0, server_us=10.0), "stack": PINNED},  # another transport: not read
            cell(BARE, 32, 9000.0, 1.0, server_us=50.0),
            cell(f"{BARE} (again)", 32, 9000.0, 1.0, server_us=70.0),
            cell(TRITON, 1, 2000.0, 0.40),
            cell("nnserve", 1, 2500.0, 0.36),
            cell("nnserve no batching", 32, 2500.0, 0.36, errors=1),
            cell(f"{TRITON} (again)", 1, 2000.0, 0.40, errors=2),
            {**cell("raw onnxruntime", 1, 40.0, 50.0), "model": models.RESNET, "client": "in-process"},
            {**cell("nnserve", 4, 37.0, 110.0), "model": models.RESNET},
            {**cell("nnserve (again)", 4, 39.0, 105.0), "model": models.RESNET},
            {**cell("nnserve", 4, 38.4, 105.0), "model": models.RESNET, "client": SHM_CLIENT},
        ],
        "generation": {},
    }
    verdicts = {name: (met, value) for name, met, value in targets(results)}
    rate = verdicts["MLP c=32, one server process: >= 1.5x Triton's inferences/s"]
    assert rate == (True, "1.50x (1650 vs 1100/s, mean of two runs each)")
    assert verdicts["MLP c=1 p50 <= 0.85x Triton's"][0] is False  # 0.90x
    cpu = verdicts["MLP c=32 server CPU per inference <= 2x the bare native server's"]
    assert cpu == (True, "1.83x (110 vs 60 us, mean of two runs each)")
    assert verdicts["no cell of ours with errors"] == (False, "nnserve no batching c=32")  # Triton's are its own
    resnet = verdicts["ResNet-18 c=4 >= 0.95x raw onnxruntime's best"]
    assert resnet == (True, "0.95x (38.0 vs 40.0/s, mean of 2 runs)")
    shared = "ResNet-18 c=4 through shared memory >= 0.95x raw onnxruntime's best"
    assert verdicts[shared] == (True, "0.96x (nnserve)")


def test_close_targets_are_judged_from_the_median_of_interleaved_pairs() -> None:
    """Where the run has pairs (nnserve's cell and its reference's back to back, in rounds), the close
    targets read the median ratio of the rounds, not the mean of cells measured minutes apart."""

    def cell(system: str, concurrency: int, throughput: float, pair: int, **extra: object) -> dict[str, object]:
        return {"model": models.MLP, "system": system, "client": "perf_analyzer", "concurrency": concurrency,
                "throughput": throughput, "p50_ms": 1.0, "p99_ms": 2.0, "server_us": 50.0, "stack": NATIVE,
                "errors": 0, "pair": pair, **extra}  # fmt: skip

    resnet = {"model": models.RESNET}
    cells = [
        cell("nnserve", 32, 1000.0, 0),  # unpaired: 1000 vs 2000 would say 0.5x
        cell(TRITON, 32, 2000.0, 0),
        *(cell("nnserve", 32, rate, pair) for pair, rate in ((1, 1600.0), (2, 1400.0), (3, 2000.0))),
        *(cell(TRITON, 32, 1000.0, pair) for pair in (1, 2, 3)),  # ratios 1.6, 1.4, 2.0: median 1.6
        *(cell("nnserve", 4, rate, pair, **resnet) for pair, rate in ((1, 90.0), (2, 99.0), (3, 80.0))),
        *(cell("raw onnxruntime", 2, 100.0, pair, client="in-process", **resnet) for pair in (1, 2, 3)),
    ]
    verdicts = {name: (met, value) for name, met, value in targets({"cells": cells, "generation": {}})}
    rate = verdicts["MLP c=32, one server process: >= 1.5x Triton's inferences/s"]
    assert rate == (True, "1.60x (median of 3 interleaved pairs, 1.40-2.00)")
    resnet_verdict = verdicts["ResNet-18 c=4 >= 0.95x raw onnxruntime's best"]
    assert resnet_verdict == (False, "0.90x (median of 3 interleaved pairs, 0.80-0.99)")


def test_stream_targets_are_judged_from_interleaved_pairs() -> None:
    """The 16-stream targets read the pairs measured side by side, not the lone stream's own cell
    (run seconds apart, so a slow moment of the machine there would pass or fail them)."""

    def streams(count: int, tokens_per_s: float, gap_ms: float, **extra: object) -> dict[str, object]:
        return {"model": "chars-lstm", "step_batching": True, "streams": count, "tokens_per_s": tokens_per_s,
                "inter_token_p50_ms": gap_ms, "first_token_p99_ms": 50.0, "errors": {}, **extra}  # fmt: skip

    pairs = [
        {"tokens_per_s": 6.4, "inter_token_p50": 2.2},
        {"tokens_per_s": 5.2, "inter_token_p50": 2.9},
        {"tokens_per_s": 6.1, "inter_token_p50": 2.4},
    ]
    # Alone, the separate cells would say 16 / 2 = 8x and 0.5 / 0.3 = 1.7x.
    results = {"cells": [], "generation": {}, "streams": [streams(1, 2.0, 0.3), streams(16, 16.0, 0.5, pairs=pairs)]}
    verdicts = {name: (met, value) for name, met, value in targets(results)}
    assert verdicts["chars-lstm: 16 streams >= 6x one stream's tokens/s"] == (
        True,
        "6.10x (median of 3 interleaved pairs, 5.20-6.40)",
    )
    gap = verdicts["chars-lstm: 16 streams, gap between tokens p50 <= 2.5x one stream's"]
    assert gap == (True, "2.40x (median of 3 interleaved pairs, 2.20-2.90)")
