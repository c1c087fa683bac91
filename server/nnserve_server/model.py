"""One loaded model version: its onnxruntime session, its tensor specs, its statistics.

`OnnxModel.infer` is the whole inference path: validate numpy inputs against the graph's specs,
run the session in the model's own thread pool (onnxruntime releases the GIL), count the result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nnserve_client.codec import datatype_of
from nnserve_client.model_spec import ModelSpec

from .errors import InvalidInput
from .runtime import Runtime

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


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class ModelStats:
    """Cumulative figures for KServe's ModelStatistics; updated on the event loop thread only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    by_batch_size: dict[int, Duration] = field(default_factory=dict)


class OnnxModel:
    def __init__(self, name: str, version: str, path: Path, runtime: Runtime, max_batch_size: int) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.session = runtime.session(path)
        meta = self.session.get_modelmeta()
        self.spec: ModelSpec | None = ModelSpec.from_props(meta.custom_metadata_map)
        self.inputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_inputs()}
        self.outputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_outputs()}
        # A model batches when every input's first dimension is free: KServe's max_batch_size > 0.
        batches = bool(self.inputs) and all(s.shape[:1] == (-1,) for s in self.inputs.values())
        self.max_batch_size = max_batch_size if batches else 0
        self.providers = tuple(self.session.get_providers())
        self.instances = runtime.instances
        self.stats = ModelStats()
        self._executor = ThreadPoolExecutor(max_workers=runtime.instances, thread_name_prefix=name)

    def validate(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> None:
        """Raise InvalidInput naming the first thing about `inputs` the graph cannot take."""
        missing = [n for n in self.inputs if n not in inputs]
        extra = [n for n in inputs if n not in self.inputs]
        if missing or extra:
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
        if batch_sizes:
            if len(batch_sizes) > 1:
                raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
            (batch,) = batch_sizes
            if not 1 <= batch <= self.max_batch_size:
                raise InvalidInput(f"batch size {batch} is outside 1..{self.max_batch_size} for model '{self.name}'")

    async def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all when none are named), by name."""
        started = time.perf_counter_ns()
        try:
            self.validate(inputs, outputs)
            names = list(outputs) or list(self.outputs)
            feed = {name: _text(name, array) if array.dtype == object else array for name, array in inputs.items()}
            loop = asyncio.get_running_loop()
            queued, ran, results = await loop.run_in_executor(self._executor, self._run, started, names, feed)
        except BaseException:
            self.stats.fail.add(time.perf_counter_ns() - started)
            raise
        self._count(started, queued, ran, inputs)
        return dict(zip(names, results, strict=True))

    def _run(
        self, submitted: int, names: list[str], inputs: Mapping[str, np.ndarray]
    ) -> tuple[int, int, list[np.ndarray]]:
        began = time.perf_counter_ns()
        results = self.session.run(names, dict(inputs))
        return began - submitted, time.perf_counter_ns() - began, results

    def _count(self, started: int, queued: int, ran: int, inputs: Mapping[str, np.ndarray]) -> None:
        stats = self.stats
        batch = next(iter(inputs.values())).shape[0] if self.max_batch_size and inputs else 1
        stats.success.add(time.perf_counter_ns() - started)
        stats.queue.add(queued)
        stats.compute_infer.add(ran)
        stats.inference_count += batch
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)
        stats.by_batch_size.setdefault(batch, Duration()).add(ran)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


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
