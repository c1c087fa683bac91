"""The Node.js and Go examples of docs/other-languages.md, run against a real server.

Each example calls ModelInfer (KServe v2, raw tensors), Classify (typed values in natural units) and a
streamed Generate with a seed, and prints JSON; the answers must equal the Python SDK's. The Node one
runs on @grpc/grpc-js and @grpc/proto-loader from npm (`make test` installs them under .cache/); the Go
one is generated with protoc, protoc-gen-go and protoc-gen-go-grpc and built with Debian's Go and gRPC
packages (.ci/run installs them). Without those tools the tests fail in CI and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RunningServer

from nnserve_client import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
NODE_MODULES = ROOT / ".cache" / "node-client" / "node_modules"
GO_PATH = "/usr/share/gocode"  # Debian's Go sources: golang-google-grpc-dev and what it needs
PROTOS = ["kserve/v2/model_config.proto", "kserve/v2/grpc_predict_v2.proto", "nnserve/v1/tasks.proto"]
PIXELS = (np.arange(64) % 16 / 16).astype(np.float32).reshape(1, 64)


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"missing {', '.join(missing)} (apt-get install protobuf-compiler protoc-gen-go protoc-gen-go-grpc "
        message += "golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _expected(target: str) -> dict[str, Any]:
    with Client(target) as client:
        logits = client.infer("digits-fnn", {"input": PIXELS})["logits"]
        top = client.classify("digits-fnn", PIXELS * 16, top_k=3)[0]
        text = client.generate_text("chars-lstm", "ab", max_tokens=12, seed=5)
    return {"logits": logits[0], "labels": [s.label for s in top.top], "text": text}


def _compare(printed: str, expected: dict[str, Any]) -> None:
    answer = json.loads(printed)
    assert answer["infer"]["shape"] in ([1, 10], ["1", "10"])
    np.testing.assert_allclose(np.array(answer["infer"]["logits"], np.float32), expected["logits"], rtol=1e-5)
    assert [s["label"] for s in answer["classify"]] == expected["labels"]
    assert answer["text"] == expected["text"]
    assert len(answer["text"]) == 12


def test_the_node_example_calls_modelinfer_classify_and_generate(zoo_server: RunningServer) -> None:
    _need("node")
    if not NODE_MODULES.is_dir():
        pytest.fail(f"{NODE_MODULES} is missing: make test installs the Node client")
    done = subprocess.run(
        ["node", str(EXAMPLES / "node" / "client.js"), zoo_server.target, str(ROOT / "protos")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    assert done.returncode == 0, done.stderr
    _compare(done.stdout, _expected(zoo_server.target))


def test_the_go_example_builds_from_the_protos_and_calls_the_server(zoo_server: RunningServer, tmp_path: Path) -> None:
    _need("protoc", "protoc-gen-go", "protoc-gen-go-grpc", "go")
    if not Path(GO_PATH, "src", "google.golang.org", "grpc").is_dir():
        _need("golang-google-grpc-dev")  # a package, not a tool: fails in CI, skips elsewhere
    generated = tmp_path / "src" / "nnserve.dev" / "gen" / "go"
    generated.mkdir(parents=True)
    module = "module=nnserve.dev/gen/go"
    subprocess.run(
        ["protoc", f"-I{ROOT / 'protos'}", f"--go_out={generated}", f"--go_opt={module}",
         f"--go-grpc_out={generated}", f"--go-grpc_opt={module}", *PROTOS],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    example = tmp_path / "src" / "example"
    example.mkdir()
    shutil.copy(EXAMPLES / "go" / "main.go", example)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{tmp_path}:{GO_PATH}", "GOCACHE": str(tmp_path / "cache")}
    built = subprocess.run(
        ["go", "build", "-o", str(tmp_path / "client"), "example"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    done = subprocess.run([str(tmp_path / "client"), zoo_server.target], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    _compare(done.stdout, _expected(zoo_server.target))
