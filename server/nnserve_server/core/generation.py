"""Generate: text from step language models, images from generators; both as async iterators.

A language model described with `state` in its metadata is a step model: the prompt goes through
once, then every token is one call with one token and the state from the call before, so a token
costs one step whatever the prefix length. A model described with `cache` (a Transformer) keeps its
keys and values in buffers the server sizes before they exist and fills in place.

`Generations` holds every text generation of the process: it admits a stream (the model's and the
client's share of streams, the memory budget) and runs its prompt here, alone; then the stream decodes
in its model's shared decoding group (`decoding`): one onnxruntime call per step for every stream of the
model. While other generations run, the pieces that piled up during a consumer's write leave as one
piece (several tokens to a message when the server is busy); a lone stream keeps one piece per token.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from nnserve_contract.model_spec import AppendCache, ModelSpec
from nnserve_server.core import decoding, images
from nnserve_server.core.errors import InvalidInput, Overloaded
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.request_record import CURRENT, RequestRecord
from nnserve_server.core.sampling import Sampling, check_sampling, sample
from nnserve_server.core.tasks import Limits, require_task
from nnserve_server.core.text import character_codec
from nnserve_server.settings import Settings

MAX_STREAM_CACHE_BYTES = 256 << 20  # one stream's key/value buffers


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


class PromptBuffers:
    """The key/value buffers of an `AppendCache` model for one stream's prompt, sized for the prompt;
    each chunk's new positions are written in place. The stream's decoding group copies them into its row."""

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

    def reserve(self, size: int, model: str, streams: int) -> None:
        """`streams`: how many are running (for the refusal's message)."""
        if self.used + size > self.limit:
            raise Overloaded(
                f"generation memory: this stream of model '{model}' needs {size / 2**20:.1f} MiB for its cache and "
                f"state; {self.used / 2**20:.1f} of {self.limit / 2**20:.0f} MiB are in use by {streams} "
                "streams (--generation-memory-mb); retry later, or ask for fewer tokens or a shorter prompt"
            )
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True)
class GenerationSettings:
    """How text generations decode and how many run (--step-batching, --generation-max-batch,
    --generation-max-streams, --generation-max-streams-per-client, --generation-memory-mb)."""

    share_steps: bool = True  # concurrent streams of a model step in one call (continuous batching)
    max_batch: int = 64  # streams in one decoding call; more make more groups (calls) per step
    max_streams: int = 256  # text generations of one model at once; beyond: RESOURCE_EXHAUSTED
    max_streams_per_client: int = 64  # of them, one client's (0: no share)
    memory_bytes: int = 1 << 62  # every stream's cache and state together; beyond: RESOURCE_EXHAUSTED

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationSettings:
        return cls(
            settings.step_batching,
            settings.generation_max_batch,
            settings.generation_max_streams,
            settings.generation_max_streams_per_client,
            int(settings.generation_memory_mb * 2**20),
        )


@dataclass(frozen=True)
class _Admitted:
    """What a stream was let in with: its group's cache capacity, the bytes it reserved, its client."""

    capacity: int
    reserved: int
    client: str


