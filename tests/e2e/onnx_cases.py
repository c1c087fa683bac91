"""A broad set of real ONNX graphs nobody here wrote, as a model repository, with what raw onnxruntime answers.

The graphs are the onnx package's node test cases (`onnx.backend.test.case.node`: one operator each, in
every form the ONNX spec tests, with inputs and expected outputs computed by onnx's reference code). A
case joins the set when raw onnxruntime, in this process, runs it and matches onnx's expected outputs
within the case's tolerances: "a graph that raw onnxruntime runs correctly". Each becomes
`<repository>/<case>/1/model.onnx`, and `Case` keeps its inputs (as KServe datatypes) and the outputs raw
onnxruntime gave, for a client in another process to send and compare.

Variants: `exported` keeps the graphs as they are; `freed` declares the first dimension of every input
and output of rank >= 1 free (`batch`), the way exporters with a dynamic batch axis write them, and
`freed_mbs0` adds a `config.pbtxt` of `max_batch_size: 0` to that.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

VARIANTS = ("exported", "freed", "freed_mbs0")

# ONNX element types KServe v2 names, and the datatype each is sent as.
KSERVE = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass
class Case:
    model: str  # the case's name, also its model's name
    rtol: float
    atol: float
    inputs: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # name, datatype, value
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # raw onnxruntime's, by name
    servable: bool = True  # every input and output has a KServe datatype
    types: list[str] = field(default_factory=list)  # "input 'x' tensor(float8e4m3fn)" for those that have none


def _as_array(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _ort_value(array: np.ndarray, elem_type: int) -> Any:
    """onnxruntime's Python API takes ml_dtypes' types (bfloat16, float8s, int4s) only as typed bytes."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "V":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(f"u{array.dtype.itemsize}"), elem_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(value: Any, elem_type: int) -> Any:
    if not value.is_tensor():
        return value.numpy() if value.has_value() else None
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if dtype.kind != "V":
        return value.numpy()
    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=dtype).reshape(value.shape())


def _elem_type(value_info: onnx.ValueInfoProto) -> int | None:
    kind = value_info.type.WhichOneof("value")
    return value_info.type.tensor_type.elem_type if kind == "tensor_type" else None


def run_raw(model: onnx.ModelProto, inputs: list[Any]) -> list[Any]:
    """Raw onnxruntime, in this process, on `inputs` in the graph's input order."""
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # the graphs are odd on purpose: onnxruntime warns about many
    session = ort.InferenceSession(model.SerializeToString(), quiet, providers=["CPUExecutionProvider"])
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    types = {o.name: _elem_type(o) for o in model.graph.output}
    if all(_elem_type(i) is not None for i in graph_inputs) and all(t is not None for t in types.values()):
        feed = {i.name: _ort_value(a, _elem_type(i)) for i, a in zip(graph_inputs, inputs, strict=False)}  # type: ignore[arg-type]
        names = [o.name for o in model.graph.output]
        values = session.run_with_ort_values(names, feed)
        return [_from_ort_value(v, types[n]) for n, v in zip(names, values, strict=True)]  # type: ignore[arg-type]
    feed = {i.name: a for i, a in zip(graph_inputs, inputs, strict=False)}
    return session.run(None, feed)  # type: ignore[no-any-return]


def _similar(expected: Any, got: Any, rtol: float, atol: float) -> bool:
    if isinstance(expected, list) or isinstance(got, list):
        if not (isinstance(expected, list) and isinstance(got, list)) or len(expected) != len(got):
            return False
        return all(_similar(e, g, rtol, atol) for e, g in zip(expected, got, strict=True))
    if expected is None or got is None:
        return expected is None and got is None
    expected, got = np.asarray(expected), np.asarray(got)
    if expected.shape != got.shape:
        return False
    if expected.dtype == object or got.dtype == object:
        return [_text(e) for e in expected.reshape(-1)] == [_text(g) for g in got.reshape(-1)]
    if expected.dtype.kind == "V" or got.dtype.kind == "V":
        expected, got = expected.astype(np.float32), got.astype(np.float32)
    if expected.dtype.kind in "biu" and got.dtype.kind in "biu":
        return bool(np.array_equal(expected, got))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(np.allclose(expected.astype(np.float64), got.astype(np.float64), rtol, atol, equal_nan=True))


