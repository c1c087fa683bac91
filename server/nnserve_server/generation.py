"""Generate: text from step language models, images from generators; both as async iterators.

A language model described with `state` in its metadata is a step model: the prompt goes through
once, then every token is one call with one token and the state from the call before, so a token
costs one step whatever the prefix length. A model described with `cache` (a Transformer) keeps its
keys and values in buffers this module sizes once per stream and fills in place.

Each text generation decodes in a task of its own, ahead of its consumer by at most `RUN_AHEAD`
pieces, so a stream's next step never waits for its last piece to be written, and it joins every
shared step. While other generations run beside it, the pieces that piled up during a write leave as
one piece (several tokens to a message when the server is busy); a lone stream keeps one piece per
token. Cancelling the consumer (the client going away) cancels the decoding at its next await.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from nnserve_client.model_spec import AppendCache, ModelSpec

from . import images
from .errors import InvalidInput, Overloaded
from .model import OnnxModel
from .request_record import CURRENT, RequestRecord
from .tasks import require_task
from .text import CharacterCodec

MAX_CACHE_BYTES = 256 << 20  # one stream's key/value buffers


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # length | stop | samples
    prompt_tokens: int = 0
    generated_tokens: int = 0
    samples: int = 0


@dataclass(frozen=True)
class Picture:
    index: int
    pixels: np.ndarray  # uint8 [height, width]
    label: str


def check_sampling(sampling: Sampling, ceiling: int) -> None:
    if sampling.max_tokens > ceiling:
        raise InvalidInput(f"max_tokens is {sampling.max_tokens}; this server allows at most {ceiling}")
    if not sampling.temperature >= 0:
        raise InvalidInput(f"temperature is {sampling.temperature}; it must be >= 0 (0: greedy)")
    if not 0 <= sampling.top_p <= 1:
        raise InvalidInput(f"top_p is {sampling.top_p}; it must be within 0..1")
    if any(not s for s in sampling.stop):
        raise InvalidInput("stop strings must not be empty")


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else sample after temperature, top-k and top-p (nucleus) cuts."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probabilities = np.exp(scaled[order] - scaled[order[0]])
    probabilities /= probabilities.sum()
    if 0 < sampling.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probabilities), sampling.top_p) + 1)
        order, probabilities = order[:keep], probabilities[:keep] / probabilities[:keep].sum()
    return int(order[rng.choice(len(order), p=probabilities)])


def _initial_state(model: OnnxModel, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Zeros for recurrent state, an empty cache for attention: every free dimension is 1 (the batch)
    except a cache's growing axis, which starts at 0."""
    state = {}
    for name in spec.state:
        shape = model.inputs[name].shape
        free = [i for i, d in enumerate(shape) if d == -1]
        dims = [1 if d == -1 else d for d in shape]
        if len(free) > 1:  # [layers, batch, heads, past, head_dim]: the later free axis is the cache
            dims[free[-1]] = 0
        state[name] = np.zeros(dims, np.float32)
    return state


def _cache_shapes(model: OnnxModel, cache: AppendCache, capacity: int) -> dict[str, list[int]]:
    """Each buffer's shape for one stream: batch 1, room for `capacity` positions along the axis."""
    shapes = {}
    for name in cache.buffers:
        if name not in model.inputs:
            raise InvalidInput(f"model '{model.name}' names cache buffer '{name}', which its graph does not take")
        shape = [1 if d == -1 else d for d in model.inputs[name].shape]
        if not 0 <= cache.axis < len(shape):
            raise InvalidInput(f"model '{model.name}' names cache axis {cache.axis} of {len(shape)}-d '{name}'")
        shape[cache.axis] = capacity
        shapes[name] = shape
    return shapes


class _Cache:
    """The buffers of an `AppendCache` model for one stream, sized once for the whole generation;
    each step's new positions are written in place, so no step copies the past."""

    def __init__(self, cache: AppendCache, shapes: dict[str, list[int]]) -> None:
        self.spec = cache
        self.length = 0
        self.buffers = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        # The prompt's call sees buffers of no positions: the same answer as the empty slots (all
        # masked), without scoring them (a 512-character prompt: 38 ms against 84 ms, raw).
        nothing = [slice(None)] * len(next(iter(shapes.values())))
        nothing[cache.axis] = slice(0, 0)
        self._empty = {name: buffer[tuple(nothing)] for name, buffer in self.buffers.items()}

    def feed(self) -> dict[str, np.ndarray]:
        buffers = self.buffers if self.length else self._empty
        return {self.spec.length_input: np.array([self.length], np.int64), **buffers}

    def append(self, result: dict[str, np.ndarray], steps: int) -> None:
        for name, output in self.spec.buffers.items():
            buffer = self.buffers[name]
            where = [slice(None)] * buffer.ndim
            where[self.spec.axis] = slice(self.length, self.length + steps)
            buffer[tuple(where)] = result[output]
        self.length += steps


