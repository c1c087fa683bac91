"""The model repository: `<root>/<model>/<version>/model.onnx`, Triton's layout.

It loads every version it finds, answers `get(name, version)` with a ready model (or ModelNotFound /
ModelNotReady naming what exists), and loads or unloads models on request. A model that fails to
load is kept as UNAVAILABLE with its reason while the others serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nnserve_server.core.errors import InvalidInput, ModelNotFound, ModelNotReady
from nnserve_server.core.metrics import ServerMetrics
from nnserve_server.core.model import OnnxModel
from nnserve_server.core.runtime import Runtime
from nnserve_server.core.serving_config import CONFIG_FILE, serving_config
from nnserve_server.settings import Settings

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
READY, UNAVAILABLE, UNLOADED = "READY", "UNAVAILABLE", "UNLOADED"
KEPT = "kept serving: a newer version did not load"
TRAINING_FILE = ".training.json"  # {"models": {name: unix time it should be ready}}, kept by the zoo builder


def _eta(ready_at: float) -> str:
    left = ready_at - time.time()
    return f"ready in about {left:.0f} s" if left > 1 else "ready any moment now"


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

StateListener = Callable[[str, bool], Awaitable[None]]


Signature = tuple[int, int, int]  # model.onnx's mtime and size, config.pbtxt's mtime: "changed on disk?"


@dataclass(frozen=True)
class VersionEntry:
    version: str
    state: str
    reason: str = ""
    model: OnnxModel | None = None
    signature: Signature | None = None  # of the files it was loaded from


def _signature(model_dir: Path, version: str) -> Signature:
    model = (model_dir / version / MODEL_FILE).stat()
    config = model_dir / CONFIG_FILE
    return model.st_mtime_ns, model.st_size, config.stat().st_mtime_ns if config.is_file() else 0


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def _latest_ready(entries: dict[str, VersionEntry]) -> OnnxModel | None:
    for entry in sorted(entries.values(), key=lambda e: _version_key(e.version), reverse=True):
        if entry.model is not None:
            return entry.model
    return None


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


class ModelRepository:
    def __init__(self, root: Path, runtime: Runtime, settings: Settings, metrics: ServerMetrics | None = None) -> None:
        self.root = root
        self._metrics = metrics
        self._policy = settings.versions
        self._runtime = runtime
        self._settings = settings
        self._models: dict[str, dict[str, VersionEntry]] = {}
        self._latest: dict[str, OnnxModel | None] = {}  # per name, the highest ready version
        self._listeners: list[StateListener] = []
        self._training: dict[str, str] = {}
        self._training_stamp = 0
        self._skipped: set[str] = set()  # entries said to be skipped (once each)

    def on_state_change(self, listener: StateListener) -> None:
        """`listener(model_name, ready)` is awaited after every load or unload."""
        self._listeners.append(listener)

    async def load_all(self) -> None:
        if not self.root.is_dir():
            log.warning("model repository %s does not exist; serving no models", self.root)
            return
        for model_dir in sorted(self.root.iterdir()):
            if self._servable_folder(model_dir):
                try:
                    await self.load(model_dir.name)
                except (InvalidInput, ModelNotFound) as error:  # e.g. a symlink out of the repository
                    log.error("model %s not loaded: %s", model_dir.name, error)

    def _servable_folder(self, model_dir: Path) -> bool:
        """Whether `model_dir` is a model's folder; a folder skipped for its name or a link that leads nowhere
        is said once, by name (a hidden entry, such as the zoo's `.training.json`, silently)."""
        name = model_dir.name
        try:
            is_dir = model_dir.is_dir()
            if model_dir.is_symlink():
                model_dir.resolve(strict=True)
        except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError or ELOOP, by Python version
            self._skip(name, f"it cannot be followed ({getattr(error, 'strerror', None) or error})")
            return False
        if not is_dir or name.startswith("."):
            return False
        if not _MODEL_NAME.fullmatch(name):
            self._skip(
                name, "model names are letters, digits, '_', '.', '-' (at most 128), starting with a letter or digit"
            )
            return False
        return True

    def _skip(self, name: str, why: str) -> None:
        if name not in self._skipped:
            self._skipped.add(name)
            log.warning("repository entry %r skipped: %s", name, why)

    async def load(self, name: str) -> None:
        """(Re)load `name` from disk, then swap its versions in at once.

        Versions new or changed on disk are loaded and warmed up; unchanged ones are kept as they are.
        Requests that already hold a replaced version finish on it; its session is released when the
        last of them lets go. A new version that fails to load never takes the place of one that
        serves: the older ready version stays until the policy's count is met by ready ones.
        """
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"no model '{name}' in the repository {self.root}")
        found = sorted((p.name for p in model_dir.iterdir() if (p / MODEL_FILE).is_file()), key=_version_key)
        chosen = self._policy.choose(found)
        if not chosen:
            raise ModelNotFound(
                f"model '{name}' has no <version>/{MODEL_FILE} under {model_dir} that the version policy serves"
            )
        previous = self._models.get(name, {})
        entries: dict[str, VersionEntry] = {}
        root = self.root.resolve()
        for version in chosen:
            signature = _signature(model_dir, version)
            if not (model_dir / version / MODEL_FILE).resolve().is_relative_to(root):
                log.error("model %s version %s resolves outside the model repository: not loaded", name, version)
                if self._metrics is not None:
                    self._metrics.load_failures.labels(name).inc()
                reason = "resolves outside the model repository"
                entries[version] = VersionEntry(version, UNAVAILABLE, reason, signature=signature)
                continue
            old = previous.get(version)
            if old is not None and old.model is not None and old.signature == signature:
                entries[version] = old
                continue
            entry = await asyncio.to_thread(self._load_version, name, version)
            entries[version] = dataclasses.replace(entry, signature=signature)
        ready = sum(1 for entry in entries.values() if entry.model is not None)
        for version in sorted(previous, key=_version_key, reverse=True):
            old = previous[version]
            if ready >= len(chosen):
                break
            if version not in entries and old.model is not None and (model_dir / version / MODEL_FILE).is_file():
                log.warning(
                    "model %s keeps serving version %s: a version meant to replace it is not ready", name, version
                )
                entries[version] = dataclasses.replace(old, reason="kept serving: a newer version did not load")
                ready += 1
        self._models[name] = dict(sorted(entries.items(), key=lambda item: _version_key(item[0])))
        self._latest[name] = _latest_ready(entries)
        await self._notify(name)

    def changed_on_disk(self) -> list[str]:
        """Models whose served versions differ from what the policy would load now (new, changed, gone)."""
        if not self.root.is_dir():
            return []
        changed = []
        for model_dir in sorted(self.root.iterdir()):
            name = model_dir.name
            if not self._servable_folder(model_dir):
                continue
            entries = self._models.get(name)
            if entries and all(e.state == UNLOADED for e in entries.values()):
                continue  # unloaded by request: stays so until asked to load
            try:
                found = sorted((p.name for p in model_dir.iterdir() if (p / MODEL_FILE).is_file()), key=_version_key)
                wanted = {v: _signature(model_dir, v) for v in self._policy.choose(found)}
            except OSError:  # files moving while we look: try again next time
                continue
            loaded = {
                v: e.signature
                for v, e in (entries or {}).items()
                if e.reason != "kept serving: a newer version did not load"
            }
            if wanted != loaded:
                changed.append(name)
        return changed

    async def poll(self, interval_s: float, stop: asyncio.Event) -> None:
        """Every `interval_s`, load the models that changed on disk, until `stop` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
                return
            except TimeoutError:
                pass
            for name in self.changed_on_disk():
                log.info("model %s changed on disk: loading", name)
                try:
                    await self.load(name)
                except Exception as error:  # one bad model must not stop the polling of the others
                    log.error("model %s: reload failed: %s", name, error)

    def _load_version(self, name: str, version: str) -> VersionEntry:
        path = self.root / name / version / MODEL_FILE
        started = time.perf_counter()
        stats = None if self._metrics is None else self._metrics.stats.model(name, version)
        try:
            config = serving_config(self.root / name, self._settings, self._runtime.cpus)
            model = OnnxModel(name, version, path, self._runtime, config, self._settings.inline_run_us, stats)
        except Exception as error:  # a corrupt file or broken metadata must not take the others down
            log.error("model %s version %s failed to load: %s", name, version, error)
            if self._metrics is not None:
                self._metrics.load_failures.labels(name).inc()
            return VersionEntry(version, UNAVAILABLE, f"failed to load: {error}")
        c, batcher = model.config, model.batcher
        log.info(
            "loaded model %s version %s on %s: max_batch_size %d (%s), %s; %d instance(s) x %d thread(s); runs %s",
            name,
            version,
            ",".join(model.providers),
            model.max_batch_size,
            model.session.batching_reason,
            f"combines requests up to {batcher.policy.max_batch_size} rows, delay {c.max_queue_delay_us} us"
            if batcher.policy.max_batch_size
            else "requests run one by one",
            c.instances,
            c.intra_op_threads,
            "inline on the event loop" if batcher.inline else "in the thread pool",
        )
        if self._metrics is not None:
            self._metrics.load_duration.labels(name, version).set(time.perf_counter() - started)
        return VersionEntry(version, READY, "", model)

    async def unload(self, name: str) -> None:
        self._model_dir(name)  # refuse names that could reach outside the repository
        if name not in self._models:
            raise ModelNotFound(f"unknown model '{name}'; the server has {_listing(self.names())}")
        self._models[name] = {v: VersionEntry(v, UNLOADED, "unloaded by request") for v in self._models[name]}
        self._latest[name] = None
        await self._notify(name)

    def get(self, name: str, version: str = "") -> OnnxModel:
        """The ready model for `name` at `version` (empty: the latest ready version)."""
        if not version:
            latest = self._latest.get(name)
            if latest is not None:  # the common case, one dict lookup
                return latest
        entries = self._models.get(name)
        if entries is None:
            training = self.training().get(name)
            if training is not None:
                raise ModelNotReady(f"model '{name}' is being trained; {training}")
            raise ModelNotFound(f"unknown model '{name}'; the server has {_listing(self.names())}")
        if version:
            entry = entries.get(version)
            if entry is None:
                raise ModelNotFound(f"model '{name}' has no version '{version}'; it has {_listing(list(entries))}")
            if entry.model is None:
                raise ModelNotReady(f"model '{name}' version {version} is {entry.state}: {entry.reason}")
            return entry.model
        reasons = "; ".join(f"version {e.version}: {e.state} ({e.reason})" for e in entries.values())
        raise ModelNotReady(f"model '{name}' has no ready version: {reasons}")

    def names(self) -> list[str]:
        return sorted(self._models)

    def training(self) -> dict[str, str]:
        """Models a zoo builder is training into this repository, each with when it expects to be done
        (from `TRAINING_FILE`, which the builder keeps; re-read only when it changes)."""
        path = self.root / TRAINING_FILE
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return {}
        if stamp != self._training_stamp:
            try:
                listed = json.loads(path.read_text())["models"]
                self._training = {str(name): _eta(float(eta)) for name, eta in dict(listed).items()}
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("cannot read %s (%s); ignoring it", path, error)
                self._training = {}
            self._training_stamp = stamp
        return {name: eta for name, eta in self._training.items() if name not in self._latest or not self._latest[name]}

    def knows(self, name: str) -> bool:
        """Whether `name` is a model of this repository (loaded or not): a dict lookup, for the hot path."""
        return name in self._models

    def versions(self, name: str) -> list[VersionEntry]:
        return sorted(self._models.get(name, {}).values(), key=lambda e: _version_key(e.version))

    def all_ready(self) -> bool:
        """Every model of the repository has a ready version and none is being trained into it (Triton's
        strict readiness). A model unloaded by request is not waited for."""
        if self.training():
            return False
        for name, entries in self._models.items():
            if self._latest.get(name) is None and any(e.state != UNLOADED for e in entries.values()):
                return False
        return True

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def _model_dir(self, name: str) -> Path:
        if not _MODEL_NAME.fullmatch(name) or ".." in name:
            raise InvalidInput(
                f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-' (at most 128), "
                "starting with a letter or digit"
            )
        model_dir = self.root / name
        if model_dir.exists() and not model_dir.resolve().is_relative_to(self.root.resolve()):
            raise InvalidInput(f"model '{name}' resolves outside the model repository")
        return model_dir

    async def _notify(self, name: str) -> None:
        ready = self.is_ready(name)
        if self._metrics is not None:
            loaded = sum(1 for entry in self._models.get(name, {}).values() if entry.model is not None)
            self._metrics.versions_loaded.labels(name).set(loaded)
        for listener in self._listeners:
            await listener(name, ready)

    async def close(self) -> None:
        """At shutdown: wait for every model's in-flight runs, then release the sessions."""
        for entries in self._models.values():
            for entry in entries.values():
                if entry.model is not None:
                    await asyncio.to_thread(entry.model.close)
