"""Shared fixtures: real exported models, and real servers started as processes on port 0."""

from __future__ import annotations

import importlib.abc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnserve_server.edge import listening

ROOT = Path(__file__).resolve().parent.parent
# KServe datatype -> (ONNX element type, numpy dtype) for the echo model.
ECHO_TYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def _fast_tier_only(config: pytest.Config) -> bool:
    return bool(config.getoption("markexpr") == "fast")


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, *args: object) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the fast tier imports no torch: take the fast mark off the test that needs it")


def pytest_configure(config: pytest.Config) -> None:
    if _fast_tier_only(config):  # make test-fast: torch cannot be imported at all
        sys.meta_path.insert(0, _NoTorch())


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """make test-fast imports only the modules that hold fast tests (the others may import torch)."""
    if _fast_tier_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "pytest.mark.fast" not in collection_path.read_text()
    return None


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of the fast tier that starts a process fails, saying so."""
    if request.node.get_closest_marker("fast") is None:
        return

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a fast-tier test starts no process: {args[1:2]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refused)


class RunningServer:
    """An `nnserve serve` process; its log is kept so a failing test can show it."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, port: int, metrics_port: int | None):
        self.process = process
        self.log_path = log_path
        self.port = port
        self.metrics_port = metrics_port
        self.target = f"127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        assert self.metrics_port is not None, "metrics endpoint is off"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(
    repository: Path, *flags: str, env: dict[str, str] | None = None, within_s: float = 60
) -> RunningServer:
    command = [
        sys.executable, "-m", "nnserve_server.process.cli", "serve",
        "--model-repository", str(repository), "--port", "0", "--metrics-port", "0", *flags,
    ]  # fmt: skip
    return start_command(command, env, within_s)


def start_command(command: list[str], env: dict[str, str] | None = None, within_s: float = 60) -> RunningServer:
    """Any command that ends up serving (a server, or the zoo builder that starts one): its output in a log."""
    log_path = Path(tempfile.mkstemp(prefix="nnserve-", suffix=".log")[1])
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        said = listening.find(log_path.read_text(errors="replace"))
        if said is not None:
            return RunningServer(process, log_path, said.port, said.metrics_port)
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start within {within_s:.0f} s:\n{log_path.read_text()}")


def echo_model(path: Path, datatypes: Iterable[str] = ECHO_TYPES) -> None:
    """A plain ONNX model (no nnserve metadata): out_<T> = in_<T> for each KServe datatype given."""
    nodes, inputs, outputs = [], [], []
    for datatype in datatypes:
        elem = ECHO_TYPES[datatype][0]
        inputs.append(helper.make_tensor_value_info(f"in_{datatype}", elem, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{datatype}", elem, ["batch", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{datatype}"], [f"out_{datatype}"]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def slow_model(path: Path, width: int = 1024, layers: int = 24) -> None:
    """y = tanh(x W) applied `layers` times with one shared weight: slow enough to be in flight."""
    weight = numpy_helper.from_array(
        (np.random.default_rng(0).standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"
    )
    nodes, current = [], "x"
    for layer in range(layers):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"m{layer}"]))
        current = f"t{layer}" if layer < layers - 1 else "y"
        nodes.append(helper.make_node("Tanh", [f"m{layer}"], [current]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[weight],
    )
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def fnn_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits FNN, fully trained and exported by the zoo, as a one-model repository."""
    from nnserve_exporters.zoo import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "models"
    build_zoo(out, only=["fnn"])
    return out


@pytest.fixture(scope="session")
def model_repository(fnn_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FNN plus the plain ONNX test models, with two versions of the FNN."""
    repo = tmp_path_factory.mktemp("repo") / "models"
    shutil.copytree(fnn_repository, repo)
    shutil.copytree(repo / "digits-fnn" / "1", repo / "digits-fnn" / "2")
    echo_model(repo / "echo" / "1" / "model.onnx")
    # FP16 travels only as raw contents, so the typed-contents twin leaves it out.
    echo_model(repo / "echo-typed" / "1" / "model.onnx", [t for t in ECHO_TYPES if t != "FP16"])
    slow_model(repo / "slow" / "1" / "model.onnx")
    return repo


# Shared memory as the tests' clients name it: multiprocessing's objects (psm_*), tritonclient's (nnserve_*)
# and docs/protocol.md's (my_*).
SHARED_MEMORY = ("--shared-memory", "--shared-memory-keys", "psm_*,nnserve_*,my_*")


@pytest.fixture(scope="session")
def server(model_repository: Path) -> Iterator[RunningServer]:
    """One server shared by the tests that do not change its state."""
    running = start_server(model_repository, *SHARED_MEMORY)
    yield running
    running.stop()


@pytest.fixture
def own_server(model_repository: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers private to one test (for tests that unload models or stop the server)."""
    started: list[RunningServer] = []

    def start(*flags: str, repository: Path | None = None, env: dict[str, str] | None = None) -> RunningServer:
        running = start_server(repository or model_repository, *flags, env=env)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def fast_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[object]]:
    """Every family in --fast mode: tiny models, real code paths."""
    from nnserve_exporters.zoo import build_zoo

    out = tmp_path_factory.mktemp("fast-zoo") / "models"
    return out, list(build_zoo(out, fast=True))


@pytest.fixture(scope="session")
def zoo_server(fast_zoo: tuple[Path, list[object]]) -> Iterator[RunningServer]:
    running = start_server(
        fast_zoo[0], "--max-image-pixels", "10000", "--max-tokens", "500", "--max-text-chars", "300", *SHARED_MEMORY
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def digits_holdout() -> tuple[np.ndarray, np.ndarray]:
    from nnserve_exporters import datasets

    split = datasets.digits()
    return split.x_test, split.y_test


# tritonclient and grpcurl live in a venv of their own (make test creates it): tritonclient needs a newer
# grpcio than the server's pin.
PEERS = ROOT / ".cache" / "venv-peer-clients" / "bin"
TRITONCLIENT_PYTHON = PEERS / "python"
GRPCURL = PEERS / "grpcurl"


def run_python(
    script: Path, *args: str, timeout: float = 120, python: Path | str = sys.executable
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_tritonclient(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`script` in tritonclient's venv (a script that imports tritonclient, never our stubs)."""
    assert TRITONCLIENT_PYTHON.exists(), (
        "the peer clients' venv is missing: run `make test` (it makes .cache/venv-peer-clients)"
    )
    return run_python(script, *args, timeout=timeout, python=TRITONCLIENT_PYTHON)
