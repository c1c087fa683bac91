"""One served model version: its session, its batcher, its statistics.

`OnnxModel.infer` is the whole inference path: the session checks the inputs, the batcher runs
them (now, or in a shared run), and the request is counted once, in the model's `ModelStats`,
which KServe's ModelStatistics and the Prometheus collector both read. `infer_now` is the short way
for inputs already checked: a run at once on the loop thread, or None.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nnserve_server.core.batcher import Batcher, BatchPolicy, RowsNotGivenBack, RunFn, check_rows
from nnserve_server.core.request_record import CURRENT, RequestRecord
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.serving_config import ServingConfig
from nnserve_server.core.session import ModelSession
from nnserve_server.core.stats import ModelStats, Timing

log = logging.getLogger(__name__)


BATCH_PAYS = 1.7  # combine requests only where a batch of two costs less than this many runs of one


def _timed(run: RunFn, names: Sequence[str], feed: dict[str, np.ndarray]) -> int:
    started = time.perf_counter_ns()
    run(names, feed)
    return time.perf_counter_ns() - started


def _quiet() -> ort.RunOptions:
    """Run options for the load-time runs on zeros: a refusal is expected for some models, no error logged."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _two_rows(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` (one row) twice over: a batch of two."""
    return {name: np.concatenate([array, array]) for name, array in feed.items()}


