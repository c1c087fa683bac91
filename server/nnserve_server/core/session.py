"""One onnxruntime session and what its graph takes: tensor specs, validation, the run itself.

Lean on purpose: it knows nothing of queues, statistics or metrics. The served model
(`model.py`) holds a session and hands `session.run` to its batcher.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from nnserve_contract.codec import DTYPES, datatype_of, dtype_of
from nnserve_contract.model_spec import ModelSpec
from nnserve_server.core.errors import InvalidInput
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.serving_config import ConfigError, ServingConfig

MAX_REMEMBERED_SIGNATURES = 4096

# onnxruntime's element type names and their KServe v2 datatypes.
_ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


_BFLOAT16 = DTYPES["BF16"]
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16: onnxruntime's Python run cannot take or give it as numpy


class UnservableType(ValueError):
    """A graph tensor whose element type KServe v2 has no datatype for (float8, int4, sequences...)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the graph leaves the dimension free

    @classmethod
    def from_ort(cls, arg: ort.NodeArg, kind: str) -> TensorSpec:
        datatype = _ORT_DATATYPES.get(arg.type)
        if datatype is None:  # served, it would end INTERNAL or, worse, relabelled as another type
            raise UnservableType(
                f"{kind} '{arg.name}' is {arg.type}, which no KServe v2 datatype carries "
                f"(served: {', '.join(sorted(_ORT_DATATYPES))})"
            )
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
        return cls(arg.name, datatype, shape)

    @property
    def free_first_dimension(self) -> bool:
        return self.shape[:1] == (-1,)


def batching(
    inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec], config: ServingConfig
) -> tuple[int, str]:
    """The model's max_batch_size (0: no batch dimension) and why, by Triton's rules: the config file's
    max_batch_size when it sets one; else a batch dimension when every input and every output has a free
    first dimension (as Triton's onnxruntime backend completes a config), so each caller's rows can be
    given back to it."""
    tensors = [("input", s) for s in inputs.values()] + [("output", s) for s in outputs.values()]
    fixed = [f"{kind} '{s.name}' {list(s.shape)}" for kind, s in tensors if not s.free_first_dimension]
    if config.batch_dimension is False:
        return 0, "config.pbtxt sets max_batch_size 0: shapes as declared, requests never combined"
    if config.batch_dimension:
        if fixed:
            raise ConfigError(
                f"config.pbtxt sets max_batch_size {config.max_batch_size}, but the first dimension of "
                f"{', '.join(fixed)} is fixed, so it cannot be the batch dimension (max_batch_size 0 serves "
                "shapes as declared)"
            )
        return config.max_batch_size, f"config.pbtxt sets max_batch_size {config.max_batch_size}"
    if not inputs:
        return 0, "no batch dimension: the model has no inputs"
    if fixed:
        return 0, f"no batch dimension: the first dimension of {fixed[0]} is fixed"
    return config.max_batch_size, "every input and output has a free first dimension (Triton's rule)"


