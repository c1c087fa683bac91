"""Closed-loop load, run in its own process so its CPU time is its own; prints one JSON object.

    python -m benchmarks.load sdk --target HOST:PORT --model M --model-path P --concurrency C --seconds S
    python -m benchmarks.load raw --model-path P --concurrency C --seconds S --threads T [--batch B]
    python -m benchmarks.load generate --target HOST:PORT --model M --model-path P --prefixes 16,512 --tokens K

`sdk`: C coroutines on one event loop, each sending batch-1 ModelInfer calls through our AsyncClient
back to back. `raw`: C Python threads calling onnxruntime's session.run in this process (the floor:
no transport at all). `generate`: streams K tokens after prompts of each length, alternating, and reports the median
time between tokens after the first (the first includes the prompt's own pass).
Every mode stops by itself after S seconds (or R repeats) and counts errors by status code.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _summary(latencies: list[float], errors: Counter[str], wall: float, rows: int = 1) -> dict[str, Any]:
    ordered = np.sort(np.asarray(latencies)) if latencies else np.asarray([np.nan])
    return {
        "requests": len(latencies),
        "throughput": len(latencies) * rows / wall,
        "p50_ms": float(np.percentile(ordered, 50) * 1000),
        "p99_ms": float(np.percentile(ordered, 99) * 1000),
        "errors": dict(errors),
        "wall_s": wall,
        "cpu_s": time.process_time(),
    }


def example_inputs(specs: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """The values every client of the bench sends and raw onnxruntime runs: uniform in [0, 1), seed 0.
    One set for all, because a model's speed depends on them: perf_analyzer's own random data is random
    bytes (NaNs, denormals, magnitudes up to 3.4e38), on which ResNet-18 ran 5-8% slower in-process."""
    rng = np.random.default_rng(0)
    return {s.name: rng.random((batch, *[d if d > 0 else 1 for d in s.shape[1:]])).astype(np.float32) for s in specs}


async def sdk(
    target: str, model: str, model_path: Path, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    import onnxruntime as ort

    from nnserve_client import AsyncClient
    from nnserve_client.errors import NNServeError

    # Inputs shaped from the model file: the bare server answers KServe v2 only, not our metadata call.
    inputs = example_inputs(ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs())
    async with AsyncClient(target, timeout=30) as client:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        measuring = False

        async def worker(stop_at: float) -> None:
            while (now := time.perf_counter()) < stop_at:
                try:
                    await client.infer(model, inputs)
                except NNServeError as error:
                    errors[type(error).__name__] += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(worker(time.perf_counter() + warmup) for _ in range(concurrency)))
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        return _summary(latencies, errors, time.perf_counter() - started)


def raw(model_path: Path, concurrency: int, seconds: float, threads: int, batch: int) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feed = example_inputs(session.get_inputs(), batch)
    outputs = [o.name for o in session.get_outputs()]
    for _ in range(3):
        session.run(outputs, feed)
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]
    stop_at = time.perf_counter() + seconds

    def worker(latencies: list[float]) -> None:
        while (now := time.perf_counter()) < stop_at:
            session.run(outputs, feed)
            latencies.append(time.perf_counter() - now)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(lat,)) for lat in per_thread]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return _summary([x for lat in per_thread for x in lat], Counter(), time.perf_counter() - started, batch)


def generate(
    target: str, model: str, model_path: Path, prefixes: list[int], tokens: int, repeats: int
) -> dict[str, Any]:
    """Per prefix length: the median time between streamed tokens after the first. The prefixes
    alternate within each repeat, so a slow moment of a shared machine hits them alike."""
    import onnxruntime as ort

    from nnserve_client import Client
    from nnserve_client.types import TextPiece
    from nnserve_contract.model_spec import ModelSpec

    spec = ModelSpec.from_props(ort.InferenceSession(str(model_path)).get_modelmeta().custom_metadata_map)
    if spec is None or not spec.vocabulary:
        raise SystemExit(f"{model_path} has no vocabulary")
    vocabulary = [c for c in spec.vocabulary if c.isalnum() or c == " "]
    gaps: dict[int, list[float]] = {p: [] for p in prefixes}
    firsts: dict[int, list[float]] = {p: [] for p in prefixes}
    with Client(target, timeout=120) as client:
        for _ in range(repeats):
            for prefix in prefixes:
                prompt = "".join(vocabulary[i % len(vocabulary)] for i in range(prefix))
                started = time.perf_counter()
                arrivals = [
                    time.perf_counter()
                    for event in client.generate(model, prompt=prompt, max_tokens=tokens, temperature=0.0)
                    if isinstance(event, TextPiece)
                ]
                firsts[prefix].append(arrivals[0] - started)
                gaps[prefix].append((arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1))
    result: dict[str, Any] = {"cpu_s": time.process_time()}
    for prefix in prefixes:
        per_token = float(np.median(gaps[prefix]))
        result[str(prefix)] = {
            "prefix": prefix,
            "tokens": tokens,
            "token_ms": per_token * 1000,
            "tokens_per_s": 1 / per_token,
            "first_token_ms": float(np.median(firsts[prefix]) * 1000),
        }
    return result


def streams(
    target: str, model: str, concurrency: int, tokens: int, repeats: int = 1, versus: int = 0
) -> dict[str, Any]:
    """`concurrency` greedy generations of `tokens` at once (after one to warm up): aggregate tokens/s,
    time to first token (p50, p99), the median gap between a stream's tokens, and errors by code.
    With `repeats`, the burst runs that many times and the run of median tokens/s is reported (one
    burst of 16 x 128 tokens lasts a fifth of a second: a noisy moment of the machine moves it by 20%).

    With `versus` (e.g. 1), each burst is followed by one of `versus` streams, and the ratios of the
    two (tokens/s, gap between tokens) are taken pair by pair: `pairs` holds each pair's, `versus` the
    other side's median run. Two bursts seconds apart measured a 20-40% swing of this shared machine
    as if it were the server's; a pair is a fifth of a second apart.

    A busy server sends several tokens in one piece: tokens are counted by the characters of the
    pieces (one per token for these character LMs), and a piece of k tokens after a gap g counts as
    k gaps of g/k (the pieces per token are reported too)."""
    from nnserve_client import AsyncClient, NNServeError
    from nnserve_client.types import TextPiece

    async def run() -> dict[str, Any]:
        async with AsyncClient(target, timeout=300) as client:

            async def one() -> tuple[float, list[tuple[float, int]]]:
                started, arrivals = time.perf_counter(), []
                async for event in client.generate(model, prompt="The ", max_tokens=tokens, temperature=0.0):
                    if isinstance(event, TextPiece):
                        arrivals.append((time.perf_counter(), len(event.text)))
                return started, arrivals

            async def burst(count: int) -> dict[str, Any]:
                began, cpu = time.perf_counter(), time.process_time()
                outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
                return summary(count, outcomes, time.perf_counter() - began, time.process_time() - cpu)

            await one()
            runs, others, pairs = [], [], []
            for _ in range(repeats):
                runs.append(await burst(concurrency))
                if versus:
                    others.append(await burst(versus))
                    pairs.append(
                        {
                            "tokens_per_s": runs[-1]["tokens_per_s"] / others[-1]["tokens_per_s"],
                            "inter_token_p50": runs[-1]["inter_token_p50_ms"] / others[-1]["inter_token_p50_ms"],
                        }
                    )
            result = {**median_of(runs), "repeats": repeats}
            if versus:
                result["versus"] = median_of(others)
                result["pairs"] = pairs
            return result

    def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The median run's rates; the worst first-token p99 and every error, of all the runs."""
        runs = sorted(runs, key=lambda run: float(run["tokens_per_s"]))
        errors: Counter[str] = Counter()
        for run in runs:
            errors.update(run["errors"])
        worst_first = max(float(run["first_token_p99_ms"]) for run in runs)
        return {**runs[len(runs) // 2], "first_token_p99_ms": worst_first, "errors": dict(errors)}

    def summary(concurrency: int, outcomes: list[Any], wall: float, cpu: float) -> dict[str, Any]:
        errors: Counter[str] = Counter()
        firsts, gaps, pieces, generated = [], [], 0, 0
        for outcome in outcomes:
            if isinstance(outcome, NNServeError):
                errors[outcome.code] += 1
            elif isinstance(outcome, BaseException):
                errors[type(outcome).__name__] += 1
            else:
                started, arrivals = outcome
                pieces += len(arrivals)
                generated += sum(count for _, count in arrivals)
                firsts.append(arrivals[0][0] - started)
                for (before, _), (at, count) in itertools.pairwise(arrivals):
                    gaps += [(at - before) / max(count, 1)] * max(count, 1)
        return {
            "streams": concurrency,
            "tokens_per_s": generated / wall,
            "pieces_per_token": pieces / max(generated, 1),
            "client_cores": cpu / wall,  # this load generator's own CPU: it shares the machine with the server
            "first_token_p50_ms": float(np.percentile(firsts, 50) * 1000) if firsts else float("nan"),
            "first_token_p99_ms": float(np.percentile(firsts, 99) * 1000) if firsts else float("nan"),
            "inter_token_p50_ms": float(np.median(gaps) * 1000) if gaps else float("nan"),
            "errors": dict(errors),
        }

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("sdk", "raw", "generate", "streams"))
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--model", default="bench-mlp")
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefixes", default="16,512", help="prompt lengths in characters, comma-separated")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--versus", type=int, default=0, help="streams: pair each burst with one of this many streams")
    args = parser.parse_args()
    if args.mode == "sdk":
        result = asyncio.run(sdk(args.target, args.model, args.model_path, args.concurrency, args.seconds, args.warmup))
    elif args.mode == "streams":
        result = streams(args.target, args.model, args.concurrency, args.tokens, args.repeats, args.versus)
    elif args.mode == "raw":
        result = raw(args.model_path, args.concurrency, args.seconds, args.threads, args.batch)
    else:
        prefixes = [int(p) for p in args.prefixes.split(",")]
        result = generate(args.target, args.model, args.model_path, prefixes, args.tokens, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