class MemoryBudget:
    """The bytes all streams' key/value caches and recurrent states may take together (--generation-memory-mb).

    A stream reserves what its buffers need before they are allocated and gives it back when it ends
    (done, stopped, cancelled or failed); one that would pass the budget is refused RESOURCE_EXHAUSTED
    at once, with what to change, so a flood of long generations cannot take the process to its memory
    limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0

    def reserve(self, size: int, model: str) -> None:
        if self.used + size > self.limit:
            raise Overloaded(
                f"generation memory: this stream of model '{model}' needs {size / 2**20:.1f} MiB for its cache and "
                f"state; {self.used / 2**20:.1f} of {self.limit / 2**20:.0f} MiB are in use by {running()} "
                "streams (--generation-memory-mb); retry later, or ask for fewer tokens or a shorter prompt"
            )
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size


async def generate_text(
    model: OnnxModel,
    prompt: str,
    sampling: Sampling,
    budget: MemoryBudget | None = None,
    share_steps: bool = True,
) -> AsyncIterator[TextPiece | Finished]:
    spec = require_task(model, "generate")
    if not spec.vocabulary or not (spec.state or spec.cache):
        raise InvalidInput(
            f"model '{model.name}' generates images, not text: ask for images "
            "(num_samples; --samples in nnserve-client), not a prompt"
        )
    if not prompt:
        raise InvalidInput("the prompt is empty; give at least one character")
    tokens = CharacterCodec(spec.vocabulary).encode(prompt)[np.newaxis]
    state = _initial_state(model, spec)
    cache: _Cache | None = None
    size = 0
    if spec.cache is not None:
        # The last token sampled is never fed back: the cache holds the prompt and max_tokens - 1.
        shapes = _cache_shapes(model, spec.cache, tokens.shape[1] + sampling.max_tokens - 1)
        size = sum(4 * math.prod(shape) for shape in shapes.values())
        if size > MAX_CACHE_BYTES:
            raise InvalidInput(
                f"a {tokens.shape[1]}-character prompt and {sampling.max_tokens} tokens need a {size >> 20} MiB "
                f"cache for model '{model.name}'; at most {MAX_CACHE_BYTES >> 20} MiB: shorten the prompt or "
                "ask for fewer tokens"
            )
    reserved = size + sum(a.nbytes for a in state.values())
    if budget is not None:
        budget.reserve(reserved, model.name)  # before the cache exists: refused, nothing was allocated
    global _generations
    _generations += 1
    try:
        if spec.cache is not None:
            cache = _Cache(spec.cache, shapes)
        steps = _step_batcher(model, spec) if cache is None and share_steps else None
        async for event in _ahead(_decode(model, spec, prompt, sampling, tokens, state, cache, steps)):
            yield event
    finally:
        _generations -= 1
        if budget is not None:
            budget.release(reserved)


RUN_AHEAD = 32  # pieces a generation may decode before its consumer takes them; then it waits
# Prompt tokens per call: a 2,000-character prompt in one call scored 2,000 x 2,000 attention weights per
# head and layer at once (tens of MiB outside the memory budget, kept by onnxruntime's arena).
PREFILL_CHUNK = 256
_generations = 0  # text generations running in this process (more than one: pieces are coalesced)


def running() -> int:
    """Text generations running in this process (for the streams gauge and the budget's message)."""
    return _generations


async def _ahead(events: AsyncIterator[TextPiece | Finished]) -> AsyncIterator[TextPiece | Finished]:
    """`events`, decoded in a task of their own (see the module's docstring): pieces queued while the
    consumer was busy are joined into one when other generations run too. Errors arrive in order,
    after the pieces decoded before them."""
    queued: deque[TextPiece | Finished] = deque()
    arrived, room = asyncio.Event(), asyncio.Event()
    failure: list[BaseException] = []
    finished = False

    async def decode() -> None:
        nonlocal finished
        try:
            async for event in events:
                queued.append(event)
                arrived.set()
                if len(queued) >= RUN_AHEAD:
                    room.clear()
                    await room.wait()
        except Exception as error:  # the consumer raises it, after what was decoded before it
            failure.append(error)
        finally:
            finished = True
            arrived.set()

    task = asyncio.get_running_loop().create_task(decode())  # a copy of this context: the same request record
    try:
        while True:
            if not queued:
                if finished:
                    break
                arrived.clear()
                await arrived.wait()
                continue
            event = queued.popleft()
            if isinstance(event, TextPiece) and _generations > 1 and queued and isinstance(queued[0], TextPiece):
                texts = [event.text]
                while queued and isinstance(queued[0], TextPiece):
                    texts.append(queued.popleft().text)  # type: ignore[union-attr]
                event = TextPiece("".join(texts))
            room.set()
            yield event
        if failure:
            raise failure[0]
    finally:
        task.cancel()


async def _decode(
    model: OnnxModel,
    spec: ModelSpec,
    prompt: str,
    sampling: Sampling,
    tokens: np.ndarray,
    state: dict[str, np.ndarray],
    cache: _Cache | None,
    steps: StepBatcher | None,
) -> AsyncIterator[TextPiece | Finished]:
    codec = CharacterCodec(spec.vocabulary)
    rng = np.random.default_rng(sampling.seed)
    outputs = ["logits", *spec.state.values(), *(spec.cache.buffers.values() if spec.cache else ())]
    produced, emitted = "", 0  # text so far, and how much of it has been sent
    while tokens.shape[1] > PREFILL_CHUNK:  # a long prompt in chunks: bounded activations, and an await each
        chunk, tokens = tokens[:, :PREFILL_CHUNK], tokens[:, PREFILL_CHUNK:]
        result = await model.infer({"tokens": chunk, **state, **(cache.feed() if cache else {})}, outputs[1:])
        state = {name: result[out] for name, out in spec.state.items()}
        if cache is not None:
            cache.append(result, chunk.shape[1])
    for count in range(1, sampling.max_tokens + 1):
        if steps is not None and tokens.shape[1] == 1:  # a decoding step: shared with the other streams'
            result = await steps.step(tokens, state)
        else:
            result = await model.infer({"tokens": tokens, **state, **(cache.feed() if cache else {})}, outputs)
            if steps is None:  # a run inline never suspends: let the consumer and the other streams in
                await asyncio.sleep(0)
        state = {name: result[out] for name, out in spec.state.items()}
        if cache is not None and count < sampling.max_tokens:
            cache.append(result, tokens.shape[1])
        token = next_token(result["logits"][0, -1], sampling, rng)
        produced += codec.decode(token)
        stop_at = min((i for s in sampling.stop if (i := produced.find(s, max(0, emitted - len(s)))) >= 0), default=-1)
        if stop_at >= 0:
            if stop_at > emitted:
                yield TextPiece(produced[emitted:stop_at])
            yield Finished("stop", len(prompt), count)
            return
        # Hold back a tail that may still grow into a stop string; send the rest now.
        safe = len(produced) - _pending(produced, sampling.stop)
        if safe > emitted:
            yield TextPiece(produced[emitted:safe])
            emitted = safe
        tokens = np.array([[token]], dtype=np.int64)
    if len(produced) > emitted:
        yield TextPiece(produced[emitted:])
    yield Finished("length", len(prompt), sampling.max_tokens)


class StepBatcher:
    """Continuous batching of decoding steps for a recurrent language model (LSTM, GRU).

    Every stream asks for its next step here; the steps asked for in one turn of the event loop run as
    one onnxruntime call, their tokens stacked on the batch axis and their states on the state's batch
    axis, and each stream gets its own row back. Streams join and leave between steps: a new one's
    prompt runs on its own, then its steps join the others'. N streams then cost about one call per
    step, not N. (The Transformer's cache is filled in place per stream, so its steps run alone.)"""

    def __init__(self, model: OnnxModel, spec: ModelSpec) -> None:
        self._model = model
        self._state = dict(spec.state)  # state input -> the output that feeds it next step
        self._axes = {name: model.inputs[name].shape.index(-1) for name in spec.state}  # each state's batch axis
        self._outputs = ["logits", *spec.state.values()]
        self._waiting: list[_Step] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()
        self.runs = 0  # calls made, and the steps they carried (for tests and the curious)
        self.steps = 0

    async def step(self, tokens: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        self._waiting.append(_Step(tokens, state, future, CURRENT.get()))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        waiting, self._waiting, self._scheduled = self._waiting, [], False
        live = [w for w in waiting if not w.future.done()]  # a stream that stopped listening is dropped
        loop = asyncio.get_running_loop()
        for start in range(0, len(live), MAX_STEP_BATCH):
            # A context of its own: the shared run belongs to no one stream's request record.
            task = loop.create_task(self._run(live[start : start + MAX_STEP_BATCH]), context=contextvars.Context())
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Step]) -> None:
        try:
            if len(batch) == 1:
                feed = {"tokens": batch[0].tokens, **batch[0].state}
            else:
                feed = {"tokens": np.concatenate([b.tokens for b in batch])}
                for name, axis in self._axes.items():
                    feed[name] = np.concatenate([b.state[name] for b in batch], axis=axis)
            result, timing = await self._model.infer_timed(feed, self._outputs)
        except BaseException as error:  # the same call for all of them: each stream gets the error
            for step in batch:
                if not step.future.done():
                    step.future.set_exception(error)
            return
        self.runs += 1
        self.steps += len(batch)
        model = self._model
        for row, step in enumerate(batch):
            if step.record is not None:  # each stream's record counts the shared run (trailers, traces)
                step.record.add_run(model.name, model.version, model.stats, timing, 1)
            if step.future.done():
                continue
            mine = {"logits": result["logits"][row : row + 1]}
            for name, out in self._state.items():
                mine[out] = np.take(result[out], [row], axis=self._axes[name])
            step.future.set_result(mine)


