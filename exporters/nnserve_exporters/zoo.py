"""The model zoo: train, export and verify every family into a model repository.

Builds into `<out>.partial`, two families at a time in worker processes, and renames it into place
only when every model met its bar, so a half-built or failing zoo never becomes the repository the
server serves. `incremental` (what `make serve` uses on a repository still to be built) moves each
family in as soon as it met its bar instead, so a server polling the repository serves it at once.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cards import quality_text, write_card
from .families import cnn, fnn, gan, gru, lstm, minilm, resnet, rnn, transformer_lm, unet, vae
from .family import Family

# Build order matters: a family's NEEDS (the CNN that judges generated digits) come first.
_LISTED: tuple[Family, ...] = (fnn, cnn, resnet, rnn, lstm, gru, transformer_lm, minilm, unet, gan, vae)
# Keyed by the module's name, a family's one name (`--only transformer_lm`).
FAMILIES: dict[str, Family] = {family.__name__.rsplit(".", 1)[1]: family for family in _LISTED}  # type: ignore[attr-defined]


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


# Roughly how long each family trains here (its TRAIN_S): the ETA a server gives for a model still training,
# and the order of the work (quickest first, so a first model answers within seconds).
EXPECTED_S = {key: family.TRAIN_S for key, family in FAMILIES.items()}
# The order the jobs take the work, from EXPECTED_S: the quickest family first (a first model answers within
# seconds), then the longest one on its own job while the other job takes the rest, quickest first.
_BY_TIME = sorted(EXPECTED_S, key=EXPECTED_S.__getitem__)  # ties in build order
WORK_ORDER = [_BY_TIME[0], _BY_TIME[-1], *_BY_TIME[1:-1]]
TRAINING_FILE = ".training.json"  # what a server reads to say "being trained, ready in about N s"
TORCH_DIR = ".torch"  # trained PyTorch weights a later family needs (the CNN that judges digits)


def build_family(
    family: Family, out: Path, fast: bool, trained_models: dict[str, nn.Module]
) -> tuple[list[ZooRow], nn.Module]:
    torch.manual_seed(0)  # the initial weights too: the same zoo every time
    model = family.build(fast=fast)
    trained = family.train(model, fast=fast, zoo=trained_models)
    rows = []
    for exported in family.export(model, out, trained.quality):
        write_card(family, exported, trained.quality, fast)
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
    return rows, model


def _build_in_worker(key: str, staging: Path, fast: bool) -> list[ZooRow]:
    """One family in a worker process with one torch thread: two such workers train two small
    families side by side faster than one family at a time on two threads (these models are too
    small for torch's threads to pay: a GAN step costs 57 ms on one thread, 44 ms on two)."""
    torch.set_num_threads(1)
    family = FAMILIES[key]
    needed: dict[str, nn.Module] = {}
    for dependency in family.NEEDS:
        model = FAMILIES[dependency].build(fast=fast)
        model.load_state_dict(torch.load(staging / TORCH_DIR / f"{dependency}.pt", weights_only=True))
        needed[dependency] = model.eval()
    rows, model = build_family(family, staging / key, fast, needed)
    if any(key in other.NEEDS for other in FAMILIES.values()):
        (staging / TORCH_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), staging / TORCH_DIR / f"{key}.pt")
    return rows


def misses(family: Family, quality: dict[str, float]) -> list[str]:
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
        wanted |= set(FAMILIES[key].NEEDS)
    return [key for key in FAMILIES if key in wanted]


def build_zoo(
    out: Path,
    *,
    fast: bool = False,
    only: list[str] | None = None,
    force: bool = False,
    jobs: int = 2,
    incremental: bool = False,
) -> list[ZooRow]:
    """Train, export and verify the chosen families, `jobs` at a time (each in a process of its own).

    By default all or nothing: the repository appears only when every model met its bar. With
    `incremental`, each family's models move into `out` as soon as they meet their bar (a model
    folder appears whole, by one rename), `out/.training.json` says what is still training and when
    it should be done, families already in `out` are kept, and a family that misses its bar is left
    out while the others go on (QualityError at the end names it)."""
    if out.exists() and not force and not incremental:
        raise FileExistsError(f"{out} exists; pass --force to rebuild it")
    chosen = chosen_families(only)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if incremental:
        out.mkdir(parents=True, exist_ok=True)
        built_already = [k for k in chosen if _installed(k, out)]
        chosen = [k for k in chosen if k not in built_already]
        for key in built_already:
            print(f"{key}: already in {out}, kept", flush=True)
    chosen.sort(key=lambda k: WORK_ORDER.index(k) if k in WORK_ORDER else len(WORK_ORDER))
    rows: list[ZooRow] = []
    failures: list[str] = []
    started = time.perf_counter()
    pending: dict[str, float] = {}
    if incremental:
        pending = _expected_finish(chosen, jobs, fast)
        _write_training(out, pending)
    try:
        rows, failures = _run_jobs(chosen, staging, out if incremental else None, fast, jobs, started, pending)
    finally:
        if incremental:  # what met its bar is in `out` already; the rest is half-built
            (out / TRAINING_FILE).unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging / TORCH_DIR, ignore_errors=True)
    if failures:
        raise QualityError("models missed their quality bars: " + "; ".join(failures))
    if not incremental:
        merged = staging.with_name(staging.name + "-merged")
        shutil.rmtree(merged, ignore_errors=True)
        merged.mkdir()
        for key in chosen:
            for model_dir in (staging / key).iterdir():
                model_dir.rename(merged / model_dir.name)
        if out.exists():
            shutil.rmtree(out)
        merged.rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    order = [family.FAMILY for family in FAMILIES.values()]
    return sorted(rows, key=lambda row: order.index(row.family))


