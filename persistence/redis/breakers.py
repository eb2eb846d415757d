"""Circuit-breaker state shared by every worker through Redis.

``SharedBreakers`` owns one async Redis connection and hands out one
``pybreaker.CircuitBreakerStorage`` per provider name
(``SharedBreakers.storage`` is the storage factory ``Breakers`` accepts).

Why not pybreaker's own ``CircuitRedisStorage``: it is synchronous and does a
Redis round trip on every property read, and pybreaker reads ``state`` on
every call, on the event loop. Instead each storage is a *local mirror*:

- reads (``state``, ``counter``, ``opened_at``) never do I/O;
- writes update the mirror at once and are queued to one writer task that
  applies them to a Redis hash (``HINCRBY`` for the shared failure count) and
  publishes every state change on a channel;
- a subscriber task applies the other workers' state changes to the mirror,
  so an open breaker in one worker is seen by all of them within a Redis
  round trip (``CircuitBreaker.state`` notices the changed storage state).

If Redis is unreachable, writes are logged and dropped and each worker keeps
its own breaker: degraded, never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pybreaker
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from persistence.redis.connection import connect, stop

log = logging.getLogger(__name__)

_Op = Callable[[aioredis.Redis], Awaitable[None]]


class RedisBreakerStorage(pybreaker.CircuitBreakerStorage):
    """The mirror of one breaker's shared state (see module docstring)."""

    def __init__(self, owner: SharedBreakers, name: str) -> None:
        super().__init__(name)
        self._owner = owner
        self._state = pybreaker.STATE_CLOSED
        self._counter = 0
        self._success = 0
        self._opened_at: datetime | None = None
        self._seq = 0  # local writes to the counter, to drop stale INCR results

    # --- reads: local only -------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = str(state)
        opened = self._opened_at.timestamp() if self._opened_at else None
        self._owner.push(self._owner.write_state(self.name, self._state, opened))

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def success_counter(self) -> int:
        return self._success

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        self._opened_at = now

    # --- counters -----------------------------------------------------------
    def increment_counter(self) -> None:
        self._counter += 1
        self._seq += 1
        seq = self._seq

        async def incr(client: aioredis.Redis) -> None:
            total = await client.hincrby(self._owner.key(self.name), "fail_counter", 1)
            if seq == self._seq:  # no local reset since: adopt the shared count
                self._counter = max(self._counter, int(total))

        self._owner.push(incr)

    def reset_counter(self) -> None:
        self._counter = 0
        self._seq += 1
        self._owner.push(self._owner.write_field(self.name, "fail_counter", 0))

    def increment_success_counter(self) -> None:
        self._success += 1

    def reset_success_counter(self) -> None:
        self._success = 0

    # --- remote updates -----------------------------------------------------
    def apply_remote(self, state: str, opened_at: float | None, counter: int | None) -> None:
        """Adopt state written by another worker (no write back)."""
        if state not in (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN):
            return
        self._state = state
        self._opened_at = datetime.fromtimestamp(opened_at, UTC) if opened_at else None
        if counter is not None:
            self._counter = counter
        elif state == pybreaker.STATE_CLOSED:
            self._counter = 0


