"""`nnserve-export serve`: serve the zoo while it trains (what `make serve` runs).

A repository that is complete is served at once, as `nnserve serve` would. Otherwise the server starts
on it at once (polling it every second) and the zoo is built into it incrementally beside the server:
each family's models appear, whole, as soon as they meet their bar, and the server loads them; calls to
a model still training get UNAVAILABLE with when it should be ready. The terminal shows both the
server's lines and the builder's progress. Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .zoo import TRAINING_FILE, QualityError, build_zoo, table

POLL_S = "1"


def complete(repository: Path) -> bool:
    """Built, and not left half-way by an interrupted build (its `.training.json` stays behind)."""
    return repository.is_dir() and any(repository.iterdir()) and not (repository / TRAINING_FILE).exists()


def serve(repository: Path, server_flags: list[str], jobs: int = 2, fast: bool = False) -> int:
    command = [sys.executable, "-m", "nnserve_server.process.cli", "serve", "--model-repository", str(repository)]
    if complete(repository):
        os.execv(command[0], [*command, *server_flags])  # the server itself, in this process: starts in seconds
    repository.mkdir(parents=True, exist_ok=True)
    print(f"nnserve-export serve: {repository} is not built yet; serving it while the zoo trains into it", flush=True)
    server = subprocess.Popen([*command, "--poll-interval-s", POLL_S, *server_flags])

    def stop(signum: int, frame: object) -> None:  # Ctrl-C or SIGTERM: the server drains, the build stops
        server.send_signal(signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)  # also where a shell started us with SIGINT ignored (`make serve &`)
    status = 0
    try:
        rows = build_zoo(repository, jobs=jobs, incremental=True, fast=fast)
        print(table(rows), flush=True)
        print(f"nnserve-export serve: the whole zoo is built and served from {repository}", flush=True)
        return server.wait()
    except QualityError as error:  # the others are served; this one is named
        print(f"nnserve-export serve: {error}; the other models are served", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        pass
    try:
        return server.wait() or status
    except KeyboardInterrupt:
        return server.wait() or status