def _arrived() -> tuple[int, RequestRecord | None]:
    """Now, and the current request's record, marked as having reached a model (its decoding ends here)."""
    started = time.perf_counter_ns()
    record = CURRENT.get()
    if record is not None and not record.entered_ns:
        record.entered_ns = started
    return started, record


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
        session = ModelSession(name, path, runtime, config.intra_op_threads, config)
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
            session = ModelSession(name, path, runtime, 1, config)
            self.batcher.run_fn = session.run
            self._warm_up(session)
        if self.batcher.policy.max_batch_size > 1 and not self.batcher.inline and not config.batching_chosen:
            self._keep_batching_if_it_pays(session)
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
        try:
            session.run(session.all_outputs, feed, _quiet())
        except Exception as error:  # zeros are not valid input for every model: then it is not timed
            log.info(
                "model %s version %s: no warm-up run on zeros (%s); runs go to the pool", self.name, self.version, error
            )
            return
        for _ in range(3):  # time the last
            self.batcher.warm_up(session.all_outputs, feed)
        if self.batcher.policy.max_batch_size > 1:
            self._combine_if_rows_come_back(session, feed)

    def _combine_if_rows_come_back(self, session: ModelSession, one: dict[str, np.ndarray]) -> None:
        """Requests are combined only when each caller's rows can be given back to it: a run of two rows
        must answer two rows in every output (a graph that sums over its first dimension does not). The
        batcher checks every combined run too (`Batcher._execute`); this finds it before any caller does."""
        try:
            arrays = session.run(session.all_outputs, _two_rows(one), _quiet())
        except Exception as error:  # zeros are not valid input for every model: the batcher checks each run
            log.info("model %s: no run of two rows on zeros (%s)", self.name, error)
            return
        try:
            check_rows(arrays, session.all_outputs, 2)
        except RowsNotGivenBack as error:
            self.batcher.stop_combining(str(error))

    def _keep_batching_if_it_pays(self, session: ModelSession) -> None:
        """Turn off combining requests when a batch of two costs about two runs of one (measured now).

        A big model on one thread per instance (a ResNet on a CPU) gains nothing per row from a batch,
        and loses to it: the copy into the batch, and one instance busy with two rows while the other
        waits. Small models gain many times over and are never touched (they run inline)."""
        one = session.zeros()
        two = _two_rows(one)
        names = session.all_outputs
        try:  # interleaved, the best of five each: a noisy moment of a shared machine hits both alike
            times: tuple[list[int], list[int]] = ([], [])
            for _ in range(5):
                for feed, kept in ((one, times[0]), (two, times[1])):
                    kept.append(_timed(session.run, names, feed))
            alone, paired = min(times[0]), min(times[1])
        except Exception as error:  # zeros are not valid input for every model: then keep batching
            log.info("model %s: batching kept, not measured (%s)", self.name, error)
            return
        if paired >= BATCH_PAYS * alone:
            self.batcher.policy = dataclasses.replace(self.batcher.policy, max_batch_size=0)
            log.info(
                "model %s version %s: a batch of 2 costs %.2fx a batch of 1, so requests are not combined "
                "(a config.pbtxt with dynamic_batching, or a queue delay, keeps them combined)",
                self.name,
                self.version,
                paired / alone,
            )

    def infer_now(self, feed: dict[str, np.ndarray], names: tuple[str, ...], rows: int) -> list[np.ndarray] | None:
        """Run inputs already checked (`session.validate` passed for their shape) at once, on the loop
        thread, when the batcher would do just that (`Batcher.runs_now`); None: use `infer_timed`.
        Counted as `infer_timed` counts, in the model's stats and the request's record."""
        batcher = self.batcher
        if not batcher.runs_now():
            return None
        started, record = _arrived()
        stats = self.stats
        try:
            arrays, run_ns = batcher.run_inline(names, feed)
        except BaseException:
            stats.fail.add(time.perf_counter_ns() - started)
            raise
        stats.count_alone(time.perf_counter_ns() - started, run_ns, rows)
        if record is not None:
            record.add_alone_run(self.name, self.version, stats, run_ns, rows)
        return arrays

    def infer_together_now(
        self,
        feeds: Sequence[dict[str, np.ndarray]],
        names: tuple[str, ...],
        rows: int,
        records: Sequence[RequestRecord],
    ) -> list[list[np.ndarray]] | None:
        """Several requests of one shape (`rows` rows each, inputs already checked) that arrived together,
        in one run at once on the calling thread: what the batcher would do with them queued, without the
        queue. Each gets back its own rows (views). None: this model does not combine requests, or would
        not run them now (`infer_timed` will). Counted per request and per run, as the batcher counts."""
        batcher = self.batcher
        together = rows * len(feeds)
        if not batcher.policy.max_batch_size or together > batcher.policy.max_batch_size or not batcher.runs_now():
            return None
        began = time.perf_counter_ns()
        try:
            results = batcher.run_together(feeds, names, rows)
        except BaseException:
            self.stats.fail.add(time.perf_counter_ns() - began)
            raise
        finished = time.perf_counter_ns()
        stats = self.stats
        stats.count_run(results[0][1])
        for record, (_, timing) in zip(records, results, strict=True):
            stats.count_request(finished - record.started_ns, timing, rows)
            record.entered_ns = record.entered_ns or began
            record.add_run(self.name, self.version, stats, timing, rows)
        return [arrays for arrays, _ in results]

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        deadline: float | None = None,
        alone: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all when none are named), by name. `alone`:
        never in one run with other requests (a long prompt's activations grow with the rows)."""
        results, _ = await self.infer_timed(inputs, outputs, deadline, alone)
        return results

    async def infer_timed(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] = (),
        deadline: float | None = None,
        alone: bool = False,
        on_loop: bool = False,
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """As `infer`, with where the time went. `deadline` is on the event loop's clock (loop.time()).
        `on_loop`: run on the event loop's thread when nothing waits for the model, however long a run
        takes (a decoding step: its caller has nothing else to do meanwhile, and a hop to the pool
        and back costs more than it saves)."""
        started, record = _arrived()
        stats = self.stats
        try:
            feed, rows = self.session.feed(inputs, outputs)
            names = tuple(outputs) or self.session.all_outputs
            done = self.batcher.run_now(feed, names, rows, deadline, on_loop)
            arrays, timing = done if done is not None else await self.batcher.submit(feed, names, rows, deadline, alone)
        except BaseException:
            stats.fail.add(time.perf_counter_ns() - started)
            raise
        stats.count_request(time.perf_counter_ns() - started, timing, rows)
        if record is not None:
            record.add_run(self.name, self.version, stats, timing, rows)
        return dict(zip(names, arrays, strict=True)), timing

    def close(self) -> None:
        self.batcher.close()
