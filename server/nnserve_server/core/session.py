"""One onnxruntime session and what its graph takes: tensor specs, validation, the run itself.

Lean on purpose: it knows nothing of queues, statistics or metrics. The served model
(`model.py`) holds a session and hands `session.run` to its batcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from nnserve_contract.codec import datatype_of, dtype_of
from nnserve_contract.model_spec import ModelSpec
from nnserve_server.core.errors import InvalidInput
from nnserve_server.core.runtime import Runtime

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
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the graph leaves the dimension free

    @classmethod
    def from_ort(cls, arg: ort.NodeArg) -> TensorSpec:
        datatype = _ORT_DATATYPES.get(arg.type, arg.type)
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
        return cls(arg.name, datatype, shape)


class ModelSession:
    """The session of one model version, with its inputs, outputs and ONNX metadata."""

    def __init__(self, name: str, path: Path, runtime: Runtime, intra_op_threads: int, max_batch_size: int) -> None:
        self.name = name
        self.session = runtime.session(path, intra_op_threads)
        self.spec: ModelSpec | None = ModelSpec.from_props(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_inputs()}
        self.outputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_outputs()}
        self.all_outputs = tuple(self.outputs)
        # A model batches when every input's first dimension is free: KServe's max_batch_size > 0.
        batches = bool(self.inputs) and all(s.shape[:1] == (-1,) for s in self.inputs.values())
        self.max_batch_size = max_batch_size if batches else 0
        self.providers = tuple(self.session.get_providers())
        self._valid: set[object] = set()
        # The binding itself: the wrapper's run re-checks input names and graph-capture options on every
        # call (several microseconds), which `feed` has already done for our callers.
        self._run = getattr(self.session, "_sess", self.session).run
        self._has_text = any(s.datatype == "BYTES" for s in self.inputs.values())

    def run(self, outputs: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run(list(outputs), feed, None)  # type: ignore[no-any-return]
        except InvalidArgument as error:  # values the graph refuses, e.g. a token id past the vocabulary
            raise InvalidInput(f"onnxruntime refused the inputs of model '{self.name}': {error}") from None

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
        batch_sizes = set()
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
                batch_sizes.add(array.shape[0])
        if not batch_sizes:
            return 1
        if len(batch_sizes) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
        (batch,) = batch_sizes
        if not 1 <= batch <= self.max_batch_size:
            raise InvalidInput(f"batch size {batch} is outside 1..{self.max_batch_size} for model '{self.name}'")
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