class Generations:
    """Every text generation of this process: admission (a model's streams, each client's share of them,
    the memory budget), the prompt, and the model's decoding groups that the stream then joins. The server
    owns one for both APIs; how many run is counted by the groups, never kept beside them."""

    def __init__(self, settings: GenerationSettings = GenerationSettings()) -> None:
        self.settings = settings
        self.budget = MemoryBudget(settings.memory_bytes)
        self.groups: weakref.WeakKeyDictionary[OnnxModel, decoding.Groups] = weakref.WeakKeyDictionary()

    @property
    def running(self) -> int:
        """Text generations running, from their prompt to their end (the streams gauge; more than one:
        pieces are coalesced)."""
        return sum(groups.streams for groups in self.groups.values())

    async def text(
        self, model: OnnxModel, prompt: str, sampling: Sampling, *, limits: Limits | None = None
    ) -> AsyncIterator[TextPiece | Finished]:
        """The text `model` writes after `prompt`; with `limits`, the prompt and sampling are checked against them."""
        spec, tokens = _prompt(model, prompt, sampling, limits)
        groups = self.groups.get(model)
        if groups is None:
            max_batch = model.config.generation_max_batch or self.settings.max_batch
            groups = self.groups[model] = decoding.Groups(model, spec, max_batch)
        shared = self.settings.share_steps and _batchable(model, spec)
        record = CURRENT.get()
        state = _initial_state(model, spec)
        admitted = self._admit(model, spec, groups, tokens.shape[1], sampling, shared, record, state)
        stream = decoding.Stream(sampling, record)
        try:
            cache = None
            if spec.cache is not None:
                cache = PromptBuffers(spec.cache, _cache_shapes(model, spec.cache, tokens.shape[1]))
            logits, state = await _prefill(model, spec, tokens, state, cache)
            (token,) = sample(logits, [stream]).tolist()
            stream.take(spec.vocabulary[token])
            if not stream.done:
                rows = _rows(model, spec, admitted.capacity)
                group = groups.group(admitted.capacity, rows) if shared else groups.alone(rows)
                group.join(stream, cache if cache is not None else state, token)
            del cache, state  # the group has copied what it needs
            async for event in self._events(stream, len(prompt)):
                yield event
        finally:
            stream.left = True
            if stream.group is not None:
                stream.group.resume.set()  # a group waiting on parked streams drops this one's row now
            groups.leave(admitted.client)
            self.budget.release(admitted.reserved)

    def _admit(
        self,
        model: OnnxModel,
        spec: ModelSpec,
        groups: decoding.Groups,
        prompt_tokens: int,
        sampling: Sampling,
        shared: bool,
        record: RequestRecord | None,
        state: dict[str, np.ndarray],
    ) -> _Admitted:
        """Let one more stream of `model` in, or refuse it (Overloaded, InvalidInput) before anything is
        allocated: the model's streams, the client's share of them, the cache's size, the memory budget."""
        config = model.config  # the model's config.pbtxt may set its own limits over the server's
        max_streams = config.generation_max_streams or self.settings.max_streams
        if groups.streams >= max_streams:
            knob = (
                "generation_max_streams in its config.pbtxt"
                if config.generation_max_streams
                else "--generation-max-streams"
            )
            raise Overloaded(
                f"model '{model.name}' is generating {groups.streams} texts, as many as this server runs at once "
                f"({knob}); retry later"
            )
        client = record.client() if record is not None else ""
        share = self.settings.max_streams_per_client
        if share and client and groups.by_client[client] >= share:
            raise Overloaded(
                f"model '{model.name}' is generating {groups.by_client[client]} texts for {client}, its share of "
                f"the server (--generation-max-streams-per-client {share}); retry when one ends"
            )
        capacity, reserved = _cache_room(model, spec, prompt_tokens, sampling, shared)
        if not reserved:  # a recurrent model: its state
            reserved = sum(a.nbytes for a in state.values())
        self.budget.reserve(reserved, model.name, self.running)  # before the cache exists: nothing was allocated
        groups.enter(client)
        return _Admitted(capacity, reserved, client)

    async def _events(self, stream: decoding.Stream, prompt_tokens: int) -> AsyncIterator[TextPiece | Finished]:
        pieces = stream.pieces
        while True:
            if pieces and stream.due():
                parked = stream.parked
                if len(pieces) > 1 and self.running > 1:  # others run too: what piled up leaves at once
                    text = "".join(pieces)
                    pieces.clear()
                else:
                    text = pieces.popleft()
                if parked:
                    stream.took_pieces()
                yield TextPiece(text)
                continue
            if stream.failure is not None:
                raise stream.failure
            if stream.end:
                yield Finished(stream.end, prompt_tokens, stream.count)
                return
            stream.ready.clear()
            await stream.ready.wait()


def _prompt(model: OnnxModel, prompt: str, sampling: Sampling, limits: Limits | None) -> tuple[ModelSpec, np.ndarray]:
    """The model's spec and the prompt's tokens [1, n]; InvalidInput for what cannot be generated."""
    if limits is not None:
        if len(prompt) > limits.max_text_chars:
            raise InvalidInput(f"the prompt has {len(prompt)} characters; at most {limits.max_text_chars}")
        check_sampling(sampling, limits.max_tokens)
    spec = require_task(model, "generate")
    if not spec.vocabulary or not (spec.state or spec.cache):
        raise InvalidInput(
            f"model '{model.name}' generates images, not text: ask for images "
            "(num_samples; --samples in nnserve-client), not a prompt"
        )
    if not prompt:
        raise InvalidInput("the prompt is empty; give at least one character")
    return spec, character_codec(spec.vocabulary).encode(prompt)[np.newaxis]


