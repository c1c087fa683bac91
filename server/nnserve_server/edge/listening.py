"""The start-up line that says where a server listens: written here and read here, by every tool that waits.

`nnserve listening on HOST:PORT (gRPC: KServe v2 + nnserve.v1.Tasks); metrics at http://H:P/metrics; ...`
(or `metrics off`). The workers' supervisor, the tests and the benchmarks wait for it; its format lives
in this module alone so that they cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A whole line only (up to its newline): a log read while it is written may end in half a port number.
_SAID = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)(?P<rest>[^\n]*)\n")
_METRICS_URL = re.compile(r"metrics at (http://\S+?/metrics)")


@dataclass(frozen=True)
class Listening:
    """Where a server said it listens."""

    host: str
    port: int
    metrics_url: str | None  # None: metrics off

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_url is None else int(self.metrics_url.rsplit(":", 1)[1].split("/", 1)[0])


def line(host: str, port: int, metrics_address: str, details: str) -> str:
    """The start-up line; `metrics_address` is `MetricsEndpoint.address`, `details` what is served."""
    return f"nnserve listening on {host}:{port} (gRPC: KServe v2 + nnserve.v1.Tasks); {metrics_address}; {details}"


def find(text: str) -> Listening | None:
    """The first start-up line in `text` (a log, plain or JSON), or None while there is none yet."""
    said = _SAID.search(text)
    if said is None:
        return None
    url = _METRICS_URL.search(said["rest"])
    return Listening(said["host"], int(said["port"]), None if url is None else url[1])
