"""State that several workers share through Redis: rate budgets, event claims,
the loop guard's counts.

``RedisState`` owns one async Redis connection (an async context manager)
and gives out:

- ``budget`` (``RedisRateBudget``): per-key outbound pacing. One Lua script
  runs GCRA (a token bucket expressed as a "theoretical arrival time") on
  Redis' own clock, so any number of workers together keep one chat's
  interval and burst; a platform's ``retry_after`` pushes the key's next slot
  for every worker.
- ``lock(name)``: a cross-worker mutex (the shared-memory hash chain needs
  one writer at a time);
- ``claims`` (``RedisEventClaims``): exactly-once handling of platform events.
  ``claim(key, ttl_s)`` is the adapters' ``Dedupe``: ``SET key NX PX ttl``
  (atomic: one worker wins). ``try_claim(key)`` takes a short lease instead,
  renewed while the worker works; ``done(key)`` turns the lease
  into a long-lived "done" marker, ``release(key)`` deletes it so a
  redelivery is handled. A worker killed mid-reply stops renewing: its lease
  expires after ``lease_s`` and the platform's redelivery (Slack retry,
  Telegram webhook retry, a second worker's copy) is claimed by a live one.
  A lease never outlives its owner by more than ``lease_s``.
- ``turns(scope)`` (``RedisBotTurns``): the loop guard's bot-turn counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from persistence.redis.connection import Outage, connect, stop

log = logging.getLogger(__name__)

ClaimResult = Literal["claimed", "done", "busy"]

# GCRA reservation. KEYS[1]: the budget key. ARGV: interval_ms, burst.
# Returns the milliseconds the caller must wait before its slot.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tau = (tonumber(ARGV[2]) - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tau - now
if wait < 0 then wait = 0 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now + 1000)
return wait
"""

