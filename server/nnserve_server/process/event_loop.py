"""Runs the server's coroutine on the event loop the settings name (`--event-loop`).

uvloop (libuv under asyncio's API) costs less per gRPC call than the standard loop: the benchmark
measures both. `auto` takes uvloop when it is installed (it is a server dependency on Linux) and
the standard loop otherwise; naming uvloop when it is missing refuses to start rather than fall back.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from nnserve_server.core.errors import StartupError
from nnserve_server.settings import EVENT_LOOPS

log = logging.getLogger(__name__)
AUTO, ASYNCIO, UVLOOP = EVENT_LOOPS
T = TypeVar("T")


def chosen(setting: str) -> str:
    """The loop `setting` (auto, asyncio or uvloop) resolves to here."""
    installed = importlib.util.find_spec("uvloop") is not None
    if setting == AUTO:
        return UVLOOP if installed else ASYNCIO
    if setting == UVLOOP and not installed:
        raise StartupError("--event-loop uvloop, but uvloop is not installed: pip install uvloop, or use asyncio")
    return setting


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run `main` to its end on `loop`, as `chosen` resolved it (resolve first: a refusal then
    leaves no coroutine unawaited)."""
    log.debug("event loop: %s", loop)
    if loop == UVLOOP:
        import uvloop

        return uvloop.run(main)  # type: ignore[no-any-return]
    return asyncio.run(main)
