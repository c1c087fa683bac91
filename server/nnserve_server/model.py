"""One served model version: its session, its batcher, its statistics.

`OnnxModel.infer` is the whole inference path: the session checks the inputs, the batcher runs
them (now, or in a shared run), and the request is counted once, in the model's `ModelStats`,
which KServe's ModelStatistics and the Prometheus collector both read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .batcher import Batcher, BatchPolicy, Timing
from .request_record import CURRENT
from .runtime import Runtime
from .serving_config import ServingConfig
from .session import ModelSession
from .stats import ModelStats

log = logging.getLogger(__name__)


class OnnxModel:
    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        runtime: Runtime,
        config: ServingConfig,
        inline_run_us: int = 0,
        stats: ModelStats | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.stats = stats if stats is not None else ModelStats(name, version)
        session = ModelSession(name, path, runtime, config.intra_op_threads, config.max_batch_size)
        policy = BatchPolicy(
            max_batch_size=session.max_batch_size if config.dynamic_batching else 0,
            max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=config.max_queue_size,
            instances=config.instances,
            inline_ns=inline_run_us * 1000,
        )
        self.batcher = Batcher(f"{name}:{version}", session.run, policy, self.stats)
        self._warm_up(session)
        if self.batcher.inline and config.intra_op_threads > 1 and not config.threads_chosen:
            # A run this short loses more to waking a second thread than it gains from it.
            config = dataclasses.replace(config, intra_op_threads=1)
            session = ModelSession(name, path, runtime, 1, config.max_batch_size)
            self.batcher.run_fn = session.run
            self._warm_up(session)
        self.config = config
        self.session = session
        self.spec = session.spec
        self.inputs = session.inputs
        self.outputs = session.outputs
        self.max_batch_size = session.max_batch_size
        self.providers = session.providers
        self.instances = config.instances
        self.stats.queue_depth = lambda: self.batcher.depth

    def _warm_up(self, session: ModelSession) -> None:
        """Runs on zeros: pages the weights in, times a run for the inline decision."""
        feed = session.zeros()
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refused warm-up is expected for some models: no error in the log
        try:
            session.session.run(list(session.all_outputs), feed, quiet)
        except Exception as error:  # zeros are not valid input for every model: then it is not timed
            log.info(
                "model %s version %s: no warm-up run on zeros (%s); runs go to the pool", self.name, self.version, error
            )
            return
        for _ in range(3):  # time the last
            self.batcher.warm_up(session.all_outputs, feed)

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
        stats = self.stats
        try:
            feed, rows = self.session.feed(inputs, outputs)
            names = tuple(outputs) or self.session.all_outputs
            done = self.batcher.run_now(feed, names, rows, deadline)
            arrays, timing = done if done is not None else await self.batcher.submit(feed, names, rows, deadline)
        except BaseException:
            stats.fail.add(time.perf_counter_ns() - started)
            raise
        stats.count_request(time.perf_counter_ns() - started, timing, rows)
        if record is not None:
            record.add_run(self.name, self.version, stats, timing, rows)
        return dict(zip(names, arrays, strict=True)), timing

    def close(self) -> None:
        self.batcher.close()
