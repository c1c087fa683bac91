"""Continuous batching of text generation: the streams of a language model decode together.

A stream runs its prompt alone (in chunks, so a long prompt never holds up the streams already
decoding), samples its first token, then joins a decoding group of its model. A group is one task
that, at every step, makes one onnxruntime call for all its streams (their last tokens stacked on the
batch axis, their recurrent states or key/value caches kept stacked between steps, so a step copies no
stream's past), samples every row at once and hands each stream its character. Streams join and
leave between steps; a stream whose consumer has `RUN_AHEAD` pieces unread sits steps out (its row is
computed with the others' and thrown away), so a stalled client holds no more than that. A step runs
on the event loop's thread whenever nothing else waits for the model: the group has nothing to do
until it returns, and a hop to the pool and back cost a 16-stream Transformer step about a quarter
of its time (the consumers write between steps; `Stream.due` keeps them from writing a token or two
at a time while a busy group runs).

Rows live in one of two stores:
- `StateRows` (LSTM, GRU): each recurrent state stacked on its batch axis; a step's state outputs are the
  next step's inputs as they come back.
- `CacheRows` (Transformer): per cache buffer one array [rows, heads, room, head_dim] and each row's
  filled length. The step model takes a length per row and masks each row's unfilled slots, so rows
  at different points of their text share one call; the new keys and values are written in place.
  The room follows the group's longest row (`ROOM` positions at a time), and a model takes one group
  per capacity (`capacity_class`), so one long generation does not make every short one attend over
  its length.
The same seed and settings give the same text whether a stream ran alone or beside others: each row
is computed and sampled on its own (the exporters check the step model for that).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from nnserve_contract.model_spec import AppendCache, ModelSpec
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.request_record import RequestRecord
from nnserve_server.core.sampling import Sampling, sample

logger = logging.getLogger(__name__)

RUN_AHEAD = 32  # pieces a stream may decode before its consumer takes them; then it sits steps out
# A stream of a group of n streams wakes its consumer every `_hold(n)` tokens (1 alone), or once its
# oldest unread piece is this old: fewer, larger messages when the server is busy, within a bounded delay.
MAX_HOLD_NS = 10_000_000


def _hold(streams: int) -> int:
    # About one message per step for the whole group (1 alone, 4 for 4 streams, 16 from 16): at 16
    # Transformer streams, 0.09 pieces a token against 0.19 with a hold of 6, and 16.1-16.4k against
    # 15.1k tokens/s (medians of 5 bursts, interleaved). MAX_HOLD_NS bounds the delay it adds.
    return min(16, streams)


# Event-loop turns a group gives up between steps (a step run inline never suspends). One turn let a
# gRPC call that just arrived go one stage on (accepted, read, prefilled, joined) per step; six took 16
# streams arriving at once to their first token at a p50 of 7 ms against 12 (16-stream bursts,
# interleaved), while an idle turn costs microseconds.
TURNS_BETWEEN_STEPS = 6


MIN_CAPACITY = 64  # cache positions of the smallest capacity class
ROOM = 32  # cache positions a group's buffers grow by


class Stream:
    """One text generation in a decoding group: its sampling, its text so far and its pieces to send.

    The group calls `take` with each new character; the consumer (`generation.Generations.text`) reads
    `pieces` and waits on `ready`. Everything runs on the event loop's thread."""

    def __init__(self, sampling: Sampling, record: RequestRecord | None) -> None:
        self.sampling = sampling
        self.greedy = sampling.temperature == 0
        self._rng: np.random.Generator | None = None
        self.record = record
        self.produced = ""  # the text so far (kept while stop strings may match)
        self.emitted = 0  # how much of `produced` went to `pieces`
        self.count = 0  # tokens generated
        self.pieces: deque[str] = deque()
        self.held_since = 0  # when the oldest unread piece was made
        self.hold = 1  # pieces its consumer lets pile up before it writes (`_hold` of its group's size)
        self.last_token_ns = 0  # when its last token came (for nnserve_inter_token_seconds)
        self.end: str = ""  # length | stop, once it finished
        self.failure: BaseException | None = None
        self.left = False  # the consumer went away
        self.ready = asyncio.Event()
        self.group: Group | None = None

    @property
    def rng(self) -> np.random.Generator:
        """Its own generator, made at its first draw: a greedy stream never draws, and making one from
        the system's entropy was a twelfth of the event loop's time for 16 callers of one-token texts."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.sampling.seed)
        return self._rng

    @property
    def done(self) -> bool:
        return bool(self.end) or self.failure is not None or self.left

    @property
    def parked(self) -> bool:
        return len(self.pieces) >= RUN_AHEAD

    def take(self, char: str, hold: int = 1) -> None:
        """The next character. The consumer is woken once `hold` pieces wait, or the oldest has
        waited `MAX_HOLD_NS`: a busy group's streams send several tokens a message."""
        self.count += 1
        self.hold = hold
        stops = self.sampling.stop
        if not self.pieces:
            self.held_since = time.perf_counter_ns()
        if not stops:
            self.pieces.append(char)
        else:
            produced = self.produced = self.produced + char
            emitted = self.emitted
            at = min((i for s in stops if (i := produced.find(s, max(0, emitted - len(s)))) >= 0), default=-1)
            if at >= 0:
                if at > emitted:
                    self.pieces.append(produced[emitted:at])
                self._finish("stop")
                return
            safe = len(produced) - _pending(produced, stops)  # hold back a tail that may grow into a stop
            if safe > emitted:
                self.pieces.append(produced[emitted:safe])
                self.emitted = safe
        if self.count >= self.sampling.max_tokens:
            if self.emitted < len(self.produced):
                self.pieces.append(self.produced[self.emitted :])
            self._finish("length")
            return
        if self.due():
            self.ready.set()

    def due(self) -> bool:
        """Should the consumer write now? When `hold` pieces wait, the oldest has waited `MAX_HOLD_NS`, or
        the stream ended. (A consumer that wrote while more tokens came must not write those at once:
        back-to-back writes of one or two tokens each cost a busy group more than the tokens.)"""
        return (
            len(self.pieces) >= self.hold
            or self.done
            or (bool(self.pieces) and time.perf_counter_ns() - self.held_since > MAX_HOLD_NS)
        )

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.failure = error
        self.ready.set()

    def _finish(self, reason: str) -> None:
        self.end = reason
        self.ready.set()

    def took_pieces(self) -> None:
        """The consumer read pieces: a group that waits for its parked streams may step again."""
        if self.group is not None:
            self.group.resume.set()