# Push the next slot to at least now + ARGV[1] ms (a platform said retry_after).
_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < until_ms then tat = until_ms end
redis.call('SET', KEYS[1], tat, 'PX', tat - now + 1000)
return tat - now
"""

# Owner-checked lease operations. KEYS[1]: claim key; ARGV[1]: our lease value.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisRateBudget:
    """Per-key pacing shared by all workers (see module docstring).

    While Redis does not answer, this worker paces alone (the same GCRA on
    its own clock) and says so once in the log: degraded, never blocked.
    Redis is then asked again only after the ``Outage`` (shared with the
    claims) ends, so a reply's many sends and edits do not each wait for a
    timeout.
    """

    def __init__(self, client: aioredis.Redis, namespace: str,
                 outage: Outage | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._outage = outage or Outage()
        self._clock = clock  # the local pacing's clock (monotonic; tests freeze it)
        self._client = client
        self._ns = namespace
        self._reserve = client.register_script(_RESERVE)
        self._penalize = client.register_script(_PENALIZE)
        self._local: dict[str, float] = {}  # key -> theoretical arrival time (monotonic)
        self._degraded = False

    def _fallback(self, exc: Exception) -> None:
        if not self._degraded:
            log.warning("rate budget: redis unavailable (%s); pacing this worker alone",
                        type(exc).__name__)
        self._degraded = True
        self._outage.failed()

    def _alone(self) -> bool:
        return self._outage.ongoing

    def _reserve_locally(self, key: str, interval_s: float, burst: int) -> float:
        now = self._clock()
        tat = max(self._local.get(key, now), now)
        self._local[key] = tat + interval_s
        return max(tat - (max(burst, 1) - 1) * interval_s - now, 0.0)

    def _key(self, key: str) -> str:
        return f"{self._ns}:budget:{key}"

    async def reserve(self, key: str, interval_s: float, burst: int = 1) -> float:
        """Take the next slot of ``key``; return the seconds to wait for it."""
        interval_ms = max(1, round(interval_s * 1000))
        if self._alone():
            return self._reserve_locally(key, interval_s, burst)
        try:
            wait_ms = await self._reserve(keys=[self._key(key)],
                                          args=[interval_ms, max(1, burst)])
        except (RedisError, OSError) as exc:
            self._fallback(exc)
            return self._reserve_locally(key, interval_s, burst)
        self._degraded = False
        return int(wait_ms) / 1000

    async def acquire(self, key: str, interval_s: float, burst: int = 1) -> None:
        """Wait until ``key`` may be used again (at most ``burst`` back to back)."""
        wait = await self.reserve(key, interval_s, burst)
        if wait > 0:
            await asyncio.sleep(wait)  # pacing itself: the wait is the point

    async def penalize(self, key: str, seconds: float) -> None:
        """No worker uses ``key`` for ``seconds`` (a platform's retry_after)."""
        until = self._clock() + seconds
        self._local[key] = max(self._local.get(key, 0.0), until)
        if self._alone():
            return
        try:
            await self._penalize(keys=[self._key(key)], args=[max(0, round(seconds * 1000))])
        except (RedisError, OSError) as exc:
            self._fallback(exc)


class RedisEventClaims:
    """Exactly-once claims on platform events (see module docstring).

    ``lease_s`` bounds how long a dead worker's claim blocks a redelivery;
    ``done_ttl_s`` how long a handled event is remembered (Slack retries for
    minutes, Telegram for hours: a day is plenty).
    """

    def __init__(
        self, client: aioredis.Redis, namespace: str, *,
        lease_s: float = 30.0, done_ttl_s: float = 86400.0, outage: Outage | None = None,
    ) -> None:
        self._outage = outage or Outage()
        self._client = client
        self._ns = namespace
        self._lease_ms = max(1, round(lease_s * 1000))
        self._done_ms = max(1, round(done_ttl_s * 1000))
        self._token = f"lease:{uuid.uuid4().hex}"
        self._held: set[str] = set()
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._renewer: asyncio.Task[None] | None = None

    def _key(self, key: str) -> str:
        return f"{self._ns}:event:{key}"

    async def claim(self, key: str, ttl_s: float = 600.0) -> bool:
        """``adapters.chat.dedupe.Dedupe``: True for the first claim of ``key``
        within ``ttl_s`` (one ``SET NX PX``, whichever worker asks).

        Redis unreachable: True. A possible duplicate answer beats a lost
        message (a redelivery is then answered again)."""
        full = self._key(key)
        if self._outage.ongoing:
            return True
        try:
            return bool(await self._client.set(full, self._token, nx=True,
                                               px=max(1, round(ttl_s * 1000))))
        except (RedisError, OSError) as exc:
            self._outage.failed()
            log.warning("event claim: redis unavailable (%s); handling %s anyway",
                        type(exc).__name__, key)
            return True

    async def try_claim(self, key: str) -> ClaimResult:
        """Claim with a renewed lease (until ``done`` or ``release``):
        ``claimed`` (yours), ``done`` (already answered) or ``busy`` (a live
        worker holds it; a redelivery after its lease expires may retry)."""
        full = self._key(key)
        if await self._client.set(full, self._token, nx=True, px=self._lease_ms):
            self._held.add(full)
            self._ensure_renewer()
            return "claimed"
        current = await self._client.get(full)
        return "done" if current == "done" else "busy"

    async def done(self, key: str) -> None:
        """The event was handled: remember it, so redeliveries are dropped."""
        full = self._key(key)
        self._held.discard(full)
        if not await self._finish(keys=[full], args=[self._token, self._done_ms]):
            # Our lease had expired (a very slow reply): still mark it handled.
            await self._client.set(full, "done", px=self._done_ms)

    async def release(self, key: str) -> None:
        """Handling failed before anything was sent: let a redelivery retry."""
        full = self._key(key)
        self._held.discard(full)
        try:
            await self._release(keys=[full], args=[self._token])
        except (RedisError, OSError) as exc:  # the claim expires by itself
            log.warning("event claim release failed: %s", type(exc).__name__)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop(), name="claim-renewer")

    async def _renew_loop(self) -> None:
        # Renew at a third of the lease: two missed renewals still keep it.
        while self._held:
            await asyncio.sleep(self._lease_ms / 3000)
            for full in list(self._held):
                try:
                    if not await self._renew(keys=[full], args=[self._token, self._lease_ms]):
                        self._held.discard(full)  # expired and maybe re-claimed: not ours
                except Exception as exc:  # a Redis blip: try again next round
                    log.warning("claim lease renewal failed: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._renewer is not None:
            await stop([self._renewer])
        # Leases we still hold are released: a clean shutdown hands them on now.
        for full in list(self._held):
            with contextlib.suppress(Exception):
                await self._release(keys=[full], args=[self._token])
        self._held.clear()


# The loop guard's count. KEYS[1]: the chat's counter. ARGV: limit, ttl_ms.
_TAKE_TURN = """
local turns = tonumber(redis.call('GET', KEYS[1]) or '0')
if turns >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], turns + 1, 'PX', ARGV[2])
return 1
"""


class RedisBotTurns:
    """The loop guard's per-chat bot-turn counts, shared by workers
    (``adapters.chat.gate.BotTurns``): a bot's messages spread over several
    workers still get at most ``max_bot_turns`` answers in a row.

    A count is forgotten after a day without bot turns. While Redis does not
    answer, this worker counts alone (the guard still holds per worker).
    """

    TTL_MS = 86_400_000

    def __init__(self, client: aioredis.Redis, prefix: str,
                 outage: Outage | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._take = client.register_script(_TAKE_TURN)
        self._local: dict[str, int] = {}
        self._outage = outage or Outage()

    async def take(self, chat: str, limit: int) -> bool:
        try:
            if not self._outage.ongoing:
                return bool(await self._take(keys=[f"{self._prefix}:{chat}"],
                                             args=[limit, self.TTL_MS]))
        except (RedisError, OSError) as exc:
            self._outage.failed()
            log.warning("loop guard: redis unavailable (%s); counting this worker alone",
                        type(exc).__name__)
        turns = self._local.get(chat, 0)
        if turns >= limit:
            return False
        if len(self._local) > 10_000:  # bounded: a Redis outage is not a leak
            self._local.clear()
        self._local[chat] = turns + 1
        return True

    async def reset(self, chat: str) -> None:
        self._local.pop(chat, None)
        try:
            if not self._outage.ongoing:
                await self._client.delete(f"{self._prefix}:{chat}")
        except (RedisError, OSError) as exc:
            self._outage.failed()
            log.warning("loop guard reset: redis unavailable (%s)", type(exc).__name__)


class RedisState:
    """One Redis connection for budgets and claims; an async context manager."""

    def __init__(self, url: str, *, namespace: str = "boternity", lease_s: float = 30.0) -> None:
        self._url = url
        self._ns = namespace
        self._lease_s = lease_s
        self._client: aioredis.Redis | None = None
        self._outage = Outage()
        self._claims: RedisEventClaims | None = None
        self._budget: RedisRateBudget | None = None

    @property
    def budget(self) -> RedisRateBudget:
        if self._budget is None:
            raise RuntimeError("RedisState used outside 'async with'")
        return self._budget

    @property
    def claims(self) -> RedisEventClaims:
        if self._claims is None:
            raise RuntimeError("RedisState used outside 'async with'")
        return self._claims

    def turns(self, scope: str) -> RedisBotTurns:
        """The loop guard's counters of one bot on one platform (``telegram:<bot>``)."""
        if self._client is None:
            raise RuntimeError("RedisState used outside 'async with'")
        return RedisBotTurns(self._client, f"{self._ns}:botturns:{scope}", self._outage)

    def lock(self, name: str, *, timeout_s: float = 30.0) -> AbstractAsyncContextManager[Any]:
        """A cross-worker mutex (redis-py's ``Lock``: token-checked release,
        expires after ``timeout_s`` if its holder dies)."""
        if self._client is None:
            raise RuntimeError("RedisState used outside 'async with'")
        return self._client.lock(f"{self._ns}:lock:{name}", timeout=timeout_s,
                                 blocking_timeout=timeout_s * 2)

    async def ping(self) -> bool:
        """Readiness: True when Redis answers."""
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def __aenter__(self) -> RedisState:
        self._client = client = await connect(self._url)
        self._outage = outage = Outage()
        self._budget = RedisRateBudget(client, self._ns, outage)
        self._claims = RedisEventClaims(client, self._ns, lease_s=self._lease_s,
                                        outage=outage)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._claims is not None:
            await self._claims.close()
        if self._client is not None:
            await self._client.aclose()
        self._client = self._claims = self._budget = None
