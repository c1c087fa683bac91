"""The caller's gRPC deadline, turned into a time on the event loop's clock for the batcher."""

from __future__ import annotations

import asyncio
from typing import Any


def deadline_of(context: Any) -> float | None:
    """When the call's deadline passes, as `loop.time()`; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining
