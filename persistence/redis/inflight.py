"""Replies in flight, shared by workers: a worker killed mid-reply loses nothing.

Platforms get their acknowledgement before the reply is written (Slack and
Discord want one within 3 s), so after a ``kill -9`` no platform redelivers
the message. ``RedisInflight`` is the redelivery instead:

- ``begin(message)`` records the message (its text and ids; attachments stay
  with the platform) under a lease, unless it is already answered or a live
  worker holds it: then it returns False and the caller does nothing;
- the owner renews its leases while it works; ``finish(message)`` drops the
  record and remembers the message as answered (a later duplicate is
  refused);
- every worker sweeps for records whose lease ran out (their worker died),
  takes each over atomically (one Lua script: exactly one sweeper wins) and
  re-submits the message to its own handler for that platform and bot.

A worker that cannot renew a lease (Redis gone for it alone) stops that
reply itself before the lease can run out: the worker that takes the message
over then gives the only answer. A reply finished while Redis is away
keeps its lease and is marked answered at the next renewal round; only an
outage longer than the lease can then get it answered twice.

Redis' own clock decides expiry, so worker clocks never matter. Bot names
must not contain ``:`` (the event key is ``platform:bot:chat:message_id``).
Keys:
``{ns}:inflight`` (sorted set: event -> lease expiry in ms),
``{ns}:inflight:data`` / ``:owner`` (hashes), ``{ns}:answered:{event}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.log_context import bind
from engine.ports import ConversationStore
from engine.types import IncomingMessage, Role, StoredMessage
from persistence.redis.connection import TIMEOUT_S, Outage, connect, stop

log = logging.getLogger(__name__)

Resubmit = Callable[[IncomingMessage], object]

# The event this task is replying to (set by ``begin``): lets the store below
# recognise a taken-over reply's user message, already committed by the dead worker.
current_event: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "boternity_current_event", default=None)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: zset, data, owner, answered. ARGV: event, payload, token, lease_ms.
_BEGIN = _NOW + """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) > now then
  -- a live lease: ours after a take-over (go on), else someone else's
  if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[3] then return 1 end
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""
# KEYS: zset, owner. ARGV: token, lease_ms, events... Returns 1/0 per event (still ours).
_RENEW = _NOW + """
local kept = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[i])
    kept[#kept + 1] = 1
  else
    kept[#kept + 1] = 0
  end
end
return kept
"""
# KEYS: zset, data, owner, answered. ARGV: event, token, answered_ttl_ms.
_FINISH = """
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
# KEYS: zset, data, owner. ARGV: event, token, lease_ms. Returns the payload or false.
_TAKE_OVER = _NOW + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) > now then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[2], ARGV[1])
"""
_EXPIRED = _NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""


def event_key(message: IncomingMessage) -> str | None:
    """The message's identity across redeliveries (None when it has no id)."""
    if not message.message_id:
        return None
    return f"{message.platform}:{message.bot}:{message.chat}:{message.message_id}"


def _dump(message: IncomingMessage) -> str:
    fields = dataclasses.asdict(dataclasses.replace(message, attachments=()))
    return json.dumps(fields)


def _load(payload: str) -> IncomingMessage:
    fields: dict[str, Any] = json.loads(payload)
    fields["attachments"] = ()
    return IncomingMessage(**fields)