@dataclass
class _Step:
    """One stream's request for its next decoding step."""

    tokens: np.ndarray
    state: dict[str, np.ndarray]
    future: asyncio.Future[dict[str, np.ndarray]]
    record: RequestRecord | None


MAX_STEP_BATCH = 64  # streams whose steps share one call
_step_batchers: weakref.WeakKeyDictionary[OnnxModel, StepBatcher] = weakref.WeakKeyDictionary()


def _step_batcher(model: OnnxModel, spec: ModelSpec) -> StepBatcher | None:
    """The model's step batcher, when its state has a batch axis to stack on (every recurrent LM here)."""
    if not spec.state or any(-1 not in model.inputs[name].shape for name in spec.state):
        return None
    batcher = _step_batchers.get(model)
    if batcher is None:
        batcher = _step_batchers[model] = StepBatcher(model, spec)
    return batcher


def _pending(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


async def generate_images(
    model: OnnxModel, count: int, seed: int | None, latent: np.ndarray | None, label: int | None
) -> AsyncIterator[Picture | Finished]:
    spec = require_task(model, "generate")
    if spec.vocabulary:
        raise InvalidInput(f"model '{model.name}' generates text: send a prompt")
    latent_dim = int(spec.extra.get("latent_dim", "0"))
    rng = np.random.default_rng(seed)
    if latent is not None:
        if latent.ndim != 2 or latent.shape[1] != latent_dim:
            raise InvalidInput(f"latent has shape {list(latent.shape)}; model '{model.name}' takes [n, {latent_dim}]")
        latents = latent.astype(np.float32)
    else:
        latents = rng.standard_normal((count, latent_dim)).astype(np.float32)
    conditional = spec.extra.get("condition") == "label"
    if label is not None and not (conditional and 0 <= label < len(spec.labels)):
        raise InvalidInput(
            f"label {label} is not one of the labels of model '{model.name}', 0..{len(spec.labels) - 1}"
            if conditional
            else f"model '{model.name}' is not conditional: leave label unset"
        )
    output = next(iter(model.outputs))
    for index, z in enumerate(latents):
        feed = {"z": z[np.newaxis]}
        drawn = ""
        if conditional:
            chosen = label if label is not None else int(rng.integers(len(spec.labels)))
            feed["label"] = np.array([chosen], dtype=np.int64)
            drawn = spec.labels[chosen]
        (image,) = (await model.infer(feed, [output])).values()
        yield Picture(index, images.to_uint8(image[0, 0], 1.0), drawn)
    yield Finished("samples", samples=len(latents))
