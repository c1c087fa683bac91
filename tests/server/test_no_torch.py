"""The serving path never imports torch (nor the exporters): torch is for training and export only."""

from __future__ import annotations

import json
import subprocess
import sys

IMPORT_THE_SERVER = """
import json, sys
import nnserve_server.edge.app, nnserve_server.process.cli, nnserve_server.core.generation, nnserve_server.core.tasks
import nnserve_server.edge.servicers.kserve, nnserve_server.edge.servicers.tasks, nnserve_client.cli
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nnserve_exporters", "transformers"))))
"""


def test_serving_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_THE_SERVER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
