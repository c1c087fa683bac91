"""The README's generated parts stay in step with the code."""

from __future__ import annotations

from conftest import ROOT

from nnserve_server.core.metrics import metrics_table
from nnserve_server.settings import build_parser, flags_table


def test_flags_table_matches_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert flags_table() in readme, "README flags table is stale: paste nnserve_server.settings.flags_table()"
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in readme or f"/ {flag}`" in readme, flag


def test_metrics_table_matches_the_metrics() -> None:
    readme = (ROOT / "README.md").read_text()
    assert metrics_table() in readme, "README metrics table is stale: paste nnserve_server.core.metrics.metrics_table()"
