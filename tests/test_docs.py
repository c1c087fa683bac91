"""The README is a front door and docs/ the reference: generated tables stay in step with the code, and
every link between the pages leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from nnserve_server.core.metrics import metrics_table
from nnserve_server.settings import build_parser, flags_table

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
PAGES += [ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_flags_table_matches_the_settings() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert flags_table() in page, "the flags table is stale: paste nnserve_server.settings.flags_table()"
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in page or f"/ {flag}`" in page, flag


def test_metrics_table_matches_the_metrics() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    assert metrics_table() in page, "the metrics table is stale: paste nnserve_server.core.metrics.metrics_table()"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"the README's table does not lead to docs/{page.name}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s): not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} leads nowhere"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"
