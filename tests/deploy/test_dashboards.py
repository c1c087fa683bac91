"""deploy/grafana and deploy/prometheus query only metrics and labels the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import RunningServer

from nnserve_server.core.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "nnserve-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# Labels Prometheus adds to every scraped series (the ServiceMonitor's targets), beside the server's own.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
METRIC = re.compile(r"\b((?:nnserve|process)_[a-z_]+)\b")
SELECTOR = re.compile(r"\b((?:nnserve|process)_[a-z_]+)\{([^}]*)\}")
BY = re.compile(r"\bby \(([^)]*)\)")


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def exported(metrics_text: str) -> dict[str, set[str]]:
    """Every series name the endpoint can show, with the labels the server gives it."""
    labels = {spec.name: set(spec.labels) for spec in METRICS}
    names: dict[str, set[str]] = {}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.MULTILINE):
        own = labels.get(family.removesuffix("_total"), set())
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        for suffix in suffixes:
            names[family + suffix] = own | ({"le"} if suffix == "_bucket" else set())
    return names


def problems(query: str, names: dict[str, set[str]]) -> list[str]:
    found = []
    used = set(METRIC.findall(query))
    found += [f"{name} is not exported" for name in sorted(used - set(names))]
    allowed = set().union(*(names.get(name, set()) for name in used)) | TARGET_LABELS
    for name, matchers in SELECTOR.findall(query):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in names.get(name, set()) | TARGET_LABELS:
                found.append(f"{name} has no label {label}")
    for grouping in BY.findall(query):
        for label in (part.strip() for part in grouping.split(",")):
            if label not in allowed:
                found.append(f"grouping by {label}, which none of {sorted(used)} has")
    return found


def test_every_dashboard_and_alert_query_uses_exported_metrics_and_labels(server: RunningServer) -> None:
    names = exported(server.metrics())
    queries = dashboard_queries() + [str(rule["expr"]) for rule in alert_rules()]
    assert len(queries) >= 20
    for query in queries:
        assert not problems(query, names), (query, problems(query, names))
    # The check itself catches a misspelled metric and a label the metric lacks.
    assert problems("rate(nnserve_request_total[5m])", names) == ["nnserve_request_total is not exported"]
    assert problems('nnserve_queue_depth{rpc="x"}', names) == ["nnserve_queue_depth has no label rpc"]
    assert problems("sum by (reason) (nnserve_in_flight_requests)", names) == [
        "grouping by reason, which none of ['nnserve_in_flight_requests'] has"
    ]


@pytest.mark.fast
def test_the_dashboard_answers_where_the_time_went() -> None:
    used = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    for needed in (
        "nnserve_requests_total",  # request and error rate
        "nnserve_request_duration_seconds_bucket",  # p50 / p99
        "nnserve_queue_wait_seconds_bucket",  # queue wait ...
        "nnserve_compute_seconds_bucket",  # ... against compute
        "nnserve_batch_size_sum",  # batch size
        "nnserve_in_flight_requests",  # saturation
        "nnserve_queue_depth",
    ):
        assert needed in used, needed


@pytest.mark.parametrize(
    ("alert", "metric"),
    [
        ("NnserveHighErrorRate", "nnserve_request_failures_total"),
        ("NnserveHighLatencyP99", "nnserve_request_duration_seconds_bucket"),
        ("NnserveQueueSaturated", "nnserve_queue_depth"),
        ("NnserveModelNotReady", "nnserve_model_ready"),
    ],
)
@pytest.mark.fast
def test_the_alerts_cover_errors_latency_saturation_and_readiness(alert: str, metric: str) -> None:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == alert]
    assert metric in str(rule["expr"])
    assert rule["labels"]["severity"] in ("warning", "critical")  # type: ignore[index]
    assert rule["annotations"]["summary"]  # type: ignore[index]
    assert re.fullmatch(r"\d+m", str(rule["for"]))
