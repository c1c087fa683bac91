"""Continuous batching of decoding steps: concurrent generations on a recurrent LM share one
onnxruntime call per step, and each stream's text is exactly what it would be alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nnserve_server import generation
from nnserve_server.generation import Sampling, TextPiece
from nnserve_server.model import OnnxModel
from nnserve_server.runtime import Runtime
from nnserve_server.serving_config import serving_config
from nnserve_server.settings import Settings


def _load(folder: Path) -> OnnxModel:
    settings = Settings()
    runtime = Runtime.from_settings(settings)
    config = serving_config(folder, settings, runtime.cpus)
    return OnnxModel(folder.name, "1", folder / "1" / "model.onnx", runtime, config, settings.inline_run_us)


async def _text(model: OnnxModel, prompt: str, seed: int) -> str:
    sampling = Sampling(24, temperature=0.9, top_k=0, top_p=1.0, seed=seed, stop=())
    return "".join(
        [e.text async for e in generation.generate_text(model, prompt, sampling) if isinstance(e, TextPiece)]
    )


@pytest.mark.parametrize("name", ["chars-lstm", "chars-gru"])
def test_concurrent_streams_share_each_step_and_keep_their_own_text(
    fast_zoo: tuple[Path, list[object]], name: str
) -> None:
    model = _load(fast_zoo[0] / name)
    prompts = [("The ", 1), ("def ", 2), ("a", 3), ("Return the", 4), ("x = ", 5), ("if", 6)]
    alone = [asyncio.run(_text(model, p, s)) for p, s in prompts]  # one at a time: nothing to share

    async def together() -> list[str]:
        return list(await asyncio.gather(*(_text(model, p, s) for p, s in prompts)))

    steps = generation._step_batcher(model, model.spec)  # type: ignore[arg-type]
    assert steps is not None
    before_runs, before_steps = steps.runs, steps.steps
    shared = asyncio.run(together())
    runs, stepped = steps.runs - before_runs, steps.steps - before_steps
    assert shared == alone  # the same text, row by row, as each stream alone (same seeds)
    # Every decoding step after each prompt went through the batcher (a one-character prompt is a step too).
    assert stepped == sum(23 + (len(p) == 1) for p, _ in prompts)
    assert runs <= stepped / 3, (runs, stepped)  # and they shared calls: six streams, about one call a step
    model.close()


def test_the_transformer_steps_alone(fast_zoo: tuple[Path, list[object]]) -> None:
    """Its cache is filled in place per stream, so there is no batch axis to stack its steps on."""
    model = _load(fast_zoo[0] / "chars-transformer")
    assert generation._step_batcher(model, model.spec) is None  # type: ignore[arg-type]
    model.close()


async def _pieces(model: OnnxModel, prompt: str, seed: int, pause_s: float) -> list[str]:
    """A consumer that takes `pause_s` over each piece (a slow client, or a busy server's writes)."""
    sampling = Sampling(24, temperature=0.9, top_k=0, top_p=1.0, seed=seed, stop=())
    pieces = []
    async for event in generation.generate_text(model, prompt, sampling):
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
        return list(await asyncio.gather(*(_pieces(model, p, s, 0.004) for p, s in prompts)))

    shared = asyncio.run(together())
    assert ["".join(p) for p in shared] == ["".join(p) for p in alone]  # the same text
    # Decoding ran ahead while each consumer paused: the pieces that piled up left together.
    assert sum(len(p) for p in shared) < sum(len(p) for p in alone) / 2, [len(p) for p in shared]
    model.close()


def test_decoding_runs_ahead_of_a_stalled_consumer_by_a_bounded_number_of_pieces(
    fast_zoo: tuple[Path, list[object]],
) -> None:
    model = _load(fast_zoo[0] / "chars-lstm")
    steps = generation._step_batcher(model, model.spec)  # type: ignore[arg-type]
    assert steps is not None

    async def stalled() -> int:
        sampling = Sampling(500, temperature=0.9, top_k=0, top_p=1.0, seed=1, stop=())
        events = generation.generate_text(model, "The ", sampling)
        await anext(events)  # one piece taken, then the consumer stops reading (but does not leave)
        before = steps.steps
        await asyncio.sleep(0.5)
        ahead = steps.steps - before
        await events.aclose()  # it leaves: decoding is cancelled
        after = steps.steps
        await asyncio.sleep(0.2)
        assert steps.steps == after  # no step after the consumer left
        return ahead

    ahead = asyncio.run(stalled())
    assert 0 < ahead <= generation.RUN_AHEAD + 1, ahead
    model.close()