class RedisInflight:
    """See the module docstring. An async context manager (it owns two tasks)."""

    def __init__(
        self, url: str, *, namespace: str = "boternity", lease_s: float = 30.0,
        answered_ttl_s: float = 86400.0,
    ) -> None:
        self._url = url
        self._ns = namespace
        self._lease_ms = max(1, round(lease_s * 1000))
        self._answered_ms = max(1, round(answered_ttl_s * 1000))
        self._token = uuid.uuid4().hex
        self._held: set[str] = set()
        self._deadline: dict[str, float] = {}  # event -> our lease's end at the latest
        self._replies: dict[str, asyncio.Task[Any]] = {}  # event -> the task answering it
        self._stoppers: set[asyncio.Task[None]] = set()
        self._unfinished: set[str] = set()  # answered, not yet recorded (Redis was away)
        self._outage = Outage()
        self._routes: dict[tuple[str, str], Resubmit] = {}
        self._client: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.taken_over = 0  # messages this worker took over from a dead one

    # -- keys -----------------------------------------------------------
    @property
    def _zset(self) -> str:
        return f"{self._ns}:inflight"

    def _hashes(self) -> list[str]:
        return [self._zset, f"{self._ns}:inflight:data", f"{self._ns}:inflight:owner"]

    def _answered(self, event: str) -> str:
        return f"{self._ns}:answered:{event}"

    @property
    def namespace(self) -> str:
        return self._ns

    @property
    def answered_ttl_ms(self) -> int:
        return self._answered_ms

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisInflight used outside 'async with'")
        return self._client

    # -- the contract ---------------------------------------------------
    def route(self, platform: str, bot: str, resubmit: Resubmit) -> None:
        """Where a taken-over message of ``platform``/``bot`` goes on this worker."""
        self._routes[(platform, bot)] = resubmit

    async def begin(self, message: IncomingMessage) -> bool:
        """True: handle it (it is recorded); False: answered or in a live worker's hands."""
        event = event_key(message)
        if event is None:
            return True
        if self._outage.ongoing:
            return True  # Redis failed a moment ago: answer untracked at once
        zset, data, owner = self._hashes()
        asked = time.monotonic()
        try:
            started = await self.client.eval(
                _BEGIN, 4, zset, data, owner, self._answered(event),
                event, _dump(message), self._token, self._lease_ms)
        except (RedisError, OSError) as exc:
            self._outage.failed()
            # Answer it untracked: a lost message is worse than no take-over.
            log.warning("inflight: redis unavailable (%s); %s is not tracked",
                        type(exc).__name__, event)
            return True
        if started:
            self._hold(event, asked)
            if (task := asyncio.current_task()) is not None:
                self._replies[event] = task
            current_event.set(event)
        return bool(started)

    def _hold(self, event: str, asked: float) -> None:
        # Redis set the lease after we asked: it ends no sooner than this.
        self._held.add(event)
        self._deadline[event] = asked + self._lease_ms / 1000

    def _release(self, event: str) -> asyncio.Task[Any] | None:
        self._held.discard(event)
        self._deadline.pop(event, None)
        return self._replies.pop(event, None)

    async def finish(self, message: IncomingMessage) -> None:
        """The reply was delivered (or failed for good): drop the record."""
        event = event_key(message)
        if event is None:
            return
        deadline = self._deadline.get(event)
        self._release(event)
        try:
            await self._finish(event)
        except (RedisError, OSError):
            # Not recorded: keep the lease (no reply to stop) and finish it at
            # the next renewal round, so a Redis blip does not get it answered twice.
            if deadline is not None:
                self._held.add(event)
                self._deadline[event] = deadline
                self._unfinished.add(event)
            raise

    async def _finish(self, event: str) -> None:
        zset, data, owner = self._hashes()
        await self.client.eval(_FINISH, 4, zset, data, owner, self._answered(event),
                               event, self._token, self._answered_ms)

    # -- lifecycle ------------------------------------------------------
    async def __aenter__(self) -> RedisInflight:
        self._client = await connect(self._url)
        self._tasks = [asyncio.create_task(self._renew_loop(), name="inflight-renew"),
                       asyncio.create_task(self._sweep_loop(), name="inflight-sweep")]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await stop(self._tasks)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- background -----------------------------------------------------
    async def _renew_loop(self) -> None:
        # A third of the lease: a missed round still keeps it.
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            await self.renew()

    async def renew(self) -> None:
        """Renew every lease this worker holds, in one call.

        A lease another worker took over is given up, and so is one that
        would run out before the next round could renew it: its reply is
        cancelled, so the worker that takes the message over answers alone.
        """
        for event in list(self._unfinished):
            with contextlib.suppress(RedisError, OSError):
                await self._finish(event)
                self._unfinished.discard(event)
                self._release(event)
        events = list(self._held)
        if not events:
            return
        zset, _, owner = self._hashes()
        asked = time.monotonic()
        try:
            kept = await self.client.eval(_RENEW, 2, zset, owner, self._token,
                                          self._lease_ms, *events)
        except Exception as exc:  # a Redis blip, or Redis gone for this worker
            self._outage.failed()
            log.warning("inflight lease renewal failed: %s", type(exc).__name__)
            # The next round starts a third of a lease from now and may take
            # two timeouts (one retry): a lease ending before that is lost.
            at_risk = time.monotonic() + self._lease_ms / 3000 + 2 * TIMEOUT_S
            for event in events:
                if self._deadline.get(event, float("inf")) <= at_risk:
                    self._give_up(event, "its lease cannot be renewed (redis unreachable)")
            return
        for event, ours in zip(events, kept, strict=True):
            if ours:
                if event in self._held:  # not finished meanwhile
                    self._deadline[event] = asked + self._lease_ms / 1000
            else:
                self._give_up(event, "another worker took it over")

    def _give_up(self, event: str, why: str) -> None:
        task = self._release(event)
        if task is None or task.done():
            return
        log.warning("stopping the reply to %s: %s; the worker that takes it over answers it",
                    event, why)
        # stop() cancels again if redis-py swallows the cancellation (see connection.py).
        stopper = asyncio.create_task(stop([task]), name=f"stop-reply:{event}")
        self._stoppers.add(stopper)
        stopper.add_done_callback(self._stoppers.discard)

    async def sweep(self) -> int:
        """Take over the expired records this worker can serve; return how many."""
        zset, data, owner = self._hashes()
        expired: list[str] = await self.client.eval(_EXPIRED, 1, zset, 50)
        taken = 0
        for event in expired:
            if event in self._held:
                continue  # ours and still being answered: a renewal was late, not a death
            platform, _, rest = event.partition(":")
            bot = rest.partition(":")[0]
            resubmit = self._routes.get((platform, bot))
            if resubmit is None:
                continue  # another worker serves that bot
            asked = time.monotonic()
            payload = await self.client.eval(_TAKE_OVER, 3, zset, data, owner,
                                             event, self._token, self._lease_ms)
            if not payload:
                continue  # another sweeper was faster, or it was renewed
            self._hold(event, asked)
            message = _load(payload)
            with bind(bot=message.bot, platform=message.platform, chat=message.chat):
                log.warning("taking over %s from a worker that stopped mid-reply", event)
            self.taken_over += 1
            taken += 1
            resubmit(message)
        return taken

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("inflight sweep failed: %s", type(exc).__name__)


