"""The tensor codec: round trips for every datatype, and refusals before allocation."""

from __future__ import annotations

import numpy as np
import pytest

from nnserve_contract import codec
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import tasks_pb2 as tasks_pb

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_round_trip(datatype: str) -> None:
    array = (np.arange(12).reshape(3, 4) % 2 == 0) if datatype == "BOOL" else np.arange(12).reshape(3, 4)
    array = array.astype(codec.DTYPES[datatype])
    assert codec.datatype_of(array.dtype) == datatype
    back = codec.from_raw(codec.to_raw(array), datatype, array.shape)
    assert back.dtype == array.dtype
    assert np.array_equal(back, array)


def test_raw_decode_is_zero_copy() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    array = codec.from_raw(raw, "FP32", [2, 3])
    assert not array.flags.owndata
    assert not array.flags.writeable


def test_bytes_round_trip_with_empty_and_binary_elements() -> None:
    array = np.array([[b"", b"\x00\xff"], ["text", b"z" * 300]], dtype=object)
    back = codec.from_raw(codec.to_raw(array), "BYTES", [2, 2])
    assert back.tolist() == [[b"", b"\x00\xff"], [b"text", b"z" * 300]]


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT8", "int_contents", [-3, 0, 7]),
        ("UINT16", "uint_contents", [1, 2, 65535]),
        ("INT64", "int64_contents", [-(2**40), 0, 2**40]),
        ("UINT64", "uint64_contents", [0, 1, 2**63]),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0]),
        ("FP64", "fp64_contents", [0.1, 0.2, 0.3]),
        ("BOOL", "bool_contents", [True, False, True]),
        ("BYTES", "bytes_contents", [b"a", b"", b"c"]),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list[object]) -> None:
    contents = pb.InferTensorContents(**{field: values})
    array = codec.from_contents(contents, datatype, [1, 3])
    assert array.shape == (1, 3)
    assert array.reshape(-1).tolist() == values


def test_typed_contents_out_of_range_is_a_tensor_error() -> None:
    contents = pb.InferTensorContents(int_contents=[1000])
    with pytest.raises(codec.TensorError, match="out of range for INT8"):
        codec.from_contents(contents, "INT8", [1])


def test_fp16_has_no_typed_field() -> None:
    with pytest.raises(codec.TensorError, match="raw_input_contents"):
        codec.from_contents(pb.InferTensorContents(), "FP16", [0])


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "message"),
    [
        (b"\x00" * 8, "FP32", [3], "hold 8 bytes, but shape \\[3\\] of FP32 needs 12"),
        (b"", "FP32", [-1, 4], "negative dimension"),
        (b"\x00" * 4, "FP32", [2**40, 2**40, 2**40], "more than 2\\*\\*48"),  # refused, nothing allocated
        (b"", "FP32", [2**62, 2**31, 0, 1, 64], "more than 2\\*\\*48"),  # empty, but numpy would refuse it
        (b"", "BYTES", [2**62, 2**31, 0], "more than 2\\*\\*48"),
        (b"", "FP32", [1] * 40, "rank 40"),
        (b"", "COMPLEX64", [1], "unknown datatype 'COMPLEX64'"),
        (b"\x05\x00\x00\x00ab", "BYTES", [1], "claims 5 bytes"),
        (b"\x01\x00\x00\x00ab", "BYTES", [1], "1 bytes left"),
        (b"\x00\x00\x00\x00", "BYTES", [2**31], "cannot hold"),
    ],
)
def test_refusals(raw: bytes, datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(codec.TensorError, match=message):
        codec.from_raw(raw, datatype, shape)


def test_unsupported_numpy_dtype() -> None:
    with pytest.raises(codec.TensorError, match="complex"):
        codec.datatype_of(np.dtype(np.complex64))


def test_task_tensors_carry_raw_bytes_or_typed_values() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(codec.from_tensor(codec.to_tensor(array)), array)
    typed = tasks_pb.Tensor(shape=[2, 3], float_values=array.reshape(-1).tolist())  # datatype may be left out
    decoded = codec.from_tensor(typed)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, array)
    ints = codec.from_tensor(tasks_pb.Tensor(datatype="INT64", shape=[3], int64_values=[-(2**40), 0, 2**40]))
    assert ints.dtype == np.int64
    assert ints.tolist() == [-(2**40), 0, 2**40]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (tasks_pb.Tensor(datatype="FP32", shape=[1], raw=b"\x00" * 4, float_values=[1.0]), "exactly one of"),
        (tasks_pb.Tensor(shape=[2], float_values=[1.0], int64_values=[1]), "exactly one of"),
        (tasks_pb.Tensor(datatype="INT64", shape=[1], float_values=[1.0]), "carry FP32"),
        (tasks_pb.Tensor(shape=[3], float_values=[1.0, 2.0]), "holds 2 elements, but shape \\[3\\] needs 3"),
        (tasks_pb.Tensor(shape=[2**62, 2**31, 0], float_values=[1.0]), "more than 2\\*\\*48"),
        (tasks_pb.Tensor(datatype="FP32", shape=[2**62, 2**31, 0, 1, 64]), "more than 2\\*\\*48"),
    ],
)
def test_task_tensor_refusals(tensor: tasks_pb.Tensor, message: str) -> None:
    with pytest.raises(codec.TensorError, match=message):
        codec.from_tensor(tensor)
