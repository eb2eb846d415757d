"""The connection lifecycle every Redis-backed piece shares.

Contract:
- ``connect(url)`` returns a ``redis.asyncio.Redis`` (``decode_responses``)
  that has answered a PING, so a wrong URL or a Redis that is down fails at
  startup with the real error; a client that failed is closed, not leaked.
- ``stop(tasks)`` cancels background tasks and waits until each has ended,
  so nothing still writes through a client that is about to be closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import redis.asyncio as aioredis


async def connect(url: str, *, client_name: str | None = None) -> aioredis.Redis:
    """A pinged client; ``client_name`` shows in Redis's CLIENT LIST."""
    client = aioredis.from_url(url, decode_responses=True, client_name=client_name)
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client


async def stop(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel every task, then wait for each (all cancelled before any is awaited)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