class OnceStore:
    """A ``ConversationStore`` that commits each event's user message once.

    ``Conversation`` commits the user's message before calling the LLM; when
    a worker dies after that and another takes the message over, the second
    commit would duplicate it. Inside a reply that ``begin`` started, the
    first commit of the user message records its row id in Redis
    (``{ns}:stored:{event}``, kept as long as the answered marker) and a
    later commit for the same event returns that id instead of a new row.
    """

    def __init__(self, inner: ConversationStore, inflight: RedisInflight) -> None:
        self._inner = inner
        self._inflight = inflight

    async def add(self, *, bot: str, chat: str, role: Role, content: str, user: str = "",
                  platform: str = "", served_by: str | None = None,
                  user_name: str = "") -> int:
        event = current_event.get()
        if role != "user" or event is None:
            return await self._inner.add(bot=bot, chat=chat, role=role, content=content,
                                         user=user, platform=platform, served_by=served_by,
                                         user_name=user_name)
        client = self._inflight.client
        key = f"{self._inflight.namespace}:stored:{event}"
        with contextlib.suppress(RedisError, OSError):  # no Redis: store it, once or twice
            if (known := await client.get(key)) is not None:
                log.info("user message of %s was stored before the take-over", event)
                return int(known)
        row = await self._inner.add(bot=bot, chat=chat, role=role, content=content,
                                    user=user, platform=platform, served_by=served_by,
                                    user_name=user_name)
        with contextlib.suppress(RedisError, OSError):
            await client.set(key, row, px=self._inflight.answered_ttl_ms)
        return row

    async def history(self, bot: str, chat: str, limit: int = 50, *,
                      platform: str | None = None) -> list[StoredMessage]:
        return await self._inner.history(bot, chat, limit, platform=platform)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # count() and other extras of the real store
