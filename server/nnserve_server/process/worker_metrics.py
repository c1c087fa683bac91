"""`--workers N`: one metrics endpoint that adds up the workers' own.

Each worker serves its metrics on a private loopback port (it counts in plain integers, exactly as a
single server does: worker mode costs a request nothing more). The supervisor reads every live
worker when it is scraped, and every couple of seconds besides, keeping the last reading of each:
a worker that dies leaves its counters and histograms in the sum (counters never go down), and its
gauges leave with it. Counters and histograms sum; each gauge combines as its `multiprocess_mode`
says (livesum or livemax over the live workers).
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator

from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nnserve_server.core.metrics import METRICS

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
_GAUGE_MODES = {spec.name: spec.multiprocess_mode for spec in METRICS if spec.multiprocess_mode}
_OURS = {spec.name for spec in METRICS}

_Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, labels
_Family = tuple[str, str, str]  # name, help, type


def _read(text: str) -> tuple[dict[str, _Family], dict[str, dict[_Key, float]]]:
    """nnserve's families in one exposition: their headers, and each family's samples by name and labels."""
    headers: dict[str, _Family] = {}
    samples: dict[str, dict[_Key, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _OURS:
            continue  # process_* and python_info describe one process: not added up
        headers[family.name] = (family.name, family.documentation, family.type)
        rows = samples.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            rows[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return headers, samples


class WorkerMetrics:
    """A prometheus-client collector over the workers' endpoints."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._urls: dict[int, str] = {}  # live workers by index
        self._last: dict[int, dict[str, dict[_Key, float]]] = {}
        self._retired: dict[str, dict[_Key, float]] = {}  # counters and histograms of workers gone
        self._headers: dict[str, _Family] = {}
        self.fetch_failures = 0

    def add(self, index: int, url: str) -> None:
        with self._lock:
            self._urls[index] = url

    def retire(self, index: int) -> None:
        """Worker `index` died: its last counters stay in the sum, its gauges go."""
        with self._lock:
            self._urls.pop(index, None)
            last = self._last.pop(index, {})
            for name, rows in last.items():
                if name in _GAUGE_MODES and self._headers.get(name, ("", "", ""))[2] == "gauge":
                    continue
                retired = self._retired.setdefault(name, {})
                for key, value in rows.items():
                    retired[key] = retired.get(key, 0.0) + value

    def refresh(self) -> None:
        """Read every live worker now (a worker that does not answer keeps its last reading)."""
        with self._lock:
            urls = dict(self._urls)
        for index, url in urls.items():
            try:
                with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                    text = response.read().decode()
            except OSError as error:
                self.fetch_failures += 1
                log.warning("worker %d's metrics (%s) did not answer: %s", index, url, error)
                continue
            headers, samples = _read(text)
            with self._lock:
                if index in self._urls:  # not retired meanwhile
                    self._headers.update(headers)
                    self._last[index] = samples

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        with self._lock:
            live = list(self._last.values())
            retired = self._retired
            headers = dict(self._headers)
            for name, (_, documentation, kind) in headers.items():
                mode = _GAUGE_MODES.get(name, "") if kind == "gauge" else ""
                merged: dict[_Key, float] = {} if mode else dict(retired.get(name, {}))
                for worker in live:
                    for key, value in worker.get(name, {}).items():
                        if mode == "livemax":
                            merged[key] = max(merged.get(key, value), value)
                        else:
                            merged[key] = merged.get(key, 0.0) + value
                family = Metric(name, documentation, kind)
                family.samples = [Sample(sample, dict(labels), value) for (sample, labels), value in merged.items()]
                yield family
