"""Triton Inference Server as the benchmark's peer row, installed from PyPI into `.cache/triton`.

`nvidia-pytriton` 0.7.0 ships a real `tritonserver` 2.51 binary with the Python backend only (there
is no onnxruntime backend on PyPI), so each model is a Python-backend `model.py` that runs
onnxruntime: Triton's dynamic batcher hands `execute()` a list of requests, which it concatenates,
runs once and splits, as Triton's own onnxruntime backend would. Loopback only; its own venv, never
the project's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime==1.32.0")

MODEL_PY = """
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        y = self.session.run([self.output], {self.input: x})[0]
        responses, start = [], 0
        for part in xs:
            rows = y[start : start + part.shape[0]]
            start += part.shape[0]
            tensor = pb_utils.Tensor(self.output, np.ascontiguousarray(rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
"""

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {input_dims} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {output_dims} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def install(root: Path) -> Path:
    """The venv with tritonserver and onnxruntime (made once); returns its site-packages."""
    venv = root / "venv"
    stamp = venv / ".installed"
    if not stamp.is_file() or stamp.read_text() != " ".join(PACKAGES):
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *PACKAGES], check=True, timeout=900)
        stamp.write_text(" ".join(PACKAGES))
    (site,) = (venv / "lib").glob("python3*/site-packages")
    return site


def make_repository(models: dict[str, tuple[Path, int, list[int], list[int]]], repository: Path) -> None:
    """`models`: name -> (model.onnx, max batch, input dims, output dims), dims without the batch."""
    shutil.rmtree(repository, ignore_errors=True)
    for name, (path, max_batch, input_dims, output_dims) in models.items():
        version = repository / name / "1"
        version.mkdir(parents=True)
        shutil.copy(path, version / "model.onnx")
        (version / "model.py").write_text(MODEL_PY)
        (repository / name / "config.pbtxt").write_text(
            CONFIG.format(
                name=name,
                max_batch=max_batch,
                input_dims=", ".join(map(str, input_dims)),
                output_dims=", ".join(map(str, output_dims)),
            )
        )


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(root: Path, repository: Path, log: Path) -> Iterator[tuple[int, int]]:
    """Start tritonserver on loopback; yields (gRPC port, pid) once it is ready, stops it after."""
    site = install(root)
    dist = site / "pytriton" / "tritonserver"
    run = root / "run"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = run / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():  # the server tree as PyTriton lays it out: the stub for the venv's Python
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(dist, run)
        shutil.rmtree(run / "python_backend_stubs", ignore_errors=True)
        shutil.copy(dist / "python_backend_stubs" / python / "triton_python_backend_stub", stub)
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{site / 'nvidia_pytriton.libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "PATH": f"{root / 'venv' / 'bin'}:{os.environ['PATH']}",  # the stub's Python finds the venv
    }
    command = [
        str(run / "bin" / "tritonserver"), f"--model-repository={repository}",
        f"--backend-directory={run / 'backends'}", f"--cache-directory={run / 'caches'}",
        "--backend-config=python,shm-default-byte-size=33554432",
        "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        "--exit-timeout-secs=5", "--log-verbose=0",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited:\n{log.read_text()[-3000:]}")
            if _ready(f"http://127.0.0.1:{http_port}/v2/health/ready"):
                yield grpc_port, process.pid
                return
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver was not ready in 120 s:\n{log.read_text()[-3000:]}")
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s: the bench's servers never outlive it."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
