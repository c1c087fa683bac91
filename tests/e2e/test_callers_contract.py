"""What a caller in any language needs from the contract: protos that say where generated code goes, a
task API that says what its tensors hold, and error messages without Python internals."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from conftest import RunningServer
from test_tasks import cli

from nnserve_client import Client
from nnserve_contract.stubs import (
    grpc_predict_v2_pb2,
    grpc_predict_v2_pb2_grpc,
    model_config_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # and nothing after it
PYTHON_INTERNALS = re.compile(r"0x[0-9a-f]{6,}|<[^>]*object|BytesIO|Error:|Exception|Traceback")


@pytest.mark.parametrize(
    ("module", "go_package", "java_package"),
    [
        (tasks_pb2, "nnserve.dev/gen/go/nnserve/v1;nnservev1", "dev.nnserve.v1"),
        (grpc_predict_v2_pb2, "nnserve.dev/gen/go/inference;inference", "dev.nnserve.inference"),
        (model_config_pb2, "nnserve.dev/gen/go/inference;inference", "dev.nnserve.inference"),
    ],
)
def test_every_proto_says_where_generated_code_goes(module: object, go_package: str, java_package: str) -> None:
    """protoc --go_out refuses a file without go_package; make check generates Go and Java from them."""
    descriptor = module.DESCRIPTOR  # type: ignore[attr-defined]
    options = descriptor.GetOptions()
    assert options.go_package == go_package
    assert options.java_package == java_package
    assert options.java_multiple_files
    assert options.java_outer_classname.endswith("Proto")
    assert options.csharp_namespace.startswith("Nnserve.")
    if module is not tasks_pb2:
        assert descriptor.package == "inference"  # the wire contract Triton's clients expect


def test_get_model_says_what_a_task_tensor_holds(zoo_server: RunningServer) -> None:
    """The digit classifiers take pixels 0..16 through the task API and 0..1 through ModelInfer: a caller
    learns both from GetModel, where before only the network's tensor ([-1, 64] FP32) was said."""
    with grpc.insecure_channel(zoo_server.target) as channel:
        described = tasks_pb2_grpc.TasksStub(channel).GetModel(tasks_pb2.GetModelRequest(name="digits-fnn"))
    assert described.task_input.layout == "features"
    assert described.task_input.full_scale == pytest.approx(16.0)
    assert described.task_input.scale == pytest.approx(1 / 16)
    assert list(described.inputs[0].shape) == [-1, 64]
    with Client(zoo_server.target) as client:
        info = {m.name: m for m in client.models()}
    fnn = info["digits-fnn"]
    assert fnn.task_input is not None
    assert fnn.task_input.full_scale == pytest.approx(16.0)
    assert "values 0..16" in fnn.takes()
    cnn = info["digits-cnn"].task_input
    assert cnn is not None
    assert cnn.layout == "NCHW"
    listed = cli(zoo_server.target, "--format", "json", "models")
    assert listed.returncode == 0, listed.stderr
    records = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert records["digits-fnn"]["task_input"]["full_scale"] == 16
    shown = cli(zoo_server.target, "models")
    assert shown.returncode == 0, shown.stderr
    assert "values 0..16" in shown.stdout


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (
            tasks_pb2.ClassifyRequest(model_name="digits-cnn", images=tasks_pb2.ImageBatch(images=[b"not an image"])),
            "cannot decode the image: the bytes are not in an image format the server reads; send PNG or JPEG",
        ),
        (
            tasks_pb2.ClassifyRequest(model_name="digits-cnn", images=tasks_pb2.ImageBatch(images=[PNG_SIGNATURE])),
            "cannot decode the image",
        ),
        (
            tasks_pb2.ClassifyRequest(model_name="digits-fnn", tensor=tasks_pb2.Tensor(shape=[1, 64], raw=b"\0" * 256)),
            "the tensor has no datatype: raw bytes need one (one of",
        ),
        (
            tasks_pb2.ClassifyRequest(
                model_name="digits-fnn", tensor=tasks_pb2.Tensor(datatype="fp32", shape=[1, 64], raw=b"\0" * 256)
            ),
            "datatypes are the KServe names in upper case; use 'FP32'",
        ),
    ],
    ids=["not-an-image", "truncated-png", "raw-without-datatype", "lower-case-datatype"],
)
def test_messages_say_the_fix_without_python_internals(
    zoo_server: RunningServer, request_: tasks_pb2.ClassifyRequest, says: str
) -> None:
    with grpc.insecure_channel(zoo_server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        tasks_pb2_grpc.TasksStub(channel).Classify(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert says in details
    assert not PYTHON_INTERNALS.search(details), details


def test_an_llm_prompt_sent_as_numbers_is_refused_in_plain_words(zoo_server: RunningServer) -> None:
    request = grpc_predict_v2_pb2.ModelInferRequest(model_name="chars-lstm")
    request.inputs.add(name="text_input", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.5)
    with grpc.insecure_channel(zoo_server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert "'text_input' must be sent as a BYTES tensor of UTF-8 text, not as numbers" in details
    assert not PYTHON_INTERNALS.search(details), details
    assert "float32" not in details
