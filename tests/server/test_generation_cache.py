"""The Transformer's key/value cache in the server: buffers sized once per stream, filled in place,
and refused before they are allocated when a stream would need too much memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from nnserve_server.core import generation
from nnserve_server.core.batcher import Batcher, BatchPolicy
from nnserve_server.core.errors import InvalidInput
from nnserve_server.core.generation import Finished, Generations, TextPiece
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.sampling import Sampling
from nnserve_server.core.serving_config import serving_config
from nnserve_server.settings import Settings


@pytest.fixture(scope="module")
def transformer(fast_zoo: tuple[Path, list[object]]) -> OnnxModel:
    folder = fast_zoo[0] / "chars-transformer"
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(folder, settings, runtime.cpus)
    return OnnxModel("chars-transformer", "1", folder / "1" / "model.onnx", runtime, config)


def _generate(model: OnnxModel, prompt: str, max_tokens: int) -> str:
    async def collect() -> str:
        sampling = Sampling(max_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=())
        text = ""
        async for event in Generations().text(model, prompt, sampling):
            if isinstance(event, TextPiece):
                text += event.text
            else:
                assert isinstance(event, Finished)
                assert event.generated_tokens == max_tokens
        return text

    return asyncio.run(collect())


def test_the_buffers_filled_in_place_hold_exactly_the_prefix(transformer: OnnxModel) -> None:
    """The prompt, then one token per call through the model's own path, each call's positions written
    into the stream's buffers: the logits are those of the whole sequence in one call."""
    spec = transformer.spec
    assert spec is not None
    assert spec.cache is not None
    cache_spec = spec.cache
    tokens = np.random.default_rng(0).integers(0, len(spec.vocabulary), (1, 9)).astype(np.int64)
    outputs = ["logits", *cache_spec.buffers.values()]

    async def stepped() -> list[np.ndarray]:
        cache = generation.PromptBuffers(cache_spec, generation._cache_shapes(transformer, cache_spec, 9))
        logits = []
        axis = cache_spec.axis
        assert {buffer.shape[axis] for buffer in list(cache.feed().values())[1:]} == {0}  # the prompt scores no slots
        for start, end in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
            if start:
                assert {buffer.shape[axis] for buffer in list(cache.feed().values())[1:]} == {9}
            result = await transformer.infer({"tokens": tokens[:, start:end], **cache.feed()}, outputs)
            cache.append(result, end - start)
            logits.append(result["logits"])
        assert cache.length == 9
        return logits

    shapes = generation._cache_shapes(transformer, cache_spec, 0)
    empty = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    (whole,) = transformer.session.run(["logits"], {"tokens": tokens, cache_spec.length_input: np.array([0]), **empty})
    np.testing.assert_allclose(np.concatenate(asyncio.run(stepped()), axis=1), whole, rtol=1e-4, atol=1e-4)


def test_greedy_generation_runs_to_max_tokens(transformer: OnnxModel) -> None:
    assert len(_generate(transformer, "The cache ", 12)) == 12


