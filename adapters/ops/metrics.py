"""Prometheus metrics of one worker, and the small wrappers that feed them.

``Metrics`` owns its own ``CollectorRegistry`` (not the process-global one),
so each app and each test has clean counters; ``adapters/ops/server.py`` serves it
at ``/metrics``. What feeds it:

- ``ReplyMetrics``: a ``ReplyObserver`` (replies by bot/platform/server and
  outcome, reply latency, failovers by provider and reason, tokens);
- ``TimedMemory``: wraps a ``MemoryPolicy`` and times ``recall``;
- ``MeteredSender``: wraps a platform's ``MessageSender`` and counts sends,
  edits and 429s (``RetryAfter``);
- ``count_purged``: rows the retention purge deleted, per bot and kind;
- breaker states are read at scrape time from a callable (the chains'
  ``status()``), so the gauge is never stale.

Label values are bot, platform and provider NAMES from the configuration:
never user text, never a chat id (unbounded cardinality).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.chat.outbound import Limits, MessageSender, RetryAfter
from engine.ports import MemoryPolicy
from engine.types import Fact, IncomingMessage, Reply

# Reply latency spans a cached answer (<0.1 s) to a slow model (minutes).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
RECALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# "cooling down": the chain's own pause after a 429 with retry-after (engine.providers.fallback)
BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0, "cooling down": 3.0}

BreakerStates = Callable[[], Mapping[str, str]]


class _BreakerCollector(Collector):
    def __init__(self, source: BreakerStates) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "boternity_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open, 3 cooling down "
            "after a 429",
            labels=["provider"],
        )
        for provider, state in sorted(self._source().items()):
            gauge.add_metric([provider], BREAKER_VALUES.get(state, -1.0))
        yield gauge


class Metrics:
    """Every metric of one worker, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.replies = Counter(
            "boternity_replies", "Replies finished, by outcome (ok, failover, error)",
            ["bot", "platform", "served_by", "outcome"], registry=r)
        self.reply_latency = Histogram(
            "boternity_reply_latency_seconds", "Time from message to final reply",
            ["bot", "platform"], buckets=LATENCY_BUCKETS, registry=r)
        self.failovers = Counter(
            "boternity_failovers", "Provider failures that moved a reply to the next provider",
            ["provider", "reason"], registry=r)
        self.tokens = Counter(
            "boternity_tokens", "Tokens by provider and direction (prompt, completion)",
            ["provider", "direction"], registry=r)
        self.recall_latency = Histogram(
            "boternity_recall_latency_seconds", "Long-term memory recall time",
            ["bot"], buckets=RECALL_BUCKETS, registry=r)
        self.platform_sends = Counter(
            "boternity_platform_sends", "Messages sent to a platform", ["platform"], registry=r)
        self.platform_edits = Counter(
            "boternity_platform_edits", "Message edits sent to a platform",
            ["platform"], registry=r)
        self.platform_rate_limited = Counter(
            "boternity_platform_rate_limited",
            "429 / flood-control answers from a platform", ["platform"], registry=r)
        self.events_duplicate = Counter(
            "boternity_events_duplicate",
            "Platform events dropped as already handled or being handled elsewhere",
            ["platform"], registry=r)
        self.purged = Counter(
            "boternity_purged", "Rows deleted by the retention purge, by bot and kind "
            "(messages, files, recall_log, memories)", ["bot", "kind"], registry=r)
        self._breakers: list[BreakerStates] = []
        r.register(_BreakerCollector(self._breaker_states))

    def watch_breakers(self, source: BreakerStates) -> None:
        """Add a source of ``{provider: state}``, read at every scrape."""
        self._breakers.append(source)

    def _breaker_states(self) -> dict[str, str]:
        states: dict[str, str] = {}
        for source in self._breakers:
            states.update(source())
        return states

    def count_purged(self, done: Mapping[str, Mapping[str, int]]) -> None:
        """Record one retention purge (``engine.admin.retention.Retention.run``)."""
        for bot, counts in done.items():
            for kind, count in counts.items():
                self.purged.labels(bot=bot, kind=kind).inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class ReplyMetrics:
    """``ReplyObserver`` that records every finished reply."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        if reply.error is not None or reply.served_by is None:
            outcome = "error"
        elif reply.failures:
            outcome = "failover"
        else:
            outcome = "ok"
        m = self._m
        m.replies.labels(message.bot, message.platform, reply.served_by or "none", outcome).inc()
        m.reply_latency.labels(message.bot, message.platform).observe(reply.latency_s)
        for failure in reply.failures:
            m.failovers.labels(failure.provider, failure.kind).inc()
        if reply.served_by:
            m.tokens.labels(reply.served_by, "prompt").inc(reply.usage.prompt_tokens)
            m.tokens.labels(reply.served_by, "completion").inc(reply.usage.completion_tokens)


class TimedMemory:
    """A ``MemoryPolicy`` that times ``recall`` of the one it wraps."""

    def __init__(self, inner: MemoryPolicy, metrics: Metrics) -> None:
        self._inner = inner
        self._m = metrics

    async def recall(self, message: IncomingMessage) -> list[Fact]:
        start = time.perf_counter()
        try:
            return await self._inner.recall(message)
        finally:
            self._m.recall_latency.labels(message.bot).observe(time.perf_counter() - start)

    def learn(self, message: IncomingMessage, reply: Reply) -> None:
        self._inner.learn(message, reply)

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the port (admin helpers) goes to the wrapped policy.
        return getattr(self._inner, name)


class MeteredSender:
    """A ``MessageSender`` that counts what it sends and the 429s it meets."""

    def __init__(self, inner: MessageSender, metrics: Metrics, platform: str) -> None:
        self._inner = inner
        self._m = metrics
        self._platform = platform
        self.scope: str = inner.scope
        self.limits: Limits = inner.limits
        # The scheduler shows "typing..." only if the sender has ``typing``:
        # forward it when the wrapped sender has it, and only then.
        typing = getattr(inner, "typing", None)
        if typing is not None:
            self.typing: Callable[[str], Awaitable[None]] = typing

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        try:
            message_id = await self._inner.send(chat, text, reply_to)
        except RetryAfter:
            self._m.platform_rate_limited.labels(self._platform).inc()
            raise
        self._m.platform_sends.labels(self._platform).inc()
        return message_id

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        try:
            await self._inner.edit(chat, message_id, text)
        except RetryAfter:
            self._m.platform_rate_limited.labels(self._platform).inc()
            raise
        self._m.platform_edits.labels(self._platform).inc()

    def __getattr__(self, name: str) -> Any:
        # "typing" never falls through: the wrapped sender lacks it (see __init__).
        if name == "typing":
            raise AttributeError(name)
        return getattr(self._inner, name)
