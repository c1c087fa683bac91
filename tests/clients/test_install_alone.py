"""The SDK installs into a fresh venv without torch or onnxruntime and still works."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer

USE_SDK = """
import importlib.util, json, sys
import numpy as np
from nnserve_client import Client
found = {name: importlib.util.find_spec(name) is not None for name in ("torch", "onnxruntime", "nnserve_server")}
with Client(sys.argv[1]) as client:
    ranked = client.classify("digits-fnn", np.zeros((2, 64), np.float32), top_k=2)
    print(json.dumps({"found": found, "items": len(ranked), "top": len(ranked[0].top), "live": client.live()}))
"""


@pytest.mark.slow
def test_sdk_alone_in_a_fresh_venv(server: RunningServer, tmp_path: Path) -> None:
    env_dir = tmp_path / "sdk-only"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(ROOT / "constraints.txt"), str(ROOT / "clients")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    done = subprocess.run(
        [str(python), "-c", USE_SDK, server.target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "found": {"torch": False, "onnxruntime": False, "nnserve_server": False},
        "items": 2,
        "top": 2,
        "live": True,
    }
    assert sys.prefix not in str(python)