class SharedBreakers:
    """Owner of the shared breaker state: an async context manager.

    ``storage(name)`` may be called before or after entering; state already
    in Redis is loaded on entry (or on creation, once started).
    """

    def __init__(self, url: str, *, namespace: str = "boternity") -> None:
        self._url = url
        self._ns = namespace
        self._channel = f"{namespace}:breaker-events"
        self._origin = uuid.uuid4().hex
        self._storages: dict[str, RedisBreakerStorage] = {}
        self._client: aioredis.Redis | None = None
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._changed = asyncio.Condition()

    @property
    def client_name(self) -> str:
        return f"boternity-breakers-{self._origin[:8]}"

    def key(self, name: str) -> str:
        return f"{self._ns}:breaker:{name}"

    def storage(self, name: str) -> RedisBreakerStorage:
        """The storage factory: one mirror per provider name."""
        found = self._storages.get(name)
        if found is None:
            found = self._storages[name] = RedisBreakerStorage(self, name)
            if self._client is not None:
                self.push(self._load_one(name))
        return found

    # --- lifecycle ----------------------------------------------------------
    async def __aenter__(self) -> SharedBreakers:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        # Named, so an operator's CLIENT LIST tells what each connection is.
        # No silent reconnect: a lost subscription must raise, so _listen reloads.
        self._client = await connect(self._url, client_name=self.client_name, retry=False)
        try:
            pubsub = self._client.pubsub()
            await pubsub.subscribe(self._channel)
            for name in list(self._storages):
                await self._load_one(name)(self._client)
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        self._tasks = [
            asyncio.create_task(self._writer(), name="breaker-writer"),
            asyncio.create_task(self._listen(pubsub), name="breaker-listener"),
        ]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=2)
        await stop(self._tasks)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def flush(self) -> None:
        """Wait until every queued write reached Redis (tests, shutdown)."""
        await self._queue.join()

    async def read(self, name: str) -> dict[str, str]:
        """The shared state of ``name`` as Redis holds it now (state, opened_at,
        fail_counter; {} when no worker wrote one). For the admin console."""
        if self._client is None:
            return {}
        raw = await self._client.hgetall(self.key(name))
        return {str(k): str(v) for k, v in raw.items()}

    async def wait_for(self, name: str, state: str) -> None:
        """Wait until the mirror of ``name`` shows ``state`` (an event, not a
        sleep; callers bound it with ``asyncio.timeout``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.storage(name).state == state)

    # --- writes -------------------------------------------------------------
    def push(self, op: _Op) -> None:
        # pybreaker guards itself with a threading lock, so a caller may be on
        # another thread: hop onto the loop then.
        loop = self._loop
        if loop is None or self._client is None:
            return  # not started: local only
        if threading.get_ident() == self._thread:
            self._queue.put_nowait(op)
        else:
            loop.call_soon_threadsafe(self._queue.put_nowait, op)

    def write_field(self, name: str, field: str, value: int) -> _Op:
        async def op(client: aioredis.Redis) -> None:
            await client.hset(self.key(name), field, value)

        return op

    def write_state(self, name: str, state: str, opened_at: float | None) -> _Op:
        async def op(client: aioredis.Redis) -> None:
            if opened_at is None:
                await client.hset(self.key(name), "state", state)
            else:
                await client.hset(self.key(name), mapping={"state": state, "opened_at": opened_at})
            event = {"name": name, "state": state, "opened_at": opened_at,
                     "origin": self._origin}
            await client.publish(self._channel, json.dumps(event))

        return op

    def _load_one(self, name: str) -> _Op:
        async def op(client: aioredis.Redis) -> None:
            raw = await client.hgetall(self.key(name))
            if raw.get("state"):
                opened = raw.get("opened_at")
                self.storage(name).apply_remote(
                    str(raw["state"]), float(opened) if opened else None,
                    int(raw.get("fail_counter", 0)),
                )
                await self._notify()

        return op

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _writer(self) -> None:
        assert self._client is not None
        while True:
            op = await self._queue.get()
            try:
                await op(self._client)
            except RedisError as exc:
                log.warning("breaker state not shared (redis: %s)", type(exc).__name__)
            except Exception:
                log.exception("breaker state write failed")
            finally:
                self._queue.task_done()

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                try:
                    await self._follow(pubsub)
                except Exception as exc:
                    # Redis restarted or the network blinked: resubscribe, then
                    # reload every breaker (changes published meanwhile were missed).
                    log.warning("breaker events lost (%s); resubscribing", type(exc).__name__)
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                    pubsub = await self._resubscribe()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _resubscribe(self) -> Any:
        assert self._client is not None
        while True:
            await asyncio.sleep(1.0)  # back off between attempts
            pubsub: Any = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                for name in list(self._storages):
                    await self._load_one(name)(self._client)
                return pubsub
            except Exception as exc:
                log.warning("breaker events: resubscribe failed (%s)", type(exc).__name__)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _follow(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                event = json.loads(message["data"])
            except (TypeError, ValueError):
                continue
            if event.get("origin") == self._origin:
                continue
            name = event.get("name")
            if isinstance(name, str) and name in self._storages:
                self._storages[name].apply_remote(
                    str(event.get("state")), event.get("opened_at"), None
                )
                await self._notify()
