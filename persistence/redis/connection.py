"""The connection lifecycle every Redis-backed piece shares.

Contract:
- ``connect(url)`` returns a ``redis.asyncio.Redis`` (``decode_responses``)
  that has answered a PING, so a wrong URL or a Redis that is down fails at
  startup with the real error; a client that failed is closed, not leaked.
- ``stop(tasks)`` cancels background tasks and waits until each has ended,
  so nothing still writes through a client that is about to be closed. A
  task that is still running shortly after its cancellation is cancelled
  again: redis-py's asyncio client can swallow a cancellation that lands in
  the middle of a command (redis/redis-py#2028; measured here with redis
  8.1: 44 of 200 looping tasks cancelled during an EVAL kept running), and
  a worker's shutdown then waited forever. With a read timeout set (below)
  redis-py swallows far more of them (measured: 20 stops of a looping EVAL
  took 0.07 s without ``socket_timeout``, 21 s with it), so every task
  cancelled while it may be inside a command is stopped through ``stop``.
- Every command is bounded: ``TIMEOUT_S`` to connect and to read an answer,
  one immediate retry on a broken connection (a pooled connection Redis or
  the network closed: after a Redis restart each one fails once), none on a
  timeout. ``retry=False`` drops that retry: for pub/sub, where it would
  resubscribe silently and hide the messages missed meanwhile from
  ``SharedBreakers``, which reloads on the error. redis-py's default (three retries with a
  backoff of up to 10 s, no read timeout) made a Redis that went away delay
  each reply by 13-18 s and one that stopped answering block it for good.
  Pub/sub listening still blocks without a timeout (redis-py reads it so).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# Redis answers a local network in well under a millisecond; a second means
# it is gone, and the callers' fallbacks (pace alone, answer untracked) apply.
TIMEOUT_S = 1.0


async def connect(url: str, *, client_name: str | None = None,
                  retry: bool = True) -> aioredis.Redis:
    """A pinged client; ``client_name`` shows in Redis's CLIENT LIST."""
    client = aioredis.from_url(
        url, decode_responses=True, client_name=client_name,
        socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
        retry=Retry(NoBackoff(), 1 if retry else 0, supported_errors=(RedisConnectionError,)))
    try:
        await client.ping()
    except BaseException:
        await client.aclose()
        raise
    return client


class Outage:
    """Shared by everything that uses one client: after a command failed,
    Redis is skipped for ``retry_s`` (callers take their fallback at once),
    then asked again. A Redis that stops answering then costs one timeout
    per ``retry_s``, not one per call (which made each reply wait seconds)."""

    def __init__(self, retry_s: float = 5.0) -> None:
        self.retry_s = retry_s
        self._until = 0.0

    @property
    def ongoing(self) -> bool:
        return time.monotonic() < self._until

    def failed(self) -> None:
        self._until = time.monotonic() + self.retry_s


RECANCEL_S = 0.2  # how long a cancelled task may take before it is cancelled again


async def stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task, then wait for each (all cancelled before any is awaited).

    A task that has not ended ``RECANCEL_S`` after a cancellation is
    cancelled again, until it ends (see the module docstring for why).
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        while not task.done():
            await asyncio.wait({task}, timeout=RECANCEL_S)
            if not task.done():
                task.cancel()  # the last one was swallowed by a library
        with contextlib.suppress(asyncio.CancelledError):
            await task
