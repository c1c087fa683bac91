"""Dynamic batching: one bounded queue per model, drained into onnxruntime runs.

A batch leaves the queue when it holds `max_batch_size` rows, when its oldest request has waited
`max_queue_delay_us`, or at once when the delay is 0 (whatever is queued when an instance is free).
Only requests with the same non-batch shapes and the same requested outputs share a batch; each
caller gets back its own rows. A full queue refuses at once (Overloaded); a request whose deadline
passed while it waited is answered DeadlineExceeded and never computed; a cancelled one is skipped.

Where a run happens: models whose runs are shorter than a thread hop (`inline_ns`, measured as a
moving average) run on the event loop thread; the rest run in a pool of `instances` threads
(onnxruntime releases the GIL). All queue bookkeeping happens on the event loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nnserve_server.core.errors import DeadlineExceeded, Overloaded
from nnserve_server.core.stats import ModelStats, Timing

log = logging.getLogger(__name__)

# run(output_names, feed) -> one array per output name: the model's session.run.
RunFn = Callable[[Sequence[str], dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # rows per run; 0: the model has no batch axis, one request per run
    max_queue_delay_us: int  # how long the oldest request may wait for others to join
    max_queue_size: int  # requests waiting (not running); beyond it, Overloaded
    instances: int  # runs in flight at once (threads of the pool)
    inline_ns: int  # a model whose runs average below this runs on the event loop thread; 0: never


class RowsNotGivenBack(RuntimeError):
    """A combined run answered an output whose first dimension is not the batch's rows."""


def check_rows(arrays: Sequence[np.ndarray], outputs: Sequence[str], rows: int) -> None:
    for name, array in zip(outputs, arrays, strict=True):
        if array.shape[:1] != (rows,):
            raise RowsNotGivenBack(f"output '{name}' answered shape {list(array.shape)} for a run of {rows} rows")


class _Request:
    """One caller's inputs, as a run takes them."""

    __slots__ = ("enqueued_ns", "inputs", "outputs", "rows")

    def __init__(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...], rows: int) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.enqueued_ns = time.perf_counter_ns()


class _Pending(_Request):
    """A queued request: its caller's future and deadline, and what it may share a run with."""

    __slots__ = ("deadline", "future", "key")
    key: object

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        rows: int,
        deadline: float | None,
        future: asyncio.Future[tuple[list[np.ndarray], Timing]],
    ) -> None:
        super().__init__(inputs, outputs, rows)
        self.deadline = deadline
        self.future = future
        # Requests share a run only when everything but the batch axis agrees.
        self.key = (outputs, tuple((name, array.shape[1:]) for name, array in inputs.items()))


_Outcome = tuple[list[tuple[list[np.ndarray], Timing]] | None, BaseException | None]