def similar(expected: Any, got: Any, rtol: float, atol: float) -> bool:
    """onnx's backend-test comparison: allclose within the case's tolerances, NaN equal to NaN."""
    return _similar(expected, got, rtol, atol)


def _text(item: object) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)  # type: ignore[arg-type]


def _free_first_dimensions(model: onnx.ModelProto) -> onnx.ModelProto:
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    for value_info in [*freed.graph.input, *freed.graph.output]:
        if value_info.type.WhichOneof("value") != "tensor_type":
            continue
        tensor = value_info.type.tensor_type
        if tensor.HasField("shape") and len(tensor.shape.dim) >= 1:
            tensor.shape.dim[0].Clear()
            tensor.shape.dim[0].dim_param = "batch"
    return freed


def _describe(value_info: onnx.ValueInfoProto) -> str:
    elem = _elem_type(value_info)
    if elem is None:
        return value_info.type.WhichOneof("value") or "unknown"
    return f"tensor({helper.tensor_dtype_to_string(elem).removeprefix('TensorProto.').lower()})"


def build(repository: Path, variant: str, limit: int = 0) -> tuple[list[Case], dict[str, int]]:
    """Write the cases raw onnxruntime runs correctly into `repository` as `variant`; returns them, and how
    many were left out and why (`limit`: the first so many node cases only, 0 for all)."""
    from onnx.backend.test.case import node

    assert variant in VARIANTS, variant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference implementations overflow and divide by zero on purpose
        tests = node.collect_testcases(None)
    tests = sorted(tests, key=lambda t: t.name)[: limit or None]
    cases: list[Case] = []
    left_out = {"onnxruntime cannot run it": 0, "onnxruntime answers otherwise than onnx": 0, "no plain inputs": 0}
    for test in tests:
        model = test.model if variant == "exported" else _free_first_dimensions(test.model)
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = [i for i in model.graph.input if i.name not in initializers]
        inputs, expected = test.data_sets[0]
        inputs = [_as_array(value) for value in inputs]
        expected = [_as_array(value) for value in expected]
        try:
            got = run_raw(model, inputs)
        except Exception:
            left_out["onnxruntime cannot run it"] += 1
            continue
        if len(got) != len(expected) or not all(
            _similar(e, g, test.rtol, test.atol) for e, g in zip(expected, got, strict=True)
        ):
            left_out["onnxruntime answers otherwise than onnx"] += 1
            continue
        case = Case(test.name, test.rtol, test.atol)
        for value_info in [*graph_inputs, *model.graph.output]:
            if KSERVE.get(_elem_type(value_info) or -1) is None:
                case.servable = False
                kind = "output" if value_info in model.graph.output else "input"
                case.types.append(f"{kind} '{value_info.name}' {_describe(value_info)}")
        if case.servable:
            if not all(isinstance(a, np.ndarray) for a in inputs):
                left_out["no plain inputs"] += 1
                continue
            case.inputs = [
                (i.name, KSERVE[_elem_type(i)], a)  # type: ignore[index]
                for i, a in zip(graph_inputs, inputs, strict=True)
            ]
            case.outputs = {o.name: g for o, g in zip(model.graph.output, got, strict=True)}
        folder = repository / test.name
        (folder / "1").mkdir(parents=True)
        onnx.save(model, str(folder / "1" / "model.onnx"))
        if variant == "freed_mbs0":
            (folder / "config.pbtxt").write_text("max_batch_size: 0\n")
        cases.append(case)
    return cases, left_out
