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
from torch import nn

from .api import Exported
from .families import cnn, fnn, gan, gru, lstm, minilm, resnet, rnn, transformer_lm, unet, vae

# Build order matters: a family's NEEDS (the CNN that judges generated digits) come first.
FAMILIES: dict[str, ModuleType] = {
    "fnn": fnn,
    "cnn": cnn,
    "resnet": resnet,
    "rnn": rnn,
    "lstm": lstm,
    "gru": gru,
    "transformer-lm": transformer_lm,
    "minilm": minilm,
    "unet": unet,
    "gan": gan,
    "vae": vae,
}


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


def build_family(family: ModuleType, out: Path, fast: bool, trained_models: dict[str, nn.Module]) -> list[ZooRow]:
    torch.manual_seed(0)  # the initial weights too: the same zoo every time
    model = family.build(fast=fast)
    trained = family.train(model, fast=fast, zoo=trained_models)
    trained_models[family.FAMILY] = model
    rows = []
    for exported in family.export(model, out, trained.quality):
        _write_card(family, exported, trained.quality, fast)
        size = exported.path.stat().st_size
        rows.append(
            ZooRow(
                exported.name,
                family.FAMILY,
                exported.task,
                trained.quality,
                exported.parity_error,
                size,
                trained.seconds,
            )
        )
    return rows


def misses(family: ModuleType, quality: dict[str, float]) -> list[str]:
    return [
        f"{family.FAMILY}: {metric} {quality.get(metric, float('nan')):.4f} < {bar}"
        for metric, bar in family.QUALITY_BAR.items()
        if not quality.get(metric, float("-inf")) >= bar
    ]


def chosen_families(only: list[str] | None) -> list[str]:
    unknown = sorted(set(only or ()) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    wanted = set(only or FAMILIES)
    for key in list(wanted):
        wanted |= set(getattr(FAMILIES[key], "NEEDS", ()))
    return [key for key in FAMILIES if key in wanted]


def build_zoo(out: Path, *, fast: bool = False, only: list[str] | None = None, force: bool = False) -> list[ZooRow]:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to rebuild it")
    chosen = chosen_families(only)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    rows: list[ZooRow] = []
    failures: list[str] = []
    trained_models: dict[str, nn.Module] = {}
    started = time.perf_counter()
    for step, key in enumerate(chosen, start=1):
        family = FAMILIES[key]
        print(f"[{step}/{len(chosen)}] {key}{' (fast)' if fast else ''}", flush=True)
        built = build_family(family, staging, fast, trained_models)
        rows += built
        elapsed = time.perf_counter() - started
        eta = elapsed / step * (len(chosen) - step)
        print(f"[{step}/{len(chosen)}] {key}: {_quality(built[0].quality)} ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)")
        if not fast:
            failures += misses(family, built[0].quality)
    if failures:
        raise QualityError("models missed their quality bars (zoo not installed): " + "; ".join(failures))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return rows


def table(rows: list[ZooRow]) -> str:
    header = f"{'model':<19} {'family':<11} {'task':<9} {'parity':>8} {'size':>10} {'train':>7}  quality"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<19} {r.family:<11} {r.task:<9} {r.parity_error:>8.1e} {r.size_bytes / 1024:>8.0f}KB "
            f"{r.train_seconds:>6.1f}s  {_quality(r.quality)}"
        )
    return "\n".join(lines)


def _quality(quality: dict[str, float]) -> str:
    # Six decimals near 1, where four would print a cosine of 0.99996 as 1.0000.
    return ", ".join(f"{k} {v:.6f}" if abs(1 - v) < 1e-3 else f"{k} {v:.4f}" for k, v in quality.items())


def _write_card(family: ModuleType, exported: Exported, quality: dict[str, float], fast: bool) -> None:
    doc = (family.__doc__ or "").strip()
    call = {
        "classify": f"client.classify('{exported.name}', batch)",
        "generate": f"client.infer('{exported.name}', inputs)  # the task API's Generate comes with issue 4",
        "encode": f"client.infer('{exported.name}', inputs)",
        "segment": f"client.infer('{exported.name}', inputs)",
    }[exported.task]
    (exported.path.parent.parent / "model_card.md").write_text(
        f"# {exported.name}\n\n{doc}\n\n"
        f"- family: {family.FAMILY}\n- task: {exported.task}\n"
        f"- held-out quality: {_quality(quality)}{' (fast mode: tiny model, no bar)' if fast else ''}\n"
        f"- bar: {_quality(family.QUALITY_BAR)}\n"
        f"- onnxruntime vs PyTorch, largest relative error: {exported.parity_error:.1e}\n\n"
        "Call it:\n\n```python\nfrom nnserve_client import Client\n"
        f"client = Client('127.0.0.1:8001')\n{call}\n```\n"
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