class Rows(Protocol):
    """The stacked state of a group's rows, in the order of its streams."""

    def feed(self) -> dict[str, np.ndarray]: ...
    def advance(self, result: dict[str, np.ndarray], moving: np.ndarray) -> None: ...
    def add(self, joining: Sequence[object]) -> None: ...
    def keep(self, moves: list[tuple[int, int]], count: int) -> None: ...


def _along(axis: int, index: Any) -> Any:
    """An index that picks `index` on `axis` and everything on the axes before it."""
    return (slice(None),) * axis + (index,)


class StateRows:
    """Recurrent states, each stacked on its batch axis (the model's state outputs, as they come back)."""

    def __init__(self, model: OnnxModel, spec: ModelSpec) -> None:
        self._next = dict(spec.state)  # state input -> the output that feeds it next step
        self._axes = {name: model.inputs[name].shape.index(-1) for name in spec.state}
        self.arrays: dict[str, np.ndarray] = {}
        self.count = 0

    def feed(self) -> dict[str, np.ndarray]:
        return self.arrays

    def advance(self, result: dict[str, np.ndarray], moving: np.ndarray) -> None:
        still = None if moving.all() else np.flatnonzero(~moving)
        for name, output in self._next.items():
            new, axis = result[output], self._axes[name]
            if still is not None:  # rows sitting this step out keep their state
                new[_along(axis, still)] = self.arrays[name][_along(axis, still)]
            self.arrays[name] = new

    def add(self, joining: Sequence[object]) -> None:
        states: list[dict[str, np.ndarray]] = joining  # type: ignore[assignment]
        for name, axis in self._axes.items():
            parts = ([self.arrays[name]] if self.count else []) + [state[name] for state in states]
            self.arrays[name] = np.concatenate(parts, axis=axis)
        self.count += len(states)

    def keep(self, moves: list[tuple[int, int]], count: int) -> None:
        for name, axis in self._axes.items():
            array = self.arrays[name]
            for source, target in moves:
                array[_along(axis, target)] = array[_along(axis, source)]
            self.arrays[name] = np.ascontiguousarray(array[_along(axis, slice(0, count))])
        self.count = count