def test_a_cache_too_large_is_refused_before_it_is_allocated(
    transformer: OnnxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[object] = []
    monkeypatch.setattr(generation, "PromptBuffers", lambda *args: built.append(args))
    monkeypatch.setattr(generation, "MAX_STREAM_CACHE_BYTES", 1 << 10)
    with pytest.raises(InvalidInput, match="MiB cache for model 'chars-transformer'; at most 0 MiB"):
        _generate(transformer, "a prompt long enough", 100)
    assert built == []  # refused before any buffer was made


@pytest.mark.parametrize("name", ["chars-transformer", "chars-lstm"])
def test_a_long_prompt_fed_in_chunks_gives_the_text_of_one_call(
    fast_zoo: tuple[Path, list[object]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of several tokens after a filled cache (or a carried state) are the same sequence."""
    folder = fast_zoo[0] / name
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    model = OnnxModel(name, "1", folder / "1" / "model.onnx", runtime, serving_config(folder, settings, runtime.cpus))
    prompt = ("def main():\n    return the value of it " * 20)[:700]
    chunked = _generate(model, prompt, 16)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 10**6)
    whole = _generate(model, prompt, 16)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 7)  # chunks that cross no boundary of the other runs
    assert _generate(model, prompt, 16) == chunked == whole
    model.close()


@pytest.mark.fast
def test_requests_submitted_alone_never_share_a_run() -> None:
    """What keeps concurrent long prompts from being scored in one run (their activations grow with
    the rows, outside the generation budget); the others still share."""
    runs: list[int] = []

    def run(outputs: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        runs.append(len(feed["x"]))
        return [feed["x"] * 2]

    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, max_queue_size=16, instances=1, inline_ns=0)
    batcher = Batcher("alone", run, policy)

    async def submit_all() -> list[np.ndarray]:
        rows = [np.full((1, 2), i, np.float32) for i in range(6)]
        futures = [batcher.submit({"x": r}, ("y",), 1, None, alone=i < 3) for i, r in enumerate(rows)]
        return [(await f)[0][0] for f in futures]

    answers = asyncio.run(submit_all())
    batcher.close()
    assert [float(a[0, 0]) for a in answers] == [0, 2, 4, 6, 8, 10]  # each its own rows back
    assert sorted(runs) == [1, 1, 1, 3], runs  # three alone, and the other three in one run


@pytest.mark.fast
@pytest.mark.parametrize("axis", [2, 1])
def test_a_step_writes_each_moving_rows_keys_at_its_own_length(axis: int) -> None:
    """The stacked buffers of a group: [rows, heads, capacity, width] (the exporters' layout, one flat
    index) and another layout (capacity on axis 1); a row sitting the step out is left as it was."""
    from nnserve_contract.model_spec import AppendCache
    from nnserve_server.core.decoding import CacheRows

    spec = AppendCache({"past": "new"}, "length", axis=axis)
    row_shape = [1, 2, 8, 3] if axis == 2 else [1, 8, 2, 3]
    caches = CacheRows(spec, {"past": row_shape})
    prompts = []
    for length in (5, 0, 7):
        own = generation.PromptBuffers(spec, {"past": [1, *row_shape[1:]]})
        own.length = length
        own.buffers["past"][:] = np.random.default_rng(length).standard_normal(row_shape)
        prompts.append(own)
    caches.add(prompts)
    before = caches.buffers["past"].copy()
    new_shape = [3, *row_shape[1:]]
    new_shape[axis] = 1
    new = np.random.default_rng(9).standard_normal(new_shape).astype(np.float32)
    caches.advance({"new": new}, np.array([True, True, False]))
    after = caches.buffers["past"]
    assert caches.lengths.tolist() == [6, 1, 7]
    for row, at in ((0, 5), (1, 0)):
        written = np.take(after[row], at, axis=axis - 1)
        np.testing.assert_array_equal(written, np.take(new[row], 0, axis=axis - 1))
        untouched = np.delete(after[row], at, axis=axis - 1)
        np.testing.assert_array_equal(untouched, np.delete(before[row], at, axis=axis - 1))
    np.testing.assert_array_equal(after[2], before[2])  # sat the step out
    # Joining copied each prompt's filled positions, and nothing past them.
    filled = np.take(before[0], range(5), axis=axis - 1)
    np.testing.assert_array_equal(filled, np.take(prompts[0].buffers["past"][0], range(5), axis=axis - 1))
    assert not np.take(before[0], range(5, 8), axis=axis - 1).any()


@pytest.mark.fast
def test_a_groups_buffers_grow_with_its_longest_row_and_shrink_once_it_left() -> None:
    """The room a step attends over follows the longest row, `ROOM` positions at a time, up to the
    capacity the streams reserved; what the rows filled survives every change of room."""
    from nnserve_contract.model_spec import AppendCache
    from nnserve_server.core.decoding import ROOM, CacheRows

    spec = AppendCache({"past": "new"}, "length", axis=2)
    capacity = 4 * ROOM
    caches = CacheRows(spec, {"past": [1, 2, capacity, 3]})
    rng = np.random.default_rng(0)
    prompts = []
    for length in (3, ROOM + 5):
        own = generation.PromptBuffers(spec, {"past": [1, 2, length, 3]})
        own.buffers["past"][:] = rng.standard_normal(own.buffers["past"].shape)
        own.length = length
        prompts.append(own)
    caches.add(prompts)
    assert caches.room == 2 * ROOM  # room for the longer prompt's next slot, not the capacity
    expected = [list(np.moveaxis(p.buffers["past"][0], 1, 0)) for p in prompts]  # per row: [heads, width] a position
    while caches.lengths[1] < 3 * ROOM + 1:
        assert caches.feed()["past"].shape[2] == caches.room > caches.lengths.max()
        new = rng.standard_normal((2, 2, 1, 3)).astype(np.float32)
        caches.advance({"new": new}, np.array([True, True]))
        for row in (0, 1):
            expected[row].append(new[row, :, 0])
    caches.feed()
    assert caches.room == capacity  # grew twice, never past the capacity
    for row in (0, 1):
        filled = caches.buffers["past"][row][:, : caches.lengths[row]]
        np.testing.assert_array_equal(filled, np.stack(expected[row], axis=1))
    caches.keep([], 1)  # the longer row (the last) leaves; the short one stays
    assert caches.lengths.tolist() == [2 * ROOM - 1]
    assert caches.room == 2 * ROOM  # two ROOMs below the capacity: shrunk, with its row intact
    np.testing.assert_array_equal(caches.buffers["past"][0][:, : caches.lengths[0]], np.stack(expected[0], axis=1))
