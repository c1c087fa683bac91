"""The samples of the README's "Calling it" and of docs/protocol.md, run as they are written against a
real server on the fast zoo:
the SDK blocks in our venv, the tritonclient blocks in tritonclient's, the nnserve-client and grpcurl
lines as commands. Only the address is changed (the README's 127.0.0.1:8001 to the test server's) and
the files they name (seven.png, shapes.png) are made first. The replicas sample needs machines that
are not here and is skipped, by name."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import GRPCURL, ROOT, TRITONCLIENT_PYTHON, RunningServer
from PIL import Image

ADDRESS = "127.0.0.1:8001"
NOT_HERE = "10.0.0.5"  # the several-replicas sample: addresses of machines this test does not have


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Calling it")
    return readme[start : readme.index("\n## ", start + 1)] + (ROOT / "docs" / "protocol.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)


def _commands(block: str) -> list[str]:
    """The block's commands: a command goes on over lines while a quote is open (the grpcurl sample)."""
    commands, current = [], ""
    for line in block.splitlines():
        current = f"{current}\n{line}" if current else line
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if current.strip():
            commands.append(current)
        current = ""
    return commands


def _files(folder: Path) -> None:
    from sklearn.datasets import load_digits

    from nnserve_exporters.datasets import shapes

    seven = np.rint(load_digits().images[7] / 16 * 255).astype(np.uint8)
    Image.fromarray(seven).save(folder / "seven.png")
    picture, _ = shapes(1, 32, seed=2)
    Image.fromarray((picture[0, 0] * 255).astype(np.uint8)).save(folder / "shapes.png")


def _run(python: Path, code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    script = folder / "sample.py"
    script.write_text(code)
    return subprocess.run(
        [str(python), str(script)], capture_output=True, text=True, timeout=180, cwd=folder, check=False
    )


def test_the_samples_run_as_written(zoo_server: RunningServer, tmp_path: Path) -> None:
    _files(tmp_path)
    python_blocks = [b.replace(ADDRESS, zoo_server.target) for b in _blocks("python") if NOT_HERE not in b]
    ours = [b for b in python_blocks if "nnserve_client" in b]
    theirs = [b for b in python_blocks if "tritonclient" in b or ("triton." in b and b not in ours)]
    assert len(ours) >= 2, len(ours)
    assert len(theirs) >= 3, len(theirs)
    for block in ours:
        done = _run(Path(sys.executable), block, tmp_path)
        assert done.returncode == 0, block + done.stderr
    done = _run(TRITONCLIENT_PYTHON, "\n".join(theirs), tmp_path)  # each builds on the one before
    assert done.returncode == 0, done.stderr
    assert "b'" in done.stdout  # the classification extension's strings

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [command for block in _blocks("sh") for command in _commands(block)]
    client_lines = [c for c in commands if c.startswith("nnserve-client")]
    grpcurl_lines = [c for c in commands if c.startswith("grpcurl")]
    assert len(client_lines) >= 6, commands
    assert grpcurl_lines, commands
    for line in client_lines:
        argv = shlex.split(line, comments=True)
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
            env={**env, "NNSERVE_TARGET": zoo_server.target},
        )  # fmt: skip
        assert done.returncode == 0, (line, done.stderr)
        assert "Traceback" not in done.stderr
    assert (tmp_path / "mask.png").is_file()
    assert len(list((tmp_path / "samples").glob("digits-gan-*.png"))) == 4
    for line in grpcurl_lines:
        argv = shlex.split(line.replace(ADDRESS, zoo_server.target), comments=True)
        argv[0] = str(GRPCURL)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
        assert done.returncode == 0, (line, done.stderr)