def _cache_room(
    model: OnnxModel, spec: ModelSpec, prompt_tokens: int, sampling: Sampling, shared: bool
) -> tuple[int, int]:
    """For a cache model: the capacity of the group its stream joins, and the bytes of its row there and
    of its prompt's own buffers; (0, 0) for a recurrent model. InvalidInput past MAX_STREAM_CACHE_BYTES."""
    if spec.cache is None:
        return 0, 0
    cache = spec.cache

    def size(positions: int) -> int:
        return sum(4 * math.prod(shape) for shape in _cache_shapes(model, cache, positions).values())

    # The last token sampled is never fed back: the cache holds the prompt and max_tokens - 1.
    positions = prompt_tokens + sampling.max_tokens - 1
    needed = size(positions)
    if needed > MAX_STREAM_CACHE_BYTES:
        raise InvalidInput(
            f"a {prompt_tokens}-character prompt and {sampling.max_tokens} tokens need a {needed >> 20} MiB "
            f"cache for model '{model.name}'; at most {MAX_STREAM_CACHE_BYTES >> 20} MiB: shorten the prompt or "
            "ask for fewer tokens"
        )
    capacity = decoding.capacity_class(positions) if shared else positions  # the row it takes in its group
    row = size(capacity)
    if row > MAX_STREAM_CACHE_BYTES:  # the class rounds up past the cap: exactly what it needs instead
        capacity, row = positions, needed
    return capacity, row + size(prompt_tokens)


# Prompt tokens per call: a 2,000-character prompt in one call scored 2,000 x 2,000 attention weights per
# head and layer at once (tens of MiB outside the memory budget, kept by onnxruntime's arena).
PREFILL_CHUNK = 256


async def _prefill(
    model: OnnxModel, spec: ModelSpec, tokens: np.ndarray, state: dict[str, np.ndarray], cache: PromptBuffers | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The prompt, alone, into the stream's own state or cache: the last position's logits [1, vocab],
    and the state after it. A long prompt goes in chunks (bounded activations, and an await each)."""
    outputs = ["logits", *spec.state.values(), *(spec.cache.buffers.values() if spec.cache else ())]
    while True:
        chunk, tokens = tokens[:, :PREFILL_CHUNK], tokens[:, PREFILL_CHUNK:]
        last = tokens.shape[1] == 0
        feed = {"tokens": chunk, **state, **(cache.feed() if cache else {})}
        # Alone: prompts merged by the batcher would score rows x chunk x prompt attention weights at once
        # (40 long prompts took the server 1 GiB past its generation budget).
        result = await model.infer(feed, outputs if last else outputs[1:], alone=True)
        state = {name: result[out] for name, out in spec.state.items()}
        if cache is not None:
            cache.append(result, chunk.shape[1])
        if last:
            return result["logits"][:, -1], state


def _batchable(model: OnnxModel, spec: ModelSpec) -> bool:
    """Whether the model's steps can share a call: every recurrent state has a batch axis, or the cache
    model takes one filled length per row (the exporters' step models do; older ones took one length)."""
    if spec.cache is not None:
        length = model.inputs[spec.cache.length_input].shape
        return list(length) == [-1] and all(model.inputs[name].shape[0] == -1 for name in spec.cache.buffers)
    return bool(spec.state) and all(-1 in model.inputs[name].shape for name in spec.state)


def _rows(model: OnnxModel, spec: ModelSpec, capacity: int) -> Callable[[], decoding.Rows]:
    """How to make the rows of a new group: recurrent states, or key/value buffers of `capacity` positions."""
    if spec.cache is not None:
        cache = spec.cache
        return lambda: decoding.CacheRows(cache, _cache_shapes(model, cache, capacity))
    return lambda: decoding.StateRows(model, spec)


async def generate_images(
    model: OnnxModel, count: int, seed: int | None, latent: np.ndarray | None, label: int | None, limits: Limits
) -> AsyncIterator[Picture | Finished]:
    if count > limits.max_samples:
        raise InvalidInput(f"num_samples is {count}; this server allows at most {limits.max_samples}")
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
