"""The one place where protobuf tensors meet numpy, for the SDK and the server alike.

Raw contents go through `np.frombuffer(...).reshape(...)` in and `tobytes()` out, never through
Python lists. Every size is checked against the bytes actually received before anything is
allocated, so a request that claims an absurd shape costs nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from .stubs import tasks_pb2 as tasks

if TYPE_CHECKING:  # ModelInfer's typed contents are read field by field, never built here
    from .stubs import grpc_predict_v2_pb2 as kserve

# KServe v2 datatype names and the numpy dtypes they travel as (little-endian on the wire).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),  # numpy has none; ml_dtypes' is the one onnx and jax use
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# Which InferTensorContents field carries each datatype. FP16 has none: raw only. BF16 may come as
# fp32_contents (each value rounded to the nearest bfloat16), as JSON clients send it as numbers.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "BF16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

MAX_RANK = 32
# No real tensor has more elements than this (a petabyte of bytes); numpy itself refuses shapes whose
# dimensions multiply past its index type, even when another dimension is 0 and the tensor is empty.
MAX_ELEMENTS = 1 << 48
_LENGTH_PREFIX = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor whose datatype, shape and contents do not agree; the message says what to fix."""


def dtype_of(datatype: str) -> np.dtype[Any]:
    try:
        return DTYPES[datatype]
    except KeyError:
        known = ", ".join(DTYPES)
        if not datatype:
            raise TensorError(f"the tensor has no datatype: raw bytes need one (one of {known})") from None
        if datatype.upper() in DTYPES:
            raise TensorError(
                f"unknown datatype {datatype!r}: datatypes are the KServe names in upper case; use {datatype.upper()!r}"
            ) from None
        raise TensorError(f"unknown datatype {datatype!r}; use one of {known}") from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The KServe v2 name for a numpy dtype (str and bytes arrays travel as BYTES)."""
    if dtype.kind in "OSU":  # before the cache: string dtypes come in every length
        return "BYTES"
    known = _DATATYPE_OF.get(dtype)
    if known is None:
        known = _DATATYPE_OF[dtype] = _find_datatype(dtype)
    return known


_DATATYPE_OF: dict[np.dtype[Any], str] = {}  # filled on first use: datatype_of is on every request's path


def _find_datatype(dtype: np.dtype[Any]) -> str:
    for name, candidate in DTYPES.items():
        if dtype.kind == "V" and dtype != candidate:  # ml_dtypes' types (bfloat16, float8s) are all kind V
            continue
        if candidate.kind == dtype.kind and candidate.itemsize == dtype.itemsize and name != "BYTES":
            return name
    raise TensorError(f"numpy dtype {dtype} has no KServe v2 datatype")


def element_count(shape: Sequence[int]) -> int:
    """The number of elements in `shape`, refusing negative dimensions, absurd ranks, and dimensions
    that multiply past MAX_ELEMENTS (zeros aside: `[2**62, 2**31, 0]` is refused, not an empty tensor)."""
    if len(shape) > MAX_RANK:
        raise TensorError(f"shape {list(shape)[:8]}... has rank {len(shape)}; at most {MAX_RANK} is allowed")
    count = nonzero = 1
    for dim in shape:
        if dim < 0:
            raise TensorError(f"shape {list(shape)} has a negative dimension; every dimension must be >= 0")
        count *= dim
        if dim:
            nonzero *= dim
    if nonzero > MAX_ELEMENTS:
        raise TensorError(
            f"shape {list(shape)} has dimensions that multiply to more than 2**48 elements; no tensor is that large"
        )
    return count


def from_raw(raw: bytes | memoryview, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Decode raw little-endian contents; a zero-copy view where the dtype allows (read-only for bytes)."""
    dtype = dtype_of(datatype)
    shape = shape[:]  # a list or tuple; from a protobuf repeated field, a list (the cheapest copy)
    count = element_count(shape)
    if datatype == "BYTES":  # elements are copied out, so a view (of shared memory) becomes bytes first
        return _split_bytes(bytes(raw), count).reshape(tuple(shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"raw contents hold {len(raw)} bytes, but shape {list(shape)} of {datatype} needs {expected} "
            f"({count} elements x {dtype.itemsize} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(contents: kserve.InferTensorContents, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Decode typed contents (one repeated protobuf field per element family)."""
    dtype = dtype_of(datatype)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"{datatype} has no typed contents field; send it in raw_input_contents")
    count = element_count(shape)
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(f"{field} holds {len(values)} elements, but shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(tuple(shape))
    try:
        if datatype == "BF16":  # float32 values, rounded to the nearest bfloat16
            return np.asarray(values, dtype=np.float32).astype(dtype).reshape(tuple(shape))
        return np.asarray(values, dtype=dtype).reshape(tuple(shape))
    except OverflowError as error:
        raise TensorError(f"{field} holds a value out of range for {datatype}: {error}") from None


def to_raw(array: np.ndarray) -> bytes:
    """Encode an array as raw KServe v2 contents (BYTES: a 4-byte length before each element)."""
    if array.dtype.kind in "OSU":
        return _join_bytes(array)
    wire = DTYPES[datatype_of(array.dtype)]
    return np.ascontiguousarray(array, dtype=wire).tobytes()


# nnserve.v1.Tensor's typed value fields and the datatypes they carry.
_TYPED_VALUES = {"float_values": "FP32", "int64_values": "INT64"}


def to_tensor(array: np.ndarray) -> tasks.Tensor:
    """An nnserve.v1.Tensor holding `array` as raw bytes (the compact form; JSON tools may send typed values)."""
    array = np.asarray(array)
    return tasks.Tensor(datatype=datatype_of(array.dtype), shape=array.shape, raw=to_raw(array))


def from_tensor(tensor: tasks.Tensor) -> np.ndarray:
    """Decode an nnserve.v1.Tensor whose elements come in exactly one of `raw`, `float_values`, `int64_values`."""
    typed = [field for field in _TYPED_VALUES if len(getattr(tensor, field))]
    if len(typed) + bool(tensor.raw) > 1:
        given = (["raw"] if tensor.raw else []) + typed
        raise TensorError(
            f"the tensor has elements in {given}; send them in exactly one of raw, {', '.join(_TYPED_VALUES)}"
        )
    if not typed:
        return from_raw(tensor.raw, tensor.datatype, tensor.shape)
    (field,) = typed
    datatype = _TYPED_VALUES[field]
    if tensor.datatype not in ("", datatype):
        raise TensorError(f"{field} carry {datatype}, but the tensor says datatype {tensor.datatype!r}")
    shape = tensor.shape[:]
    count = element_count(shape)
    values = getattr(tensor, field)
    if len(values) != count:
        raise TensorError(f"{field} holds {len(values)} elements, but shape {list(shape)} needs {count}")
    return np.asarray(values, dtype=DTYPES[datatype]).reshape(shape)


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    raise TensorError(f"a BYTES element must be bytes or str, not {type(item).__name__}")


def _join_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = _as_bytes(item)
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _split_bytes(raw: bytes, count: int) -> np.ndarray:
    if count > len(raw) // _LENGTH_PREFIX.size and count > 0:
        raise TensorError(f"raw BYTES contents of {len(raw)} bytes cannot hold {count} elements (4-byte length each)")
    items = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + _LENGTH_PREFIX.size > len(raw):
            raise TensorError(f"raw BYTES contents end before element {index} of {count}")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += _LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise TensorError(f"BYTES element {index} claims {length} bytes; only {len(raw) - offset} remain")
        items[index] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise TensorError(f"raw BYTES contents have {len(raw) - offset} bytes left after {count} elements")
    return items
