"""A call's context as the servicers type it, and its deadline on the event loop's clock for the batcher."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

Context: TypeAlias = Any  # grpc.aio.ServicerContext (or the native transport's); grpc ships no type hints


def deadline_of(context: Context) -> float | None:
    """When the call's deadline passes, as `loop.time()`; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining
