"""The model zoo: train, export and verify every family into a model repository.

Builds into `<out>.partial` and renames it into place only when every model met its bar, so a
half-built or failing zoo never becomes the repository the server serves.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .families import fnn

FAMILIES: dict[str, ModuleType] = {"fnn": fnn}


class QualityError(RuntimeError):
    """A model missed its quality bar on held-out data."""


@dataclass(frozen=True)
class ZooRow:
    name: str
    family: str
    task: str
    quality: dict[str, float]
    parity_error: float
    size_bytes: int
    train_seconds: float


def build_model(family: ModuleType, out: Path, fast: bool, seed: int = 0) -> ZooRow:
    torch.manual_seed(seed)  # the initial weights too: the same zoo every time
    model = family.build(fast=fast)
    trained = family.train(model, fast=fast)
    path = out / family.NAME / "1" / "model.onnx"
    parity = family.export(model, path, trained.quality)
    _write_card(family, path.parent.parent / "model_card.md", trained.quality, fast)
    return ZooRow(
        family.NAME, family.FAMILY, family.TASK, trained.quality, parity, path.stat().st_size, trained.seconds
    )


def build_zoo(out: Path, *, fast: bool = False, only: list[str] | None = None, force: bool = False) -> list[ZooRow]:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to rebuild it")
    unknown = sorted(set(only or ()) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    rows, misses = [], []
    chosen = [name for name in FAMILIES if not only or name in only]
    started = time.perf_counter()
    for step, key in enumerate(chosen, start=1):
        family = FAMILIES[key]
        print(f"[{step}/{len(chosen)}] {family.NAME}: training{' (fast)' if fast else ''}...", flush=True)
        row = build_model(family, staging, fast)
        rows.append(row)
        elapsed = time.perf_counter() - started
        eta = elapsed / step * (len(chosen) - step)
        print(f"[{step}/{len(chosen)}] {row.name}: {_quality(row.quality)} ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)")
        if not fast:
            misses += [
                f"{row.name}: {metric} {row.quality.get(metric, 0):.4f} < {bar}"
                for metric, bar in family.QUALITY_BAR.items()
                if row.quality.get(metric, 0.0) < bar
            ]
    if misses:
        raise QualityError("models missed their quality bars (zoo not installed): " + "; ".join(misses))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return rows


def table(rows: list[ZooRow]) -> str:
    header = f"{'model':<16} {'family':<8} {'task':<9} {'quality':<22} {'parity':>9} {'size':>10} {'train':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<16} {r.family:<8} {r.task:<9} {_quality(r.quality):<22} {r.parity_error:>9.1e} "
            f"{r.size_bytes / 1024:>8.1f}KB {r.train_seconds:>6.1f}s"
        )
    return "\n".join(lines)


def _quality(quality: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in quality.items())


def _write_card(family: ModuleType, path: Path, quality: dict[str, float], fast: bool) -> None:
    doc = (family.__doc__ or "").strip()
    path.write_text(
        f"# {family.NAME}\n\n{doc}\n\n"
        f"- family: {family.FAMILY}\n- task: {family.TASK}\n"
        f"- held-out quality: {_quality(quality)}{' (fast mode: tiny model, no bar)' if fast else ''}\n"
        f"- bar: {_quality(family.QUALITY_BAR)}\n\n"
        "Call it:\n\n```python\nfrom nnserve_client import Client\n"
        f"Client('127.0.0.1:8001').{family.TASK}('{family.NAME}', batch)\n```\n"
    )


def main_zoo(out: Path, fast: bool, only: list[str] | None, force: bool) -> int:
    try:
        rows = build_zoo(out, fast=fast, only=only, force=force)
    except (QualityError, FileExistsError, ValueError) as error:
        print(f"nnserve-export zoo: {error}", file=sys.stderr)
        return 1
    print(table(rows))
    print(f"model repository ready at {out}")
    return 0
