"""One loaded model version: its onnxruntime session, its tensor specs, its statistics.

`OnnxModel.infer` is the whole inference path: validate numpy inputs against the graph's specs,
queue them in the model's batcher (which runs the session), count the result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from nnserve_client.codec import datatype_of, dtype_of
from nnserve_client.model_spec import ModelSpec

from .batcher import Batcher, BatchPolicy, Timing
from .errors import InvalidInput
from .metrics import ModelMetrics
from .request_record import CURRENT
from .runtime import Runtime
from .serving_config import ServingConfig

log = logging.getLogger(__name__)

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


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchStats:
    """One batch size's runs: KServe counts input, compute and output time per execution."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Cumulative figures for KServe's ModelStatistics; updated on the event loop thread only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)

    def count_request(self, success_ns: int, timing: Timing, rows: int) -> None:
        self.success.add(success_ns)
        self.queue.add(timing.queue_ns)
        self.compute_input.add(timing.input_ns)
        self.compute_infer.add(timing.infer_ns)
        self.compute_output.add(timing.output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def count_run(self, timing: Timing) -> None:
        self.execution_count += 1
        batch = self.by_batch_size.get(timing.batch_size)
        if batch is None:
            batch = self.by_batch_size[timing.batch_size] = BatchStats()
        batch.compute_input.add(timing.input_ns)
        batch.compute_infer.add(timing.infer_ns)
        batch.compute_output.add(timing.output_ns)


class OnnxModel:
    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        runtime: Runtime,
        config: ServingConfig,
        inline_run_us: int = 0,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.version = version
        self.path = path
        self.config = config
        self.session = runtime.session(path, config.intra_op_threads)
        meta = self.session.get_modelmeta()
        self.spec: ModelSpec | None = ModelSpec.from_props(meta.custom_metadata_map)
        self.inputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_inputs()}
        self.outputs = {arg.name: TensorSpec.from_ort(arg) for arg in self.session.get_outputs()}
        self._all_outputs = tuple(self.outputs)
        # A model batches when every input's first dimension is free: KServe's max_batch_size > 0.
        batches = bool(self.inputs) and all(s.shape[:1] == (-1,) for s in self.inputs.values())
        self.max_batch_size = config.max_batch_size if batches else 0
        self.providers = tuple(self.session.get_providers())
        self.instances = config.instances
        self.stats = ModelStats()
        self._valid: set[object] = set()
        policy = BatchPolicy(
            max_batch_size=self.max_batch_size if config.dynamic_batching else 0,
            max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=config.max_queue_size,
            instances=config.instances,
            inline_ns=inline_run_us * 1000,
        )
        self.batcher = Batcher(f"{name}:{version}", self._session_run, policy, self._count_run)
        self._warm_up()
        if self.batcher.inline and config.intra_op_threads > 1 and not config.threads_chosen:
            # A run this short loses more to waking a second thread than it gains from it.
            self.config = config = dataclasses.replace(config, intra_op_threads=1)
            self.session = runtime.session(path, 1)
            self._warm_up()

    def _warm_up(self) -> None:
        """Runs on zeros of the right types: pages the weights in, times a run. Free dimensions are 1,
        except an image's height and width, which take the size the model was trained on."""
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
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refused warm-up is expected for some models: no error in the log
        try:
            self.session.run(list(self._all_outputs), feed, quiet)
        except Exception as error:  # zeros are not valid input for every model: then it is not timed
            log.info(
                "model %s version %s: no warm-up run on zeros (%s); runs go to the pool", self.name, self.version, error
            )
            return
        for _ in range(3):  # time the last
            self.batcher.warm_up(self._all_outputs, feed)

    def validate(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> int:
        """Raise InvalidInput naming the first thing about `inputs` the graph cannot take; returns the rows.

        Input signatures (names, dtypes, shapes, outputs) that passed once are remembered, so a
        stream of same-shaped requests costs one set lookup each (the set is capped).
        """
        signature = (tuple((n, a.dtype, a.shape) for n, a in inputs.items()), tuple(outputs))
        if signature in self._valid:
            return self._valid_rows(inputs)
        rows = self._validate(inputs, outputs)
        if len(self._valid) < MAX_REMEMBERED_SIGNATURES:
            self._valid.add(signature)
        return rows

    def _valid_rows(self, inputs: Mapping[str, np.ndarray]) -> int:
        return int(next(iter(inputs.values())).shape[0]) if self.max_batch_size else 1

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

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = (), deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all when none are named), by name."""
        results, _ = await self.infer_timed(inputs, outputs, deadline)
        return results

    async def infer_timed(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = (), deadline: float | None = None
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """As `infer`, with where the time went. `deadline` is on the event loop's clock (loop.time())."""
        started = time.perf_counter_ns()
        record = CURRENT.get()
        if record is not None and not record.entered_ns:
            record.entered_ns = started
        try:
            rows = self.validate(inputs, outputs)
            names = tuple(outputs) or self._all_outputs
            feed = {name: _text(name, array) if array.dtype == object else array for name, array in inputs.items()}
            done = self.batcher.run_now(feed, names, rows, deadline)
            arrays, timing = done if done is not None else await self.batcher.submit(feed, names, rows, deadline)
        except BaseException:
            self.stats.fail.add(time.perf_counter_ns() - started)
            raise
        self.stats.count_request(time.perf_counter_ns() - started, timing, rows)
        if self.metrics is not None:
            self.metrics.inferences.inc(rows)
            self.metrics.queue_wait.observe(timing.queue_ns / 1e9)
            self.metrics.compute.observe(timing.infer_ns / 1e9)
        if record is not None:
            record.add_run(self.name, self.version, self.metrics, timing, rows)
        return dict(zip(names, arrays, strict=True)), timing

    def _count_run(self, timing: Timing) -> None:
        self.stats.count_run(timing)
        if self.metrics is not None:
            self.metrics.batch_size.observe(timing.batch_size)
            self.metrics.queue_depth.set(self.batcher.depth)

    def _session_run(self, outputs: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(list(outputs), feed)  # type: ignore[no-any-return]
        except InvalidArgument as error:  # values the graph refuses, e.g. a token id past the vocabulary
            raise InvalidInput(f"onnxruntime refused the inputs of model '{self.name}': {error}") from None

    def close(self) -> None:
        self.batcher.close()


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
