"""Every model card's call example, run as it is written against a server on the fast zoo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import RunningServer

from nnserve_exporters.cards import ADDRESS
from nnserve_exporters.zoo import ZooRow


def test_every_model_card_example_runs(
    fast_zoo: tuple[Path, list[ZooRow]], zoo_server: RunningServer, tmp_path: Path
) -> None:
    out, rows = fast_zoo
    assert rows
    for row in rows:
        card = (out / row.name / "model_card.md").read_text()
        assert "issue" not in card, row.name  # no stale promises
        assert "client.infer" not in card, row.name  # each model is called through its task API
        (example,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
        assert ADDRESS in example, row.name
        done = subprocess.run(
            [sys.executable, "-c", example.replace(ADDRESS, zoo_server.target)],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, f"{row.name}:\n{example}\n{done.stderr}"
        assert done.stdout.strip(), f"{row.name} printed nothing"
