"""New model versions while serving: polling, explicit loads, version policies, reloads under load."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from test_health_reflection_metrics import sample

from nnserve_client import Client
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc
from nnserve_server.core.repository import KEPT
from nnserve_server.settings import VersionPolicy

PIXELS = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}


def served_version(client: Client) -> str:
    metadata = client.metadata("digits-fnn")
    return metadata.version


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def index(target: str) -> dict[tuple[str, str], tuple[str, str]]:
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def repository(model_repository: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    (repo / "digits-fnn").mkdir(parents=True)
    shutil.copytree(model_repository / "digits-fnn" / "1", repo / "digits-fnn" / "1")
    return repo


def test_polling_serves_a_new_version_and_a_corrupt_one_leaves_the_old_serving(
    own_server: Callable[..., RunningServer], repository: Path
) -> None:
    running = own_server("--poll-interval-s", "0.2", "--version-policy", "latest:1", repository=repository)
    model_dir = repository / "digits-fnn"
    with Client(running.target) as client:
        expected = client.infer("digits-fnn", PIXELS)["logits"]
        shutil.copytree(model_dir / "1", model_dir / "2")
        wait_for(lambda: served_version(client) == "2", "version 2 to be served")
        assert ("digits-fnn", "1") not in index(running.target)  # latest:1 dropped it
        np.testing.assert_allclose(client.infer("digits-fnn", PIXELS)["logits"], expected, rtol=1e-6)
        (model_dir / "3").mkdir()
        (model_dir / "3" / "model.onnx").write_bytes(b"not a model")
        wait_for(lambda: "version 3 failed to load" in running.log(), "version 3 to fail")
        assert served_version(client) == "2"
        assert client.infer("digits-fnn", PIXELS)["logits"].shape == (1, 10)
        states = index(running.target)
        assert states[("digits-fnn", "3")][0] == "UNAVAILABLE"
        assert states[("digits-fnn", "2")] == ("READY", KEPT)
        # Fixing version 3 on disk is noticed too.
        shutil.copy(model_dir / "2" / "model.onnx", model_dir / "3" / "model.onnx")
        wait_for(lambda: served_version(client) == "3", "version 3 to be served once fixed")
    assert sample(running.metrics(), "nnserve_model_load_failures_total", model="digits-fnn") == 1


def test_ten_reloads_under_load_fail_no_request_and_keep_memory_flat(
    own_server: Callable[..., RunningServer], repository: Path
) -> None:
    running = own_server("--version-policy", "latest:1", repository=repository)
    model_dir = repository / "digits-fnn"
    failures: list[BaseException] = []
    served = [0]
    done = threading.Event()

    def steady_load() -> None:
        with Client(running.target, retries=0) as client:
            while not done.is_set():
                try:
                    client.infer("digits-fnn", PIXELS)
                    served[0] += 1
                except Exception as error:
                    failures.append(error)

    def reload(version: int) -> None:
        shutil.copytree(model_dir / "1", model_dir / str(version))
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits-fnn"), timeout=60)

    workers = [threading.Thread(target=steady_load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        reload(2)  # the first reload warms up whatever a reload allocates once
        time.sleep(1)
        before = rss_bytes(running.process.pid)
        with Client(running.target) as client:
            for version in range(3, 13):
                reload(version)
                assert served_version(client) == str(version)
                shutil.rmtree(model_dir / str(version - 1))
        time.sleep(1)
        after = rss_bytes(running.process.pid)
    finally:
        done.set()
        for worker in workers:
            worker.join(30)
    assert not failures, failures[:3]
    assert served[0] > 100
    print(f"RSS {before / 2**20:.1f} MiB before the ten reloads, {after / 2**20:.1f} MiB after; {served[0]} served")
    assert after <= before * 1.10, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"


@pytest.mark.fast
def test_version_policies() -> None:
    versions = ["1", "2", "10"]
    assert VersionPolicy.parse("all").choose(versions) == versions
    assert VersionPolicy.parse("latest:2").choose(versions) == ["2", "10"]
    assert VersionPolicy.parse("specific:1,10").choose(versions) == ["1", "10"]
    for bad in ("latest:0", "latest", "newest:1", "specific:", "specific:,"):
        with pytest.raises(ValueError, match="version policy"):
            VersionPolicy.parse(bad)
