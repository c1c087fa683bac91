"""The folders say what a module may import (nnserve_server's docstring draws it); this holds every module to it.

- nnserve_contract (the wire contract): nothing of nnserve's.
- nnserve_server/settings.py: nothing of nnserve's.
- nnserve_server/core/: the core, settings and the contract; no gRPC (grpc, the *_grpc stubs) and no edge.
- nnserve_server/edge/: the core, the edge, settings and the contract.
- nnserve_server/process/ (cli, workers, worker_metrics, event_loop, allocator): anything.
- outside the SDK, nothing imports the SDK's private modules (nnserve_client._*).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)

SERVER = ROOT / "server" / "nnserve_server"
CONTRACT = ROOT / "clients" / "nnserve_contract"


def _package(path: Path) -> list[str]:
    parts, folder = [], path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return parts


def _imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = _package(path)
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{module}" if module else base
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("nnserve_server", "nnserve_client", "nnserve_contract")}


def _modules(folder: Path) -> list[Path]:
    found = sorted(folder.rglob("*.py"))
    assert found, folder
    return found


def test_the_contract_and_the_settings_import_nothing_of_ours() -> None:
    for path in [*_modules(CONTRACT), SERVER / "settings.py"]:
        if "stubs" in path.parts:
            continue  # generated: package-relative imports of each other only
        outside = {n for n in _ours(_imports(path)) if not n.startswith("nnserve_contract")}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_core_knows_nothing_of_grpc_or_the_edge() -> None:
    allowed = (
        "nnserve_server.core",
        "nnserve_server.settings",
        "nnserve_contract.codec",
        "nnserve_contract.model_spec",
        "nnserve_contract.stubs.model_config_pb2",  # config.pbtxt is read as Triton's message (protobuf text)
    )
    for path in _modules(SERVER / "core"):
        imported = _imports(path)
        grpc = {n for n in imported if n.split(".")[0].startswith("grpc") or n.endswith("_grpc")}
        assert not grpc, f"{path.relative_to(ROOT)} imports {sorted(grpc)}"
        wrong = {
            n
            for n in _ours(imported)
            if not n.startswith(allowed) and n not in ("nnserve_contract", "nnserve_contract.stubs")
        }
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_edge_imports_the_core_not_the_process() -> None:
    allowed = ("nnserve_server.core", "nnserve_server.edge", "nnserve_server.settings", "nnserve_contract")
    for path in _modules(SERVER / "edge"):
        wrong = {n for n in _ours(_imports(path)) if not n.startswith(allowed) and n != "nnserve_server.__version__"}
        wrong.discard("nnserve_server")  # `from nnserve_server import __version__`
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_nothing_outside_the_sdk_imports_its_private_modules() -> None:
    for top in ("server", "exporters", "benchmarks", "tests", "clients/nnserve_contract"):
        for path in _modules(ROOT / top):
            if path.is_relative_to(ROOT / "tests" / "clients"):
                continue  # the SDK's own tests
            private = {n for n in _imports(path) if n.startswith("nnserve_client._")}
            assert not private, f"{path.relative_to(ROOT)} imports {sorted(private)}"


def test_the_server_has_its_two_parts_and_the_process_beside_them() -> None:
    top = {p.name for p in SERVER.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert top == {"__init__.py", "core", "edge", "process", "settings.py"}


def test_nothing_but_the_process_imports_the_process() -> None:
    for top in ("core", "edge"):
        for path in _modules(SERVER / top):
            process = {n for n in _imports(path) if n.startswith("nnserve_server.process")}
            assert not process, f"{path.relative_to(ROOT)} imports {sorted(process)}"


def test_the_sdk_and_the_exporters_never_import_the_server() -> None:
    for top in ("clients/nnserve_client", "exporters/nnserve_exporters"):
        for path in _modules(ROOT / top):
            server = {n for n in _imports(path) if n.startswith("nnserve_server")}
            assert not server, f"{path.relative_to(ROOT)} imports {sorted(server)}"


@pytest.mark.parametrize("distribution", ["server", "clients", "exporters"])
def test_every_package_folder_is_in_its_distribution(distribution: str) -> None:
    """setuptools installs the packages its pyproject lists, no more: a folder left out is missing from a
    built wheel and from the image (an editable install still finds it, so only the image check said so)."""
    import tomllib

    root = ROOT / distribution
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(init.parent.relative_to(root).parts)
        for init in root.rglob("__init__.py")
        if not any(part.endswith(".egg-info") or part == "build" for part in init.parts)
    }
    assert folders == listed
