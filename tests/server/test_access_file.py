"""Per-model authorization: an access file gives each token a label, the models it may name and the API
groups it may call; on both transports, with our SDK and with tritonclient."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, run_tritonclient, start_server
from test_health_reflection_metrics import sample

from nnserve_client import Client
from nnserve_client.errors import PermissionDenied, Unauthenticated
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

PIXELS = np.zeros((1, 64), np.float32)
ACCESS = """
[[token]]
label = "digits-reader"
token = "r3ader-secret"
models = ["digits-*"]
groups = ["inference", "metadata"]

[[token]]
label = "operator"
token = "0perator-secret"
models = ["*"]
groups = ["inference", "metadata", "repository"]
"""


@pytest.fixture(scope="module", params=["native", "grpcio"])
def guarded(
    request: pytest.FixtureRequest, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    access = tmp_path_factory.mktemp("access") / "access.toml"
    access.write_text(ACCESS)
    running = start_server(
        model_repository, "--access-file", str(access), "--transport", request.param, "--log-format", "json",
        "--access-log-sample", "1",
    )  # fmt: skip
    yield running
    running.stop()


def test_a_token_reaches_its_models_and_no_others(guarded: RunningServer) -> None:
    with Client(guarded.target, token="r3ader-secret", retries=0) as client:
        assert client.infer("digits-fnn", {"input": PIXELS})["logits"].shape == (1, 10)
        assert len(client.classify("digits-fnn", PIXELS)) == 1
        for _ in range(3):  # the native transport's burst lane sees plain ModelInfer calls first
            with pytest.raises(PermissionDenied, match="token 'digits-reader' may not use model 'echo'"):
                client.infer("echo", {"in_FP32": np.zeros((1, 3), np.float32)})
        with pytest.raises(PermissionDenied, match="may not use model 'slow'"):
            client.metadata("slow")
        denied = {"model": "echo", "version": "", "rpc": "ModelInfer"}
        assert sample(guarded.metrics(), "nnserve_request_failures_total", **denied, reason="permission_denied") == 3
        assert {m.name for m in client.models()} == {"digits-fnn"}  # ListModels shows only what it may use
    with grpc.insecure_channel(guarded.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reader = (("authorization", "Bearer r3ader-secret"),)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=reader)
        assert {m.name for m in index.models} == {"digits-fnn"}
        with pytest.raises(grpc.RpcError) as caught:  # the repository group is not the reader's
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits-fnn"), metadata=reader)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call RepositoryModelLoad (API group repository)" in str(caught.value.details())
        operator = (("authorization", "Bearer 0perator-secret"),)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="echo"), metadata=operator)
        assert len(stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=operator).models) > 2


def test_unknown_tokens_are_unauthenticated_and_logs_name_labels_not_tokens(guarded: RunningServer) -> None:
    for token in (None, "r3ader-secre", "0perator-secret "):
        with Client(guarded.target, token=token, retries=0) as client, pytest.raises(Unauthenticated):
            client.infer("digits-fnn", {"input": PIXELS})
    with Client(guarded.target, token="r3ader-secret", retries=0) as client:
        client.infer("digits-fnn", {"input": PIXELS})
    log = guarded.log()
    assert "secret" not in log
    callers = {json.loads(line).get("caller") for line in log.splitlines() if line.startswith("{") and "caller" in line}
    assert "digits-reader" in callers


def test_tritonclient_with_a_model_restricted_token(guarded: RunningServer, tmp_path: Path) -> None:
    script = tmp_path / "restricted.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            import numpy as np
            import tritonclient.grpc as triton
            from tritonclient.utils import InferenceServerException

            client = triton.InferenceServerClient(url=sys.argv[1])
            headers = {"authorization": "Bearer r3ader-secret"}
            x = triton.InferInput("input", [1, 64], "FP32")
            x.set_data_from_numpy(np.zeros((1, 64), np.float32))
            seen = {"shape": list(client.infer("digits-fnn", [x], headers=headers).as_numpy("logits").shape)}
            e = triton.InferInput("in_FP32", [1, 3], "FP32")
            e.set_data_from_numpy(np.zeros((1, 3), np.float32))
            try:
                client.infer("echo", [e], headers=headers)
            except InferenceServerException as error:
                seen["echo"] = [error.status(), error.message()]
            index = client.get_model_repository_index(headers=headers, as_json=True)
            seen["index"] = [m["name"] for m in index["models"]]
            print(json.dumps(seen))
            """
        )
    )
    done = run_tritonclient(script, guarded.target)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["shape"] == [1, 10]
    assert seen["echo"][0] == "StatusCode.PERMISSION_DENIED"
    assert "may not use model 'echo'" in seen["echo"][1]
    assert set(seen["index"]) == {"digits-fnn"}  # both of its versions


def test_an_access_file_that_says_too_little_refuses_to_start(tmp_path: Path) -> None:
    access = tmp_path / "access.toml"
    access.write_text('[[token]]\nlabel = "x"\ntoken = "t"\nmodels = ["*"]\ngroups = ["everything"]\n')
    with pytest.raises(RuntimeError, match=r"unknown groups \['everything'\]"):
        start_server(tmp_path, "--access-file", str(access))