def _installed(key: str, out: Path) -> bool:
    names = FAMILIES[key].MODEL_NAMES
    return all((out / name / "1" / "model.onnx").is_file() for name in names)


def _expected_finish(chosen: list[str], jobs: int, fast: bool) -> dict[str, float]:
    """When each family should be done, if the jobs take the work in order: for the servers' ETAs."""
    free = [time.time()] * max(jobs, 1)
    finish = {}
    for key in chosen:
        worker = free.index(min(free))
        free[worker] += 3 if fast else EXPECTED_S[key]
        finish[key] = free[worker]
    return finish


def _write_training(out: Path, pending: dict[str, float]) -> None:
    models = {name: at for key, at in pending.items() for name in FAMILIES[key].MODEL_NAMES}
    temporary = out / (TRAINING_FILE + ".new")
    temporary.write_text(json.dumps({"models": models}))
    temporary.replace(out / TRAINING_FILE)


def _run_jobs(
    chosen: list[str],
    staging: Path,
    install: Path | None,
    fast: bool,
    jobs: int,
    started: float,
    pending: dict[str, float],
) -> tuple[list[ZooRow], list[str]]:
    """Train the families `jobs` at a time, each once what it NEEDS is done; with `install`, move each
    family's models in as it meets its bar and keep `pending` (the servers' ETAs) up to date."""
    rows: list[ZooRow] = []
    failures: list[str] = []
    submitted: dict[Future[list[ZooRow]], str] = {}
    waiting = list(chosen)
    done_keys: set[str] = set()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: torch's threads set before any work
    pool = ProcessPoolExecutor(max_workers=max(jobs, 1), mp_context=context)

    def submit_ready() -> None:
        for key in list(waiting):
            needs = set(FAMILIES[key].NEEDS) & set(chosen)
            if needs <= done_keys and len(submitted) < max(jobs, 1):
                waiting.remove(key)
                print(f"[{key}] training{' (fast)' if fast else ''}", flush=True)
                submitted[pool.submit(_build_in_worker, key, staging, fast)] = key

    try:
        submit_ready()
        while submitted:
            finished, _ = wait(submitted, return_when=FIRST_COMPLETED)
            for future in finished:
                key = submitted.pop(future)
                built = future.result()
                missed = [] if fast else misses(FAMILIES[key], built[0].quality)
                elapsed = time.perf_counter() - started
                verdict = "; MISSED ITS BAR, left out" if missed else ""
                print(f"[{key}] {quality_text(built[0].quality)} ({elapsed:.0f}s elapsed){verdict}", flush=True)
                failures += missed
                done_keys.add(key)
                if install is not None:
                    if not missed:
                        for model_dir in (staging / key).iterdir():
                            shutil.rmtree(install / model_dir.name, ignore_errors=True)
                            model_dir.rename(install / model_dir.name)  # whole, at once
                    pending.pop(key, None)
                    _write_training(install, pending)
                rows += built
            submit_ready()
    except BaseException:  # Ctrl-C or SIGTERM: the workers stop now, not after the family they train
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
    return rows, failures


def table(rows: list[ZooRow]) -> str:
    header = f"{'model':<19} {'family':<11} {'task':<9} {'parity':>8} {'size':>10} {'train':>7}  quality"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<19} {r.family:<11} {r.task:<9} {r.parity_error:>8.1e} {r.size_bytes / 1024:>8.0f}KB "
            f"{r.train_seconds:>6.1f}s  {quality_text(r.quality)}"
        )
    return "\n".join(lines)


def main_zoo(
    out: Path, fast: bool, only: list[str] | None, force: bool, jobs: int = 2, incremental: bool = False
) -> int:
    try:
        rows = build_zoo(out, fast=fast, only=only, force=force, jobs=jobs, incremental=incremental)
    except (QualityError, FileExistsError, ValueError) as error:
        print(f"nnserve-export zoo: {error}", file=sys.stderr)
        return 1
    print(table(rows))
    print(f"model repository ready at {out}")
    return 0