class Batcher:
    def __init__(self, name: str, run: RunFn, policy: BatchPolicy, stats: ModelStats | None = None) -> None:
        self.name = name
        self.policy = policy
        self.run_fn = run
        self._stats = stats  # each run is counted there (batch size, execution count, per-size times)
        self._queue: deque[_Pending] = deque()
        self._busy = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._executor = ThreadPoolExecutor(max_workers=policy.instances, thread_name_prefix=f"{name}-run")
        self._run_ns = math.inf  # what one run costs, for the inline decision (`_observe`); inf: unknown
        self._inline = False
        self._closed = False
        # Does the oldest request wait for others to join it? Only with a delay and a batch axis.
        self._waits = bool(policy.max_queue_delay_us and policy.max_batch_size)

    @property
    def inline(self) -> bool:
        """Run on the loop thread? Yes below `inline_ns`; once inline, until runs average 4x that.

        The margin keeps a busy machine (where every run takes longer) from flipping a tiny model
        to the pool, whose thread hops cost far more than the run itself.
        """
        limit = self.policy.inline_ns * (4 if self._inline else 1)
        self._inline = self._run_ns < limit
        return self._inline

    def _observe(self, run_ns: float) -> None:
        """A moving average of what a run costs (10% a run). A stall counts in full: one 10 ms pause of a
        20 us run (py-spy sampling the process showed it) moves the MLP to the pool, where runs timed
        by the wall clock include their wait for the GIL and keep it there. Capping the samples kept
        it on the loop, but also kept the Transformer LM's steps there, where 64 streams waited 2.6 s
        for a first token (133-199 ms in the pool): the decision needs more than one number. (That was
        before decoding groups; their steps now ask for the loop themselves, `run_now(on_loop=True)`,
        and the prompts still follow this average.)"""
        estimate = self._run_ns
        self._run_ns = run_ns if estimate == math.inf else estimate + (run_ns - estimate) * 0.1

    def stop_combining(self, reason: str) -> None:
        """Run each request alone from now on: a combined run's rows cannot be given back per caller."""
        if self.policy.max_batch_size:
            log.warning("model %s: requests are no longer combined: %s", self.name, reason)
            self.policy = dataclasses.replace(self.policy, max_batch_size=0)
            self._waits = False

    def _rows_not_given_back(self, error: RowsNotGivenBack) -> None:
        """A combined run's outputs lacked its rows: counted; its requests run again one by one (the
        callers' fallbacks), and no run is combined again."""
        if self._stats is not None:
            self._stats.uncombined_runs += 1
        self.stop_combining(str(error))

    @property
    def depth(self) -> int:
        """Requests waiting (a cancelled one counts until it is skipped)."""
        return len(self._queue)

    def warm_up(self, outputs: Sequence[str], feed: dict[str, np.ndarray]) -> None:
        """One run outside the queue (at load time): seeds the inline decision, pages the weights in."""
        started = time.perf_counter_ns()
        self.run_fn(outputs, feed)
        self._run_ns = float(time.perf_counter_ns() - started)

    def runs_now(self, on_loop: bool = False) -> bool:
        """Would a request run at once, on the loop thread? An inline model (or `on_loop`: the caller
        asks for the loop thread whatever a run costs), nothing queued, an instance free, and no
        delay to wait for others: what the queue would do anyway."""
        if self._queue or self._busy >= self.policy.instances or self._closed or self._waits:
            return False
        return on_loop or self.inline

    def run_inline(self, outputs: Sequence[str], inputs: dict[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """One run on the loop thread (after `runs_now`), with its time in ns; feeds the inline decision."""
        self._busy += 1
        try:
            began = time.perf_counter_ns()
            arrays = self.run_fn(outputs, inputs)
            run_ns = time.perf_counter_ns() - began
        finally:
            self._busy -= 1
        self._observe(run_ns)
        return arrays, run_ns

    def run_together(
        self, feeds: Sequence[dict[str, np.ndarray]], outputs: tuple[str, ...], rows: int
    ) -> list[tuple[list[np.ndarray], Timing]]:
        """Requests of one shape (`rows` rows each) that arrived together, in one run on the calling thread
        now (after `runs_now`): concatenated, run and split as a dispatched batch is; each gets its rows
        (views) and timing. The run is counted by the caller, who also counts the requests."""
        self._busy += 1
        try:
            results, error = self._execute([_Request(feed, outputs, rows) for feed in feeds])
        finally:
            self._busy -= 1
        if isinstance(error, RowsNotGivenBack):
            self._rows_not_given_back(error)
        if error is not None:
            raise error
        assert results is not None
        return results

    def run_now(
        self,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        rows: int,
        deadline: float | None,
        on_loop: bool = False,
    ) -> tuple[list[np.ndarray], Timing] | None:
        """Run one request at once when `runs_now` (saves the future, the dispatch callback and the two
        loop turns), counted as a run of its own. None: `submit` it instead."""
        arrived = time.perf_counter_ns()
        if not self.runs_now(on_loop):
            return None
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            return None  # the queue answers it DeadlineExceeded without computing it
        arrays, run_ns = self.run_inline(outputs, inputs)
        timing = Timing(time.perf_counter_ns() - run_ns - arrived, 0, run_ns, 0, rows)
        if self._stats is not None:
            self._stats.count_run(timing)
        return arrays, timing

    def submit(
        self,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        rows: int,
        deadline: float | None,
        alone: bool = False,
    ) -> asyncio.Future[tuple[list[np.ndarray], Timing]]:
        """Queue one request of `rows` rows; the future gets its outputs (in `outputs` order) and timing.
        `alone`: it shares its run with no other request."""
        if self._closed:
            raise Overloaded(f"model '{self.name}' is shutting down")
        if len(self._queue) >= self.policy.max_queue_size:
            self._purge()
            if len(self._queue) >= self.policy.max_queue_size:
                raise Overloaded(
                    f"model '{self.name}' has {len(self._queue)} requests waiting, its queue limit; "
                    "retry with backoff, or raise max_queue_size or add replicas"
                )
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, outputs, rows, deadline, loop.create_future())
        if alone:
            pending.key = (pending.key, id(pending))  # unique: never batched with another
        self._queue.append(pending)
        if not self._scheduled:
            # Dispatch after this turn of the loop, so requests that arrive together share a run.
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return pending.future

    def _purge(self) -> None:
        """Drop requests whose callers gave up (their futures were cancelled)."""
        self._queue = deque(p for p in self._queue if not p.future.done())

    def _dispatch(self) -> None:
        self._scheduled = False
        policy = self.policy
        while self._queue and self._busy < policy.instances:
            head = self._queue[0]
            if head.future.done():  # cancelled while it waited
                self._queue.popleft()
                continue
            if self._waits:
                waited_ns = time.perf_counter_ns() - head.enqueued_ns
                wait_ns = policy.max_queue_delay_us * 1000 - waited_ns
                if wait_ns > 0 and self._rows_like(head) < policy.max_batch_size:
                    self._arm_timer(wait_ns)
                    return
            batch = self._take(head)
            if batch:
                self._start(batch)

    def _rows_like(self, head: _Pending) -> int:
        return sum(p.rows for p in self._queue if p.key == head.key and not p.future.done())

    def _arm_timer(self, wait_ns: int) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(wait_ns / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self, head: _Pending) -> list[_Pending]:
        """Remove from the queue the head and the requests that can join it, in arrival order.

        With several instances idle, the queued rows are shared among them rather than all put on
        one: two half batches on two instances finish sooner than one whole batch on one.
        """
        limit = self.policy.max_batch_size or head.rows
        idle = self.policy.instances - self._busy
        if idle > 1 and self.policy.max_batch_size:
            limit = min(limit, max(head.rows, -(-self._rows_like(head) // idle)))
        loop_now = asyncio.get_running_loop().time()
        batch: list[_Pending] = []
        rows = 0
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.future.done():
                continue
            if pending.key != head.key or rows + pending.rows > limit or (batch and not self.policy.max_batch_size):
                kept.append(pending)
                continue
            if pending.deadline is not None and loop_now >= pending.deadline:
                pending.future.set_exception(
                    DeadlineExceeded(f"the deadline passed while the request waited for model '{self.name}'")
                )
                continue
            batch.append(pending)
            rows += pending.rows
        self._queue = kept
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        self._busy += 1
        if self.inline:
            self._finish(batch, self._execute(batch))
            return
        loop = asyncio.get_running_loop()

        def run_and_report() -> None:
            outcome = self._execute(batch)
            loop.call_soon_threadsafe(self._finish, batch, outcome)

        self._executor.submit(run_and_report)

    def _execute(self, batch: Sequence[_Request]) -> _Outcome:
        """Concatenate, run, split: on the loop thread or a pool thread. Returns (results, error)."""
        try:
            began = time.perf_counter_ns()
            outputs = batch[0].outputs
            if len(batch) == 1:
                feed = batch[0].inputs
            else:
                feed = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            fed = time.perf_counter_ns()
            arrays = self.run_fn(outputs, feed)
            ran = time.perf_counter_ns()
            self._observe(ran - fed)
            if len(batch) == 1:
                parts = [arrays]
            else:  # views, not copies: each caller's rows of each output
                check_rows(arrays, outputs, sum(p.rows for p in batch))
                parts = []
                start = 0
                for pending in batch:
                    end = start + pending.rows
                    parts.append([array[start:end] for array in arrays])
                    start = end
            finished = time.perf_counter_ns()
            rows = sum(p.rows for p in batch)
            results = [
                (part, Timing(began - p.enqueued_ns, fed - began, ran - fed, finished - ran, rows))
                for p, part in zip(batch, parts, strict=True)
            ]
            return results, None
        except BaseException as error:  # delivered to the callers on the loop thread
            return None, error

    def _finish(self, batch: list[_Pending], outcome: _Outcome) -> None:
        self._busy -= 1
        results, error = outcome
        if isinstance(error, RowsNotGivenBack):
            self._rows_not_given_back(error)
        if error is not None and len(batch) > 1:
            # One bad request must not fail the others that shared its run: run each alone.
            log.info(
                "a batch of %d for model %s failed (%s); running its requests one by one", len(batch), self.name, error
            )
            for pending in batch:
                pending.key = (pending.key, id(pending))  # unique: never batched again
            self._queue.extendleft(reversed(batch))
        else:
            for index, pending in enumerate(batch):
                if pending.future.done():
                    continue
                if error is not None:
                    pending.future.set_exception(error)
                else:
                    assert results is not None
                    pending.future.set_result(results[index])
            if results is not None and self._stats is not None:
                self._stats.count_run(results[0][1])
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def close(self) -> None:
        """Refuse new requests; wait for the runs in flight (call from a thread at shutdown)."""
        self._closed = True
        self._executor.shutdown(wait=True)
