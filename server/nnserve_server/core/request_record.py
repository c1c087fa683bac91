"""What one request did on its way through the server, gathered for its metrics, logs and answer.

The guard opens a record when a call arrives and makes it the current one (a context variable: each
gRPC call runs in its own asyncio task); models add their runs to it; the guard then reports it as
trailing metadata, in the access log and in the model's histograms.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnserve_server.core.stats import ModelStats, Timing

REQUEST_ID_KEY = "x-request-id"  # set by the caller, or made here; returned in trailing metadata
MAX_REQUEST_ID = 128
# The server's timing, one trailing-metadata entry (each entry costs the transport about 3 us of CPU per
# call, more than the rest of this module): "server=US", and once a model ran ",queue=US,compute=US,batch=ROWS"
# (arrival to answer; waiting for a run and onnxruntime, summed over a stream's runs; rows of the largest
# run the request shared). Read by the SDK (nnserve_client.types.ServerTiming).
TIMING = "nnserve-timing"


@dataclass(slots=True)
class RequestRecord:
    rpc: str
    request_id: str
    started_ns: int
    model: str = ""
    message: str = ""  # the status message of a failed call, for its access line
    version: str = ""
    stats: ModelStats | None = field(default=None, repr=False)
    runs: int = 0  # onnxruntime runs that served this request (Generate: one per step)
    rows: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    batch_size: int = 0  # rows of the largest run it shared
    entered_ns: int = 0  # when it first reached a model: before that, decoding (and preprocessing)
    left_ns: int = 0  # when its last run came back: after that, encoding (and postprocessing)
    first_message_ns: int = 0  # streams: when the first message left
    tokens: int = 0  # Generate: tokens generated
    code: str = ""  # the status it was answered with, once it was
    reported: bool = False  # counted in the metrics and the access log (once)
    span: Any = field(default=None, repr=False)  # with --tracing: the call's server span
    grant: Any = field(default=None, repr=False)  # with tokens: what the caller's may do (`security.Grant`)
    peer: Callable[[], str] | None = field(default=None, repr=False)  # the transport's peer address, asked lazily

    def client(self) -> str:
        """Who the caller is, for per-client shares: its token's label, else its IP address (port dropped)."""
        if self.grant is not None:
            return f"token {self.grant.label}"
        address = self.peer() if self.peer is not None else ""
        host = address.rpartition(":")[0] or address  # grpc: ipv4:10.0.0.5:51234, ipv6:[::1]:51234
        return host.removeprefix("ipv4:").removeprefix("ipv6:")

    def add_run(self, model: str, version: str, stats: ModelStats | None, timing: Timing, rows: int) -> None:
        self.add_alone_run(model, version, stats, timing.infer_ns, rows)
        self.queue_ns += timing.queue_ns
        self.batch_size = max(self.batch_size, timing.batch_size)  # the whole run's rows, these among them

    def add_alone_run(self, model: str, version: str, stats: ModelStats | None, infer_ns: int, rows: int) -> None:
        """A run of `rows` rows that served this request alone, without waiting (`add_run` adds the rest)."""
        self.model, self.version, self.stats = model, version, stats
        self.left_ns = time.perf_counter_ns()
        self.runs += 1
        self.rows += rows
        self.compute_ns += infer_ns
        self.batch_size = max(self.batch_size, rows)

    def trailing_metadata(self, ended_ns: int) -> tuple[tuple[str, str], ...]:
        timing = f"server={(ended_ns - self.started_ns) // 1000}"
        if self.runs:
            timing += f",queue={self.queue_ns // 1000},compute={self.compute_ns // 1000},batch={self.batch_size}"
        return (REQUEST_ID_KEY, self.request_id), (TIMING, timing)


CURRENT: ContextVar[RequestRecord | None] = ContextVar("nnserve_request", default=None)


# Ids the server makes: a random prefix per process (so workers and restarts never collide) and a
# counter, cheaper than fresh random bytes on every request.
_ID_PREFIX = secrets.token_hex(5)
_ID_COUNTER = itertools.count(1)


def request_id_from(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The caller's x-request-id when it is usable (printable ASCII, at most 128 characters), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID:
            if value.isascii() and value.isprintable():
                return value
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):06x}"
