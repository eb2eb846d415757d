"""What the operator console shows live, platform-neutral: recent replies, the
providers' breakers, the platforms' connections.

- ``ReplyLog`` (a ``ReplyObserver``) keeps the last replies of this process
  (who served, failovers, latency, tokens, cost; never the text) and counts
  served/failed per provider. It answers the overview's numbers: replies per
  minute, failovers, latency p50/p95.
- ``ProviderBoard`` reads every provider's breaker (``state`` is ``closed``,
  ``open``, ``half-open`` or ``cooling down``) with its last error and
  cooldown, and ``reset`` closes a breaker by hand (with Redis-shared
  breakers the storage writes the closed state through to every worker).
- ``Connections`` remembers since when each platform is connected or not.

Per-process by nature (the ring of replies, served/failed counts, last
errors); breaker states are the shared truth when breakers share a storage.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from engine.errors import AdminError
from engine.ports import Provider
from engine.providers.fallback import Breakers
from engine.types import IncomingMessage, Reply

KEEP_REPLIES = 2000

Cost = Callable[[str, Reply], float]  # (provider, reply) -> USD


@dataclass(frozen=True)
class ReplyEntry:
    """One served (or failed) reply, without its text."""

    at: datetime
    bot: str
    platform: str
    chat: str
    served_by: str | None
    failovers: tuple[str, ...]  # providers that failed or were skipped, in order
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    error: str | None


class ReplyLog:
    """The last ``keep`` replies of this process and per-provider counters."""

    def __init__(self, *, keep: int = KEEP_REPLIES, cost: Cost | None = None) -> None:
        self._entries: deque[ReplyEntry] = deque(maxlen=keep)
        self._cost = cost
        self.served: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        served = reply.served_by
        cost = self._cost(served, reply) if served and self._cost else 0.0
        self._entries.append(ReplyEntry(
            at=datetime.now(UTC), bot=message.bot, platform=message.platform,
            chat=message.chat, served_by=served,
            failovers=tuple(f.provider for f in reply.failures), latency_s=reply.latency_s,
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens, cost_usd=cost, error=reply.error))
        if served:
            self.served[served] += 1
        for failure in reply.failures:
            self.failed[failure.provider] += 1

    def recent(self, limit: int = 50, *, bot: str | None = None) -> list[ReplyEntry]:
        """Newest first."""
        found = [e for e in reversed(self._entries) if bot is None or e.bot == bot]
        return found[:limit]

    def per_minute(self, minutes: int = 60, *, now: datetime | None = None) -> list[int]:
        """Replies in each of the last ``minutes`` minutes, oldest first."""
        now = now or datetime.now(UTC)
        counts = [0] * minutes
        for entry in self._entries:
            age = int((now - entry.at) / timedelta(minutes=1))
            if 0 <= age < minutes:
                counts[minutes - 1 - age] += 1
        return counts

    def summary(self, *, window_s: float = 3600) -> dict[str, float | int]:
        """Replies, failovers and latency p50/p95 over the last ``window_s`` seconds."""
        since = datetime.now(UTC) - timedelta(seconds=window_s)
        window = [e for e in self._entries if e.at >= since]
        latencies = sorted(e.latency_s for e in window if e.served_by)
        return {
            "replies": len(window),
            "failovers": sum(1 for e in window if e.failovers),
            "errors": sum(1 for e in window if e.error),
            "latency_p50_s": _quantile(latencies, 0.5),
            "latency_p95_s": _quantile(latencies, 0.95),
        }


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (0 when empty)."""
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))
    return round(values[index], 3)


@dataclass(frozen=True)
class ProviderState:
    name: str
    kind: str
    model: str
    state: str  # "closed" | "open" | "half-open" | "cooling down"
    last_error: str | None
    last_error_at: datetime | None
    cooldown_until: datetime | None
    served: int
    failed: int
    fail_counter: int


@dataclass
class ProviderBoard:
    """Every started provider's breaker, and a hand reset (see module docstring)."""

    breakers: Callable[[], Breakers]  # read at call time: wiring may swap it for a shared one
    providers: Mapping[str, Provider]
    kinds: Mapping[str, str]
    log: ReplyLog

    def states(self) -> list[ProviderState]:
        breakers = self.breakers()
        out = []
        for name, provider in self.providers.items():
            record = breakers.record(name)
            left = record.cooldown_until - time.monotonic()
            out.append(ProviderState(
                name=name, kind=self.kinds.get(name, ""), model=provider.model,
                state=breakers.state(name), last_error=record.last_error,
                last_error_at=record.last_error_at,
                cooldown_until=datetime.now(UTC) + timedelta(seconds=left) if left > 0 else None,
                served=self.log.served[name], failed=self.log.failed[name],
                fail_counter=breakers.get(name).fail_counter))
        return out

    def reset(self, name: str) -> ProviderState:
        """Close ``name``'s breaker and end its cooldown; the last error stays for the record."""
        if name not in self.providers:
            raise AdminError(f"unknown provider '{name}'")
        breakers = self.breakers()
        breakers.get(name).close()
        breakers.record(name).cooldown_until = 0.0
        return next(s for s in self.states() if s.name == name)


@dataclass(frozen=True)
class Connection:
    name: str  # "telegram:demo"
    connected: bool
    since: datetime


class Connections:
    """Since when each platform check has said connected (or not), as last observed."""

    def __init__(self, checks: Mapping[str, Callable[[], Awaitable[bool]]]) -> None:
        self._checks = checks  # the live dict: platforms add theirs as they start
        self._seen: dict[str, Connection] = {}

    async def poll(self, prefixes: Sequence[str] = ("telegram:", "slack:", "discord:")
                   ) -> list[Connection]:
        out = []
        for name, check in list(self._checks.items()):
            if not name.startswith(tuple(prefixes)):
                continue
            try:
                connected = bool(await check())
            except Exception:
                connected = False  # a failing check is a disconnected platform
            seen = self._seen.get(name)
            if seen is None or seen.connected != connected:
                seen = self._seen[name] = Connection(name, connected, datetime.now(UTC))
            out.append(seen)
        return out
