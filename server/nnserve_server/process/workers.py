"""`--workers N`: N server processes on one port, past the one-interpreter limit.

The supervisor (this module) reserves the port, starts N copies of `nnserve serve` that bind it with
SO_REUSEPORT (the kernel spreads connections across them), each with its own sessions, and serves
the metrics of all of them from one endpoint: each worker serves its own on a private loopback
port and the supervisor adds them up (`worker_metrics.py`). A worker that dies is logged and
started again; SIGTERM or SIGINT is passed to every worker, which drains as a single server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from nnserve_server.core.errors import StartupError
from nnserve_server.core.metrics import MetricsEndpoint
from nnserve_server.edge import listening
from nnserve_server.process.worker_metrics import WorkerMetrics
from nnserve_server.settings import Settings

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
REFRESH_S = 2.0  # how often the workers' metrics are read besides scrapes: what a SIGKILL may lose


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so the port is ours; SO_REUSEPORT lets the workers bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise StartupError(f"cannot bind {host}:{port}: {error}") from None
    return sock


def _worker_command(argv: list[str], port: int) -> list[str]:
    """The supervisor's own flags, then the ones that make a process a worker (last flag wins).

    Shared memory is off in workers: a region registered through one would be unknown to the others."""
    return [
        sys.executable, "-m", "nnserve_server.process.cli", "serve", *argv,
        "--workers", "1", "--reuse-port", "--port", str(port), "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--no-shared-memory",
    ]  # fmt: skip


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with(supervisor: int) -> Callable[[], None]:
    """In the forked worker, before exec: the kernel sends it SIGTERM (a graceful drain) when the supervisor
    dies, -9 included, so no worker serves the port unsupervised and unmeasured. A supervisor that died
    before the call is caught by the parent check."""

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:
            os._exit(1)

    return arrange


class Supervisor:
    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self._argv = argv
        self.metrics = WorkerMetrics()
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._drains: list[asyncio.Task[None]] = []
        self.restarts = 0

    async def run(self) -> int:
        settings = self.settings
        reserved = _reserve_port(settings.host, settings.port)
        port = reserved.getsockname()[1]
        try:
            registry = CollectorRegistry()
            registry.register(self.metrics)
            endpoint = MetricsEndpoint(settings.metrics_host, settings.metrics_port, registry)
            ready = await asyncio.gather(*(self._start(index, port) for index in range(settings.workers)))
            if not all(ready):
                await self._stop_all()
                endpoint.shutdown()
                raise StartupError("a worker exited before it was ready; its log is above")
            pids = ", ".join(str(p.pid) for p in self._processes.values())
            details = f"{settings.workers} workers (SO_REUSEPORT), pids {pids}"
            print(listening.line(settings.host, port, endpoint.address, details), flush=True)
            reserved.close()  # the workers hold the port now
            watchers = [asyncio.create_task(self._watch(index, port)) for index in self._processes]
            watchers.append(asyncio.create_task(self._refresh()))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
            codes = await self._stop_all()
            for watcher in watchers:
                watcher.cancel()
            endpoint.shutdown()
            return 0 if all(code == 0 for code in codes) else 1
        finally:
            reserved.close()

    async def _start(self, index: int, port: int) -> bool:
        """Start worker `index` and wait until it says it is listening; False if it exits first."""
        process = await asyncio.create_subprocess_exec(
            *_worker_command(self._argv, port),
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_dies_with(os.getpid()),  # a prctl call only, before exec
        )
        self._processes[index] = process
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode(errors="replace")
            said = listening.find(text)  # a plain line, or the message of a JSON one
            if said is not None:
                if said.metrics_url is not None:
                    self.metrics.add(index, said.metrics_url)
                log.info("worker %d (pid %d) is ready", index, process.pid)
                self._drains.append(asyncio.create_task(self._drain(process)))
                return True
        await process.wait()
        return False

    async def _drain(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while await process.stdout.readline():
            pass  # the worker's hints for a terminal; the supervisor printed its own

    async def _refresh(self) -> None:
        while not self._stopping:
            await asyncio.sleep(REFRESH_S)
            await asyncio.to_thread(self.metrics.refresh)

    async def _watch(self, index: int, port: int) -> None:
        """Start a worker again when it dies: the others keep serving meanwhile."""
        while True:
            process = self._processes[index]
            code = await process.wait()
            if self._stopping:
                return
            self.metrics.retire(index)
            self.restarts += 1
            log.error("worker %d (pid %d) exited with %s; starting it again", index, process.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if not self._stopping:
                await self._start(index, port)

    async def _stop_all(self) -> list[int]:
        self._stopping = True
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self._processes.values():
            try:
                codes.append(await asyncio.wait_for(process.wait(), self.settings.grace_period_s + 10))
            except TimeoutError:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                codes.append(await process.wait())
        return codes


def supervise(settings: Settings, argv: list[str]) -> int:
    return asyncio.run(Supervisor(settings, argv).run())
