"""The SDK, sync and async, against a real server with the trained digits FNN."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import RunningServer

import nnserve_client
from nnserve_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
    tls_credentials,
)


@pytest.mark.fast
def test_public_surface_is_pinned() -> None:
    assert sorted(nnserve_client.__all__) == [
        "AsyncClient", "Cancelled", "Classification", "Classifications", "Client", "DeadlineExceeded", "Embeddings",
        "FailedPrecondition", "GenerateEvent", "GeneratedImage", "GenerationDone", "InferResult", "InvalidArgument",
        "LabelScore", "ModelInfo", "NNServeError", "NotFound", "PermissionDenied", "ResourceExhausted",
        "Segmentation", "ServerError", "ServerInfo", "ServerTiming", "TaskInput", "TensorSpec", "TextPiece",
        "Unauthenticated", "Unavailable", "Unimplemented", "tls_credentials",
    ]  # fmt: skip


def test_health_and_listing(server: RunningServer) -> None:
    with Client(server.target) as client:
        assert client.live() is True
        assert client.ready() is True
        assert client.model_ready("digits-fnn") is True
        assert client.model_ready("no-such-model") is False
        info = client.server_info()
        assert info.name == "nnserve"
        assert "statistics" in info.extensions
        names = {m.name: m for m in client.models()}
        assert set(names) == {"digits-fnn", "echo", "echo-typed", "slow"}
        fnn = names["digits-fnn"]
        assert (fnn.task, fnn.family, fnn.labels) == ("classify", "fnn", tuple("0123456789"))
        assert fnn.versions == ("1", "2")
        assert fnn.quality["accuracy"] >= 0.96
        assert names["echo"].task == ""  # a plain ONNX model: KServe only


def test_classify_held_out_digits(server: RunningServer, digits_holdout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits_holdout
    with Client(server.target) as client:
        results = client.classify("digits-fnn", x[:200], top_k=3)
    assert len(results) == 200
    assert all(len(r.top) == 3 for r in results)
    assert all(r.top[0].probability >= r.top[1].probability >= r.top[2].probability for r in results)
    predicted = np.array([int(r.label) for r in results])
    assert (predicted == y[:200]).mean() >= 0.93
    total = [sum(s.probability for s in r.top) for r in results]
    assert all(0 < t <= 1.0001 for t in total)


def test_classify_accepts_one_item_without_batch_dimension(
    server: RunningServer, digits_holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits_holdout
    with Client(server.target) as client:
        (single,) = client.classify("digits-fnn", x[5], top_k=1)
        batch = client.classify("digits-fnn", x[5:6], top_k=1)
    assert single == batch[0]
    assert len(single.top) == 1


def test_classify_top_k_is_capped_at_the_label_count(server: RunningServer) -> None:
    with Client(server.target) as client:
        (result,) = client.classify("digits-fnn", np.zeros((1, 64), np.float32), top_k=50)
    assert len(result.top) == 10
    assert sorted(s.index for s in result.top) == list(range(10))


def test_infer_matches_classify(server: RunningServer, digits_holdout: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits_holdout
    with Client(server.target) as client:
        logits = client.infer("digits-fnn", {"input": (x[:8] / 16).astype(np.float32)})["logits"]
        ranked = client.classify("digits-fnn", x[:8], top_k=1)
    assert logits.shape == (8, 10)
    assert [int(r.label) for r in ranked] == logits.argmax(axis=1).tolist()


def test_versions_are_addressable(server: RunningServer) -> None:
    with Client(server.target) as client:
        assert client.metadata("digits-fnn", version="1").version == "1"
        assert client.metadata("digits-fnn").version == "2"  # the latest
        with pytest.raises(NotFound, match=r"no version '9'.*\[1, 2\]"):
            client.metadata("digits-fnn", version="9")


def test_errors_carry_the_server_message(server: RunningServer) -> None:
    with Client(server.target) as client:
        with pytest.raises(NotFound, match="unknown model 'nope'") as caught:
            client.classify("nope", np.zeros((1, 64), np.float32))
        assert caught.value.code == "NOT_FOUND"
        with pytest.raises(InvalidArgument, match=r"'echo' carries no nnserve metadata, so it serves no task"):
            client.classify("echo", np.zeros((1, 3), np.float32))


def test_deadline_applies_to_every_call(server: RunningServer) -> None:
    heavy = {"x": np.ones((256, 1024), np.float32)}  # about 13 GFLOP: far longer than 20 ms
    with Client(server.target, timeout=0.02) as client, pytest.raises(DeadlineExceeded):
        client.infer("slow", heavy)  # the client's default deadline
    with Client(server.target) as client:
        with pytest.raises(DeadlineExceeded):
            client.infer("slow", heavy, timeout=0.02)  # a per-call deadline
        assert client.live()


@pytest.mark.fast
def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(Unavailable):
        client.live()


@pytest.mark.fast
def test_tls_credentials_build() -> None:
    assert isinstance(tls_credentials(), grpc.ChannelCredentials)


@pytest.mark.fast
def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)


async def test_async_client(server: RunningServer, digits_holdout: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits_holdout
    async with AsyncClient(server.target) as client:
        assert await client.live()
        assert await client.ready()
        assert {m.name for m in await client.models()} == {"digits-fnn", "echo", "echo-typed", "slow"}
        assert (await client.metadata("digits-fnn")).task == "classify"
        results = await client.classify("digits-fnn", x[:50])
        assert (np.array([int(r.label) for r in results]) == y[:50]).mean() >= 0.9
        out = await client.infer("echo", {f"in_{t}": v for t, v in _echo_inputs().items()})
        assert np.array_equal(out["out_FP16"], _echo_inputs()["FP16"])
        with pytest.raises(NotFound):
            await client.metadata("nope")


def _echo_inputs() -> dict[str, np.ndarray]:
    from conftest import ECHO_TYPES

    arrays = {}
    for datatype, (_, dtype) in ECHO_TYPES.items():
        if datatype == "BYTES":
            arrays[datatype] = np.array([[b"a", b"", b"xyz"]] * 2, dtype=object)
        elif datatype == "BOOL":
            arrays[datatype] = np.array([[True, False, True]] * 2)
        else:
            arrays[datatype] = (np.arange(6).reshape(2, 3) + 1).astype(dtype)
    return arrays