class ModelSession:
    """The session of one model version, with its inputs, outputs and ONNX metadata."""

    def __init__(self, name: str, path: Path, runtime: Runtime, intra_op_threads: int, config: ServingConfig) -> None:
        self.name = name
        self.session = runtime.session(path, intra_op_threads)
        self.spec: ModelSpec | None = ModelSpec.from_props(self.session.get_modelmeta().custom_metadata_map)
        if self.spec is not None and self.spec.task == "segment":  # images of any size: no arena (runtime.py)
            self.session = runtime.session(path, intra_op_threads, memory_arena=False)
        self.inputs = {arg.name: TensorSpec.from_ort(arg, "input") for arg in self.session.get_inputs()}
        self.outputs = {arg.name: TensorSpec.from_ort(arg, "output") for arg in self.session.get_outputs()}
        self.all_outputs = tuple(self.outputs)
        self.max_batch_size, self.batching_reason = batching(self.inputs, self.outputs, config)
        self.providers = tuple(self.session.get_providers())
        self._valid: set[object] = set()
        # The binding itself: the wrapper's run re-checks input names and graph-capture options on every
        # call (several microseconds), which `feed` has already done for our callers. A model with BF16
        # tensors runs through OrtValues, the only way onnxruntime's Python API takes and gives them.
        self._has_text = any(s.datatype == "BYTES" for s in self.inputs.values())
        bfloat16_out = [s.name for s in self.outputs.values() if s.datatype == "BF16"]
        if bfloat16_out and self._has_text:  # run_with_ort_values takes no strings; run gives no bfloat16
            raise UnservableType(
                f"outputs {bfloat16_out} are BF16 and the model takes strings (BYTES): onnxruntime's Python API "
                "runs no model with both"
            )
        if bfloat16_out:
            self._run = self._run_bfloat16
        elif any(s.datatype == "BF16" for s in self.inputs.values()):
            self._run = self._run_bfloat16_in
        else:
            self._run = getattr(self.session, "_sess", self.session).run

    def run(
        self, outputs: Sequence[str], feed: dict[str, np.ndarray], options: ort.RunOptions | None = None
    ) -> list[np.ndarray]:
        try:
            return self._run(list(outputs), feed, options)  # type: ignore[no-any-return]
        except InvalidArgument as error:  # values the graph refuses, e.g. a token id past the vocabulary
            raise InvalidInput(f"onnxruntime refused the inputs of model '{self.name}': {error}") from None

    def _run_bfloat16(
        self, outputs: list[str], feed: dict[str, np.ndarray], options: ort.RunOptions | None
    ) -> list[np.ndarray]:
        """BF16 outputs: onnxruntime gives them only as OrtValues (and takes only OrtValues then)."""
        values = {name: _ort_value(array) for name, array in feed.items()}
        return [_from_ort_value(value) for value in self.session.run_with_ort_values(outputs, values, options)]

    def _run_bfloat16_in(
        self, outputs: list[str], feed: dict[str, np.ndarray], options: ort.RunOptions | None
    ) -> list[np.ndarray]:
        """BF16 inputs only: those as OrtValues, the rest (strings among them) as numpy."""
        values = {name: _ort_value(a) if a.dtype == _BFLOAT16 else a for name, a in feed.items()}
        return self.session.run(outputs, values, options)  # type: ignore[no-any-return]

    def feed(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
        """`inputs` as the session takes them, and their rows; InvalidInput names what does not fit."""
        rows = self.validate(inputs, outputs)
        if not self._has_text:
            return inputs if isinstance(inputs, dict) else dict(inputs), rows
        return {name: _text(name, a) if a.dtype == object else a for name, a in inputs.items()}, rows

    def validate(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> int:
        """Raise InvalidInput naming the first thing about `inputs` the graph cannot take; returns the rows.

        Input signatures (names, dtypes, shapes, outputs) that passed once are remembered, so a
        stream of same-shaped requests costs one set lookup each (the set is capped).
        """
        signature = (tuple((n, a.dtype, a.shape) for n, a in inputs.items()), tuple(outputs))
        if signature in self._valid:
            return int(next(iter(inputs.values())).shape[0]) if self.max_batch_size else 1
        rows = self._validate(inputs, outputs)
        if len(self._valid) < MAX_REMEMBERED_SIGNATURES:
            self._valid.add(signature)
        return rows

    def _validate(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> int:
        if len(inputs) != len(self.inputs) or any(n not in self.inputs for n in inputs):
            missing = [n for n in self.inputs if n not in inputs]
            extra = [n for n in inputs if n not in self.inputs]
            raise InvalidInput(
                f"model '{self.name}' takes inputs {list(self.inputs)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra}" if extra else "")
            )
        unknown = [n for n in outputs if n not in self.outputs]
        if unknown:
            raise InvalidInput(f"model '{self.name}' has no outputs {unknown}; it has {list(self.outputs)}")
        batch_sizes: dict[int, list[str]] = {}
        for name, array in inputs.items():
            spec = self.inputs[name]
            datatype = datatype_of(array.dtype)
            if datatype != spec.datatype:
                raise InvalidInput(f"input '{name}' is {datatype}, but model '{self.name}' takes {spec.datatype}")
            if array.ndim != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
            ):
                raise InvalidInput(
                    f"input '{name}' has shape {list(array.shape)}, but model '{self.name}' takes "
                    f"{list(spec.shape)} (-1: any size)"
                )
            if self.max_batch_size:
                batch_sizes.setdefault(array.shape[0], []).append(name)
        if not batch_sizes:
            return 1
        if len(batch_sizes) > 1:
            said = "; ".join(f"{names} {rows}" for rows, names in sorted(batch_sizes.items()))
            raise InvalidInput(
                f"inputs disagree on the batch size (model '{self.name}' batches on the first dimension of "
                f"every input, {self.batching_reason}): first dimension {said}"
            )
        ((batch, names),) = batch_sizes.items()
        if not 1 <= batch <= self.max_batch_size:
            raise InvalidInput(
                f"batch size {batch} is outside 1..{self.max_batch_size} for model '{self.name}': the first "
                f"dimension of inputs {names} ({self.batching_reason})"
            )
        return int(batch)

    def zeros(self) -> dict[str, np.ndarray]:
        """A feed of zeros of the right types, for warm-up: free dimensions are 1, except an image's
        height and width, which take the size the model was trained on."""
        image = tuple(self.spec.image_size) if self.spec and self.spec.input_layout == "NCHW" else ()
        feed = {}
        for spec in self.inputs.values():
            shape = [1 if d < 0 else d for d in spec.shape]
            if len(image) == 2 and len(shape) == 4:
                shape[2:] = [h if d < 0 else d for h, d in zip(image, spec.shape[2:], strict=True)]
            feed[spec.name] = (
                np.full(shape, "", dtype=object)
                if spec.datatype == "BYTES"
                else np.zeros(shape, dtype_of(spec.datatype))
            )
        return feed


def _ort_value(array: np.ndarray) -> Any:
    """An OrtValue over `array` (no copy where it is contiguous); BF16 as its 16-bit pattern, typed."""
    array = np.ascontiguousarray(array)
    if array.dtype == _BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(value: Any) -> np.ndarray:
    """An output as numpy; a BF16 one copied out of onnxruntime's memory (its `numpy()` refuses it)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()  # type: ignore[no-any-return]
    shape = tuple(value.shape())
    size = value.tensor_size_in_bytes()
    data = ctypes.string_at(value.data_ptr(), size) if size else b""
    return np.frombuffer(data, dtype=_BFLOAT16).reshape(shape)


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime's string tensors hold UTF-8 text: decode BYTES elements, refusing binary ones."""
    flat = array.reshape(-1)
    text = np.empty(flat.shape, dtype=object)
    for index, item in enumerate(flat):
        try:
            text[index] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError as error:
            raise InvalidInput(
                f"input '{name}' element {index} is not valid UTF-8 ({error.reason}); string tensors hold text"
            ) from None
    return text.reshape(array.shape)