class CacheRows:
    """Key/value buffers [rows, ..., room along the cache axis, ...] and each row's filled length.

    A step attends over every slot of the buffers, filled or not (masked), so the room grows with the
    longest row, `ROOM` positions at a time, rather than starting at the group's capacity: 16 streams
    of 16-character prompts and 128 tokens attend over 96 positions on average instead of 192 (raw
    onnxruntime, 16 rows: 569 against 678 us a step). It never passes `capacity`, what the streams
    reserved, and shrinks once the longest rows left (by at least two `ROOM`s, so streams coming and
    going do not copy the buffers back and forth)."""

    def __init__(self, cache: AppendCache, shapes: dict[str, list[int]]) -> None:
        self._spec = cache
        self.capacity = next(iter(shapes.values()))[cache.axis]  # positions a row may fill (its class)
        self.room = 0
        self.buffers: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            empty = [0, *shape[1:]]
            empty[cache.axis] = 0
            self.buffers[name] = np.zeros(empty, np.float32)
        self.lengths = np.zeros(0, np.int64)

    def feed(self) -> dict[str, np.ndarray]:
        if len(self.lengths) and int(self.lengths.max()) >= self.room:  # a row's next slot is past the room
            self._reshape(len(self.lengths), self._room_for(int(self.lengths.max()) + 1))
        return {self._spec.length_input: self.lengths, **self.buffers}

    def advance(self, result: dict[str, np.ndarray], moving: np.ndarray) -> None:
        rows = None if moving.all() else np.flatnonzero(moving)
        picked = np.arange(len(self.lengths)) if rows is None else rows
        # Each moving row's slot at its length, the axes between whole: with the exporters' [rows, heads,
        # room, width], [rows, heads] index pairs of `width` floats each (a flat index of every float cost
        # more). The row and slot indexes broadcast against the axes between them.
        axis, shape = self._spec.axis, next(iter(self.buffers.values())).shape
        between = [1] * (axis - 1)
        where: list[Any] = [slice(None)] * len(shape)
        where[0] = picked.reshape(-1, *between)
        where[axis] = self.lengths[picked].reshape(-1, *between)
        for inner in range(1, axis):
            where[inner] = np.arange(shape[inner]).reshape([-1 if a == inner else 1 for a in range(1, axis)])
        index = tuple(where)
        for name, output in self._spec.buffers.items():
            new = np.take(result[output], 0, axis=axis)  # this step's one position
            self.buffers[name][index] = new if rows is None else new[rows]
        self.lengths[picked] += 1

    def add(self, joining: Sequence[object]) -> None:
        caches: list[Prefilled] = joining  # type: ignore[assignment]
        count = len(self.lengths)
        longest = max([c.length for c in caches] + ([int(self.lengths.max())] if count else []))
        self._reshape(count + len(caches), max(self.room, self._room_for(longest + 1)))
        axis = self._spec.axis
        for row, cache in enumerate(caches, start=count):
            for name, buffer in self.buffers.items():
                buffer[row][_along(axis - 1, slice(0, cache.length))] = cache.buffers[name][0][
                    _along(axis - 1, slice(0, cache.length))
                ]
        self.lengths = np.concatenate([self.lengths, [c.length for c in caches]]).astype(np.int64)

    def keep(self, moves: list[tuple[int, int]], count: int) -> None:
        for source, target in moves:
            for buffer in self.buffers.values():
                buffer[target] = buffer[source]
            self.lengths[target] = self.lengths[source]
        self.lengths = self.lengths[:count].copy()
        room = self._room_for(int(self.lengths.max()) + 1) if count else 0
        self._reshape(count, room if room <= self.room - 2 * ROOM else self.room)

    def _room_for(self, positions: int) -> int:
        return min(self.capacity, -(-positions // ROOM) * ROOM)

    def _reshape(self, rows: int, room: int) -> None:
        if room == self.room:  # in place (realloc): no step is running, and no view of a buffer outlives a step's feed
            for buffer in self.buffers.values():
                buffer.resize((rows, *buffer.shape[1:]), refcheck=False)
            return
        axis, kept = self._spec.axis, min(room, self.room)
        for name, buffer in self.buffers.items():
            shape = [rows, *buffer.shape[1:]]
            shape[axis] = room
            # Not np.zeros: what is copied over need not be zeroed first (a third of the copy's time).
            # What is not must be: masked slots get no weight, but 0 x NaN would still be NaN.
            resized = np.empty(shape, np.float32)
            both = min(rows, buffer.shape[0])
            resized[:both][_along(axis, slice(0, kept))] = buffer[:both][_along(axis, slice(0, kept))]
            resized[:both][_along(axis, slice(kept, None))] = 0
            resized[both:] = 0
            self.buffers[name] = resized
        self.room = room


class Prefilled(Protocol):
    """A stream's own cache after its prompt (`generation.PromptBuffers`)."""

    length: int
    buffers: dict[str, np.ndarray]


def capacity_class(positions: int) -> int:
    """The cache capacity of the group a stream that needs `positions` joins: a multiple of 64 up to
    512 (every step attends over the whole capacity, so a short stream should not get a long one), then
    a power of two (fewer, fuller groups for long generations)."""
    if positions <= 512:
        return max(MIN_CAPACITY, -(-positions // MIN_CAPACITY) * MIN_CAPACITY)
    return 1 << (positions - 1).bit_length()


class Group:
    """Streams of one model (and one cache capacity) that decode together, one call per step."""

    def __init__(
        self,
        model: OnnxModel,
        rows: Rows,
        outputs: list[str],
        vocabulary: Sequence[str],
    ) -> None:
        self.model = model
        self.rows = rows
        self.outputs = outputs
        self.vocabulary = vocabulary
        self.streams: list[Stream] = []
        self.tokens = np.zeros((0, 1), np.int64)
        self.joining: list[tuple[Stream, object, int]] = []
        self.resume = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def join(self, stream: Stream, state: object, token: int) -> None:
        """`stream` steps from the next step on, from `state` (its prompt's) and its first token."""
        stream.group = self
        stream.last_token_ns = time.perf_counter_ns()  # its first token, from its prompt
        self.joining.append((stream, state, token))
        if self.task is None:  # a context of its own: the group's runs belong to no one request
            self.resume = asyncio.Event()  # of this event loop (a test may run several, one after another)
            self.task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        self.resume.set()

    async def _run(self) -> None:
        try:
            while True:
                self._settle()
                if not self.streams:
                    return
                moving = np.array([not (s.parked or s.done) for s in self.streams])
                if not moving.any():  # every stream waits for its consumer: so does the group
                    self.resume.clear()
                    await self.resume.wait()
                    continue
                await self._step(moving)
                # Let the consumers write what it made, and new streams in, before the next one.
                for _ in range(TURNS_BETWEEN_STEPS):
                    await asyncio.sleep(0)
        except BaseException as error:  # the group cannot go on (a bug, or shutdown): every stream hears why
            if isinstance(error, Exception):
                logger.exception("decoding group of model '%s' stopped", self.model.name)
            reason = error if isinstance(error, Exception) else RuntimeError("the server is stopping")
            for stream in [*self.streams, *(j[0] for j in self.joining)]:
                stream.fail(reason)
            # Its rows stay as they are (a run may still read them in the pool); the group is idle
            # from here, so `Groups` gives it no stream again.
            self.streams, self.joining = [], []
            if not isinstance(error, Exception):
                raise
        finally:
            self.task = None

    async def _step(self, moving: np.ndarray) -> None:
        streams = self.streams
        try:
            feed = {"tokens": self.tokens, **self.rows.feed()}
            result, timing = await self.model.infer_timed(feed, self.outputs, alone=True, on_loop=True)
        except Exception as error:  # the same call for all of them: each stream gets the error
            for stream in streams:
                stream.fail(error)
            return
        self.rows.advance(result, moving)
        stepped = [s for s, moves in zip(streams, moving.tolist(), strict=True) if moves]
        chosen = sample(result["logits"][:, -1][moving], stepped)
        self.tokens[moving, 0] = chosen
        model, vocabulary, hold = self.model, self.vocabulary, _hold(len(streams))
        now, gaps, stats = time.perf_counter_ns(), model.stats.inter_token, model.stats
        stats.step_rows.observe(len(stepped))
        for stream, token in zip(stepped, chosen.tolist(), strict=True):
            if stream.done:  # left while the step ran
                continue
            gaps.observe((now - stream.last_token_ns) / 1e9)
            stream.last_token_ns = now
            if stream.record is not None:  # each stream's record counts the shared run (trailers, traces)
                stream.record.add_run(model.name, model.version, stats, timing, 1)
            stream.take(vocabulary[token], hold)

    def _settle(self) -> None:
        """Between steps: drop the rows of streams that are done, add the rows of those that joined."""
        gone = [row for row, stream in enumerate(self.streams) if stream.done]
        if gone:
            moves, count = _compaction(len(self.streams), gone)
            for source, target in moves:
                self.streams[target] = self.streams[source]
                self.tokens[target] = self.tokens[source]
            del self.streams[count:]
            self.tokens = self.tokens[:count].copy()
            self.rows.keep(moves, count)
        if self.joining:
            joining, self.joining = self.joining, []
            self.rows.add([state for _, state, _ in joining])
            self.streams += [stream for stream, _, _ in joining]
            self.tokens = np.concatenate([self.tokens, [[token] for _, _, token in joining]]).astype(np.int64)


def _compaction(count: int, gone: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Rows kept past the new end move into the holes the gone rows leave below it (one row copied
    per stream that left, not the whole store)."""
    left = count - len(gone)
    holes = [row for row in gone if row < left]
    gone_set = set(gone)
    sources = [row for row in range(left, count) if row not in gone_set]
    return list(zip(sources, holes, strict=True)), left


def _pending(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Groups:
    """A model's decoding groups: for a recurrent model, and for a Transformer per cache capacity, as
    many groups of at most `max_batch` streams as its streams fill (each group one call per step)."""

    def __init__(self, model: OnnxModel, spec: ModelSpec, max_batch: int) -> None:
        self.model, self.spec, self.max_batch = model, spec, max_batch
        self.by_capacity: dict[int, list[Group]] = {}
        self.streams = 0  # text generations of the model running, from their prompt to their end
        self.by_client: collections.Counter[str] = collections.Counter()  # of them, each client's

    def enter(self, client: str) -> None:
        """One more stream of the model, for `client` ("" when unknown), from its prompt on."""
        self.streams += 1
        self.by_client[client] += 1

    def leave(self, client: str) -> None:
        self.streams -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]

    def alone(self, make: Callable[[], Rows]) -> Group:
        """A group for one stream (--no-step-batching, or a model whose steps cannot share a call)."""
        return self._new(make)

    def group(self, capacity: int, make: Callable[[], Rows]) -> Group:
        """The group of that capacity with the fewest rows, when it has room; else a new one."""
        groups = self.by_capacity.setdefault(capacity, [])
        groups[:] = [g for g in groups if g.task is not None or g.joining]  # drop the idle ones
        emptiest = min(groups, key=lambda g: len(g.streams) + len(g.joining), default=None)
        if emptiest is not None and len(emptiest.streams) + len(emptiest.joining) < self.max_batch:
            return emptiest
        group = self._new(make)
        groups.append(group)
        return group

    def _new(self, make: Callable[[], Rows]) -> Group:
        spec = self.spec
        outputs = ["logits", *spec.state.values(), *(spec.cache.buffers.values() if spec.cache else ())]
        return Group(self.model, make(), outputs, spec.vocabulary)
