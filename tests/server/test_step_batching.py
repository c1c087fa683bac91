"""Continuous batching of decoding steps: concurrent generations of a language model share one
onnxruntime call per step, and each stream's text is exactly what it would be alone."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from nnserve_server.core import decoding, sampling
from nnserve_server.core.errors import Overloaded
from nnserve_server.core.generation import Generations, GenerationSettings, TextPiece
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.sampling import Sampling
from nnserve_server.core.serving_config import serving_config
from nnserve_server.settings import Settings

PROMPTS = [("The ", 1), ("def ", 2), ("a", 3), ("Return the", 4), ("x = ", 5), ("if", 6)]


def _load(folder: Path) -> OnnxModel:
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(folder, settings, runtime.cpus)
    return OnnxModel(folder.name, "1", folder / "1" / "model.onnx", runtime, config, settings.inline_run_us)


async def _text(
    model: OnnxModel, prompt: str, seed: int, temperature: float = 0.9, generations: Generations | None = None
) -> str:
    """`generations`: the streams that share decoding groups share it (None: a stream alone)."""
    top_k, top_p = (0, 1.0) if seed % 2 else (5, 0.9)  # half the streams with both cuts
    sampling = Sampling(24, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=())
    events = (generations or Generations()).text(model, prompt, sampling)
    return "".join([e.text async for e in events if isinstance(e, TextPiece)])


@pytest.mark.parametrize("name", ["chars-lstm", "chars-gru", "chars-transformer"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_concurrent_streams_share_each_step_and_keep_their_own_text(
    fast_zoo: tuple[Path, list[object]], name: str, temperature: float
) -> None:
    model = _load(fast_zoo[0] / name)
    alone = [asyncio.run(_text(model, p, s, temperature)) for p, s in PROMPTS]  # one at a time: nothing to share
    assert all(len(text) == 24 for text in alone)

    async def together() -> list[str]:
        generations = Generations()
        return list(await asyncio.gather(*(_text(model, p, s, temperature, generations) for p, s in PROMPTS)))

    steps = model.stats.step_rows  # one observation per decoding call, of the streams it stepped
    before_runs, before_steps = steps.count, steps.sum
    shared = asyncio.run(together())
    runs, stepped = steps.count - before_runs, steps.sum - before_steps
    assert shared == alone  # the same text, row by row, as each stream alone (same seeds)
    assert stepped == 23 * len(PROMPTS)  # every token after the prompt's own was a shared step
    assert runs <= stepped / 3, (runs, stepped)  # and they shared calls: six streams, about one call a step
    model.close()


def test_without_step_batching_the_text_is_the_same(fast_zoo: tuple[Path, list[object]]) -> None:
    model = _load(fast_zoo[0] / "chars-transformer")
    unshared = Generations(GenerationSettings(share_steps=False))

    async def both() -> tuple[list[str], list[str]]:
        generations = Generations()
        shared = asyncio.gather(*(_text(model, p, s, 0.0, generations) for p, s in PROMPTS))
        apart = asyncio.gather(*(_text(model, p, s, 0.0, unshared) for p, s in PROMPTS))
        return list(await shared), list(await apart)

    shared, apart = asyncio.run(both())
    assert shared == apart
    assert model.stats.step_rows.sum == 2 * 23 * len(PROMPTS)
    assert model.stats.step_rows.count >= 23 * len(PROMPTS)  # the unshared streams: a call for every step of each
    model.close()


def test_a_long_generation_gets_a_group_of_its_own_capacity(fast_zoo: tuple[Path, list[object]]) -> None:
    """A stream needing many cache positions does not make the short ones attend over its length."""
    model = _load(fast_zoo[0] / "chars-transformer")
    long_prompt = "def main():\n    return x " * 24  # 600 characters: the 1024 class; the others the 64 one
    seen: set[int] = set()
    generations = Generations()

    async def run() -> list[str]:
        async def watch() -> None:
            while True:
                groups = generations.groups.get(model)
                if groups is not None:
                    seen.update(capacity for capacity, items in groups.by_capacity.items() if items)
                await asyncio.sleep(0)

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            prompts = [*PROMPTS, (long_prompt, 7)]
            return list(await asyncio.gather(*(_text(model, p, s, 0.0, generations) for p, s in prompts)))
        finally:
            watcher.cancel()

    together = asyncio.run(run())
    assert together[:-1] == [asyncio.run(_text(model, p, s, 0.0)) for p, s in PROMPTS]
    assert together[-1] == asyncio.run(_text(model, long_prompt, 7, 0.0))
    assert {64, 1024} <= seen, seen
    assert decoding.capacity_class(27) == 64
    assert decoding.capacity_class(131) == 192
    assert decoding.capacity_class(600 + 23) == 1024
    model.close()


def test_streams_beyond_the_model_limit_are_refused(fast_zoo: tuple[Path, list[object]]) -> None:
    model = _load(fast_zoo[0] / "chars-lstm")
    two = Generations(GenerationSettings(max_streams=2))

    async def three() -> list[object]:
        return list(
            await asyncio.gather(*(_text(model, p, s, 0.0, two) for p, s in PROMPTS[:3]), return_exceptions=True)
        )

    outcomes = asyncio.run(three())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert len(refused) == 1, outcomes
    assert "--generation-max-streams" in str(refused[0])
    assert asyncio.run(_text(model, "The ", 1, 0.0, two))  # the limit counts running streams only
    model.close()


def test_a_models_config_sets_its_own_generation_limits(fast_zoo: tuple[Path, list[object]], tmp_path: Path) -> None:
    folder = tmp_path / "chars-lstm"
    shutil.copytree(fast_zoo[0] / "chars-lstm", folder)
    (folder / "config.pbtxt").write_text(
        'parameters { key: "generation_max_batch" value { string_value: "2" } }\n'
        'parameters { key: "generation_max_streams" value { string_value: "4" } }\n'
    )
    model = _load(folder)  # the server-wide defaults (64 a call, 256 at once) give way to the file's

    generations = Generations()

    async def five() -> list[object]:
        texts = (_text(model, p, s, 0.0, generations) for p, s in PROMPTS[:5])
        return list(await asyncio.gather(*texts, return_exceptions=True))

    outcomes = asyncio.run(five())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert len(refused) == 1, outcomes
    assert "generation_max_streams in its config.pbtxt" in str(refused[0])
    assert generations.groups[model].max_batch == 2
    steps = model.stats.step_rows
    assert steps.count >= steps.sum / 2  # two streams a call at most: two calls a step
    model.close()


def test_a_step_holds_at_most_max_batch_streams(fast_zoo: tuple[Path, list[object]]) -> None:
    model = _load(fast_zoo[0] / "chars-gru")
    alone = [asyncio.run(_text(model, p, s)) for p, s in PROMPTS]

    pairs = Generations(GenerationSettings(max_batch=2))

    async def together() -> list[str]:
        return list(await asyncio.gather(*(_text(model, p, s, 0.9, pairs) for p, s in PROMPTS)))

    before_runs, before_steps = model.stats.step_rows.count, model.stats.step_rows.sum
    assert asyncio.run(together()) == alone
    assert pairs.groups[model].max_batch == 2
    runs, stepped = model.stats.step_rows.count - before_runs, model.stats.step_rows.sum - before_steps
    assert stepped == 23 * len(PROMPTS)
    assert runs >= stepped / 2  # three groups of two: three calls a step
    model.close()


@pytest.mark.fast
def test_sampling_all_rows_at_once_keeps_each_streams_cuts() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32)
    settings = [(0.0, 0, 1.0), (1.0, 1, 1.0), (5.0, 3, 1.0), (1.0, 0, 1e-9)]
    streams = [decoding.Stream(Sampling(10, t, k, p, seed=i, stop=()), None) for i, (t, k, p) in enumerate(settings)]
    best = logits.argmax(axis=1)
    top3 = np.argsort(-logits, axis=1)[:, :3]
    for _ in range(200):
        chosen = sampling.sample(logits, streams)
        assert chosen[0] == best[0]  # greedy
        assert chosen[1] == best[1]  # top_k 1
        assert chosen[2] in top3[2]  # a hot temperature, still inside its top 3
        assert chosen[3] == best[3]  # a nucleus smaller than the likeliest token
    hot = [decoding.Stream(Sampling(10, 5.0, 0, 1.0, seed=1, stop=()), None)]
    assert len({int(sampling.sample(logits[:1], hot)[0]) for _ in range(300)}) > 20  # no cut: spread wide


async def _pieces(
    model: OnnxModel, prompt: str, seed: int, pause_s: float, generations: Generations | None = None
) -> list[str]:
    """A consumer that takes `pause_s` over each piece (a slow client, or a busy server's writes)."""
    sampling = Sampling(24, temperature=0.9, top_k=0, top_p=1.0, seed=seed, stop=())
    pieces = []
    async for event in (generations or Generations()).text(model, prompt, sampling):
        if isinstance(event, TextPiece):
            pieces.append(event.text)
            await asyncio.sleep(pause_s)
    return pieces


def test_busy_streams_get_several_tokens_a_piece_and_a_lone_stream_one(fast_zoo: tuple[Path, list[object]]) -> None:
    model = _load(fast_zoo[0] / "chars-lstm")
    prompts = [("The ", 1), ("def ", 2), ("a", 3), ("x = ", 4)]
    alone = [asyncio.run(_pieces(model, p, s, 0.004)) for p, s in prompts]
    assert all(len(pieces) == 24 for pieces in alone)  # alone: one piece per token, however slow the consumer

    async def together() -> list[list[str]]:
        generations = Generations()
        return list(await asyncio.gather(*(_pieces(model, p, s, 0.004, generations) for p, s in prompts)))

    shared = asyncio.run(together())
    assert ["".join(p) for p in shared] == ["".join(p) for p in alone]  # the same text
    # Decoding ran ahead while each consumer paused: the pieces that piled up left together.
    assert sum(len(p) for p in shared) < sum(len(p) for p in alone) / 2, [len(p) for p in shared]
    model.close()


def test_a_consumer_that_just_wrote_waits_for_its_hold_before_writing_again(
    fast_zoo: tuple[Path, list[object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four busy streams hold two tokens a piece: a consumer back from a write finds one new token and
    waits for the next, rather than writing one token at a time as fast as it can."""
    monkeypatch.setattr(decoding, "MAX_HOLD_NS", 10**10)  # no piece leaves for its age in this test
    model = _load(fast_zoo[0] / "chars-lstm")
    prompts = [("The ", 1), ("def ", 2), ("ab", 3), ("x = ", 4)]

    async def together() -> list[list[str]]:
        generations = Generations()
        return list(await asyncio.gather(*(_pieces(model, p, s, 0.0, generations) for p, s in prompts)))

    for pieces in asyncio.run(together()):
        assert len("".join(pieces)) == 24
        short = [piece for piece in pieces[1:-1] if len(piece) < decoding._hold(len(prompts))]
        assert len(short) <= 2, pieces  # while the others join, a stream may be alone for a step or two
    model.close()


def test_decoding_runs_on_the_event_loop_thread(fast_zoo: tuple[Path, list[object]]) -> None:
    """A step's caller has nothing to do until it returns: it runs on the loop's thread, not the pool's
    (a hop there and back cost the Transformer's 16-stream steps about a quarter of their time)."""
    model = _load(fast_zoo[0] / "chars-transformer")
    threads: list[tuple[int, bool]] = []
    run = model.batcher.run_fn

    def recorded(outputs: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        threads.append((feed["tokens"].shape[1], threading.current_thread() is threading.main_thread()))
        return run(outputs, feed)

    model.batcher.run_fn = recorded
    model.batcher.policy = dataclasses.replace(model.batcher.policy, inline_ns=0)  # never inline by itself

    async def together() -> list[str]:
        generations = Generations()
        return list(await asyncio.gather(*(_text(model, p, s, 0.0, generations) for p, s in PROMPTS if len(p) > 1)))

    asyncio.run(together())
    steps = [on_loop for width, on_loop in threads if width == 1]
    prompts = [on_loop for width, on_loop in threads if width > 1]
    assert len(steps) >= 23
    # On the loop whenever nothing else waits for the model (a prompt queued behind a step goes first).
    assert sum(steps) >= len(steps) - len(prompts), steps
    assert prompts
    assert not any(prompts)  # the prompts (alone, in chunks) still go to the pool
    model.close()


def test_decoding_runs_ahead_of_a_stalled_consumer_by_a_bounded_number_of_pieces(
    fast_zoo: tuple[Path, list[object]],
) -> None:
    model = _load(fast_zoo[0] / "chars-lstm")

    async def stalled() -> int:
        sampling = Sampling(500, temperature=0.9, top_k=0, top_p=1.0, seed=1, stop=())
        events = Generations().text(model, "The ", sampling)
        await anext(events)  # one piece taken, then the consumer stops reading (but does not leave)
        steps = model.stats.step_rows
        before = steps.sum
        await asyncio.sleep(0.5)
        ahead = steps.sum - before
        await events.aclose()  # it leaves: decoding stops
        after = steps.sum
        await asyncio.sleep(0.2)
        assert steps.sum == after  # no step after the consumer left
        return ahead

    ahead = asyncio.run(stalled())
    assert 0 < ahead <= decoding.RUN_AHEAD + 1, ahead
    model.close()
