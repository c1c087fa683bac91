"""Soak: mixed load across every task for a fixed time, with bad requests and cancellations mixed in.

    python -m benchmarks.soak [--minutes 10] [--repository models] [--concurrency 8]   (make soak)

Starts one `nnserve serve` on 127.0.0.1 (port 0) over the model repository (the zoo, built by
`make serve`), then runs C client threads until the time is up, each picking at random: KServe
inference, classify (images and texts), encode, segment, generate (some streams cancelled after the
first token), and bad requests (unknown model, wrong shape, undecodable image). Prints, and writes
to .cache/soak/results.json: requests served, answers by status code, p50/p99 per kind, and the
server's RSS at start (after a warm-up) and at the end. Bounded in time; targets loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nnserve_client import Client, NNServeError
from nnserve_client.types import TextPiece
from nnserve_server.edge import listening

ROOT = Path(__file__).resolve().parents[1]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Soak:
    def __init__(self, target: str, seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.codes: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        digit = np.kron(np.eye(4) * 255, np.ones((2, 2)))
        self.digit_png = _png(digit)
        self.shapes_png = _png(np.random.default_rng(seed).integers(0, 255, (32, 32)))

    def one(self, client: Client, rng: random.Random) -> None:
        kind = rng.choice(["infer", "classify", "encode-text", "encode-image", "segment", "generate", "cancel", "bad"])
        started = time.perf_counter()
        code = "OK"
        try:
            if kind == "infer":
                client.infer("digits-fnn", {"input": np.random.default_rng().random((4, 64), dtype=np.float32)})
            elif kind == "classify":
                client.classify(rng.choice(["digits-cnn", "digits-resnet"]), images=[self.digit_png])
            elif kind == "encode-text":
                client.encode("sentence-minilm", texts=["a cat sat on the mat", "stocks fell"])
            elif kind == "encode-image":
                client.encode("digits-vae-encoder", images=[self.digit_png])
            elif kind == "segment":
                client.segment("shapes-unet", image=self.shapes_png)
            elif kind == "generate":
                model = rng.choice(["chars-lstm", "chars-gru", "chars-transformer"])
                client.generate_text(model, "The ", max_tokens=32, temperature=0.8, seed=rng.randrange(1000))
            elif kind == "cancel":  # leave the stream after the first piece: the server must stop
                for event in client.generate("chars-lstm", prompt="Once ", max_tokens=400, temperature=0.8):
                    if isinstance(event, TextPiece):
                        break
            else:
                bad = rng.choice(["unknown", "shape", "image"])
                if bad == "unknown":
                    client.infer("no-such-model", {"input": np.zeros((1, 64), np.float32)})
                elif bad == "shape":
                    client.infer("digits-fnn", {"input": np.zeros((1, 63), np.float32)})
                else:
                    client.classify("digits-cnn", images=[b"\x89PNG not really"])
        except NNServeError as error:
            code = error.code
        elapsed = time.perf_counter() - started
        with self.lock:
            self.codes[f"{kind}:{code}"] += 1
            self.latencies[kind].append(elapsed)

    def run(self, seconds: float, concurrency: int) -> None:
        deadline = time.monotonic() + seconds

        def worker(index: int) -> None:
            rng = random.Random(index)
            with Client(self.target, timeout=60) as client:
                while time.monotonic() < deadline:
                    self.one(client, rng)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "soak")
    args = parser.parse_args()
    if not args.repository.is_dir():
        sys.exit(f"no model repository at {args.repository}: run make serve (or make zoo) once first")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "nnserve_server.process.cli", "serve", "--model-repository", str(args.repository),
             "--port", "0", "--metrics-port", "-1"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        for _ in range(600):
            text = log_path.read_text(errors="replace")
            said = listening.find(text)
            if said is not None:
                break
            if server.poll() is not None:
                sys.exit(f"server exited:\n{text}")
            time.sleep(0.1)
        else:
            sys.exit(f"the server did not start within 60 s:\n{text}")
        soak = Soak(f"127.0.0.1:{said.port}", seed=0)
        soak.run(20, args.concurrency)  # warm-up: every path once, arenas grown
        rss_start = _rss(server.pid)
        soak.codes.clear()
        soak.latencies.clear()
        started = time.monotonic()
        soak.run(args.minutes * 60, args.concurrency)
        wall = time.monotonic() - started
        rss_end = _rss(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(60)
    served = sum(count for key, count in soak.codes.items() if key.endswith(":OK"))
    by_code: Counter[str] = Counter()
    for key, count in soak.codes.items():
        by_code[key.split(":", 1)[1]] += count
    everything = sorted(v for values in soak.latencies.values() for v in values)
    result: dict[str, Any] = {
        "minutes": wall / 60,
        "concurrency": args.concurrency,
        "requests": sum(soak.codes.values()),
        "served_ok": served,
        "by_code": dict(by_code),
        "by_kind_and_code": dict(sorted(soak.codes.items())),
        "p50_ms": 1000 * float(np.percentile(everything, 50)),
        "p99_ms": 1000 * float(np.percentile(everything, 99)),
        "p99_ms_by_kind": {k: 1000 * float(np.percentile(v, 99)) for k, v in sorted(soak.latencies.items())},
        "rss_start_mib": rss_start / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "rss_growth": rss_end / rss_start - 1,
        "server_alive_at_end": alive,
        "tracebacks_in_server_log": log_path.read_text(errors="replace").count("Traceback"),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
