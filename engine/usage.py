"""Token and cost accounting, and daily budgets.

- ``UsageAccounting.on_reply`` (a ``ReplyObserver``) records one
  ``UsageRecord`` per served reply: the tokens the serving provider reported,
  or the pipeline's estimate (~4 characters per token) marked ``estimated``,
  and the cost at that provider's prices. After a failover the provider that
  actually served is charged; providers that failed are not (their partial
  usage is not reported to us).
- ``UsageAccounting.skip`` is the fallback chain's skip rule: when a bot (or a
  user of it) has spent its daily budget, a provider with a price is skipped
  for the next one in the chain, and the reason lands in the reply's footer.
  Free providers (price 0: local, self-hosted) are never skipped.
- Background memory extraction and judging spend tokens too: they are
  recorded through ``UsageAccounting.extraction`` with ``kind="extraction"``
  and count against the same budgets, but are not replies.
- ``usage_report`` renders per bot, provider and day: replies, tokens (``~``
  marks estimated ones) and cost, then the extraction calls in their own
  table. The CLI and the ``/usage`` admin command both print it.

Days are UTC days. Budgets compare what was spent since UTC midnight, read
from the store when a costly provider is next in line (so every process
sharing the database sees the same total), cached for ``spent_cache_s``
(2 s) to keep a database round trip off most replies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from time import monotonic
from typing import Literal, Protocol

from engine.errors import StorageError
from engine.ports import Provider
from engine.types import CompletionRequest, IncomingMessage, Reply, Usage

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
SkipRule = Callable[[Provider, CompletionRequest], Awaitable["str | None"]]
UsageKind = Literal["reply", "extraction"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def day_start(moment: datetime) -> datetime:
    """UTC midnight of ``moment``'s UTC day."""
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


@dataclass(frozen=True)
class Price:
    """USD per million tokens, as ``price_input_per_mtok`` / ``price_output_per_mtok``."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    @property
    def costly(self) -> bool:
        return self.input_per_mtok > 0 or self.output_per_mtok > 0

    def cost(self, usage: Usage) -> float:
        return (usage.prompt_tokens * self.input_per_mtok
                + usage.completion_tokens * self.output_per_mtok) / 1_000_000


@dataclass(frozen=True)
class Budget:
    """Daily limits in USD for one bot; None means unlimited."""

    bot_usd_per_day: float | None = None
    user_usd_per_day: float | None = None


@dataclass(frozen=True)
class UsageRecord:
    """What one served reply used and cost."""

    at: datetime
    bot: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cost_usd: float
    model: str = ""
    user: str = ""
    chat: str = ""
    platform: str = ""
    kind: UsageKind = "reply"  # "extraction": background memory work, not a reply


@dataclass(frozen=True)
class UsageLine:
    """One row of the report: a bot's use of one provider on one UTC day.

    ``replies`` counts the rows: replies, or extraction calls for that kind.
    """

    day: date
    bot: str
    provider: str
    replies: int
    prompt_tokens: int
    completion_tokens: int
    estimated_replies: int
    cost_usd: float
    kind: UsageKind = "reply"


class UsageStore(Protocol):
    """Where usage records live (``persistence/sql/usage.py``)."""

    async def add(self, record: UsageRecord) -> None: ...

    async def spent(self, *, bot: str, since: datetime) -> dict[str, float]:
        """Cost since ``since`` per user of ``bot`` ("" = no user)."""
        ...

    async def summary(self, *, since: datetime, bot: str | None = None) -> list[UsageLine]:
        """Lines per (day, bot, provider, kind) since ``since``, oldest day first."""
        ...


class UsageAccounting:
    """Records usage (as a ``ReplyObserver``) and enforces budgets (as a skip rule)."""

    def __init__(
        self,
        store: UsageStore,
        *,
        prices: Mapping[str, Price],
        budgets: Mapping[str, Budget] | None = None,
        clock: Clock = utcnow,
        spent_cache_s: float = 2.0,
    ) -> None:
        self.store = store
        self.prices = dict(prices)
        self.budgets = dict(budgets or {})
        self.clock = clock
        self.spent_cache_s = spent_cache_s
        # bot -> (monotonic expiry, UTC day, cost per user): today's spending
        self._spent: dict[str, tuple[float, date, dict[str, float]]] = {}

    @property
    def extraction(self) -> ReplyObserverOfKind:
        """An observer for background memory work: its rows are ``kind="extraction"``."""
        return ReplyObserverOfKind(self, "extraction")

    def record_for(
        self, message: IncomingMessage, reply: Reply, kind: UsageKind = "reply"
    ) -> UsageRecord | None:
        """The record a reply earns, or None when no provider served it."""
        if reply.served_by is None:
            return None
        usage = reply.usage
        price = self.prices.get(reply.served_by, Price())
        return UsageRecord(
            at=self.clock(), bot=message.bot, provider=reply.served_by,
            model=reply.model or "", user=message.user, chat=message.chat,
            platform=message.platform, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, estimated=usage.estimated,
            cost_usd=price.cost(usage), kind=kind,
        )

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        await self.record(message, reply, "reply")

    async def record(self, message: IncomingMessage, reply: Reply, kind: UsageKind) -> None:
        """Store what ``reply`` used (nothing if nobody served it); count it today."""
        record = self.record_for(message, reply, kind)
        if record is None:
            return
        await self.store.add(record)
        cached = self._spent.get(record.bot)
        if cached is not None and cached[1] == record.at.astimezone(UTC).date():
            # Our own spending counts at once; other processes' within spent_cache_s.
            cached[2][record.user] = cached[2].get(record.user, 0.0) + record.cost_usd

    async def spent_today(self, bot: str) -> dict[str, float]:
        """Cost per user of ``bot`` since UTC midnight (cached ``spent_cache_s``)."""
        now = self.clock()
        today = now.astimezone(UTC).date()
        cached = self._spent.get(bot)
        if cached is not None and cached[1] == today and cached[0] > monotonic():
            return cached[2]
        spent = await self.store.spent(bot=bot, since=day_start(now))
        self._spent[bot] = (monotonic() + self.spent_cache_s, today, spent)
        return spent

    def skip_for(self, bot: str) -> SkipRule:
        """The skip rule for the chain of ``bot`` (when a request does not name it)."""

        async def rule(provider: Provider, request: CompletionRequest) -> str | None:
            return await self.skip(provider, request, bot=bot)

        return rule

    async def skip(
        self, provider: Provider, request: CompletionRequest, *, bot: str = ""
    ) -> str | None:
        """The chain's skip rule: a reason to pass over ``provider``, or None.

        Reads today's spending from the store, so every process sharing the
        database enforces the same budget (another process's spending shows
        within ``spent_cache_s``; this process's at once). A store failure
        never blocks a reply: the provider is then not skipped.
        """
        if not self.prices.get(provider.name, Price()).costly:
            return None
        bot = request.bot or bot
        budget = self.budgets.get(bot, Budget())
        if budget == Budget():
            return None
        try:
            spent = await self.spent_today(bot)
        except StorageError as exc:
            log.warning("bot %s: budget check skipped, usage unreadable: %s", bot, exc)
            return None
        limit = budget.bot_usd_per_day
        if limit is not None and sum(spent.values()) >= limit:
            return f"over the bot's daily budget ({_usd(limit)})"
        limit = budget.user_usd_per_day
        if limit is not None and request.user and spent.get(request.user, 0.0) >= limit:
            return f"over your daily budget ({_usd(limit)})"
        return None


class ReplyObserverOfKind:
    """A ``ReplyObserver`` that records usage under one kind (see ``extraction``)."""

    def __init__(self, accounting: UsageAccounting, kind: UsageKind) -> None:
        self.accounting = accounting
        self.kind: UsageKind = kind

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        await self.accounting.record(message, reply, self.kind)


def _usd(amount: float) -> str:
    # Cents for real budgets; small test budgets keep their significant digits.
    return f"${amount:.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.2g}"


def _table(lines: Sequence[UsageLine], count: str) -> list[str]:
    rows = [f"{'day':<10}  {'bot':<14} {'provider':<14} {count:>7} "
            f"{'tokens in':>11} {'tokens out':>11} {'cost USD':>10}"]
    for line in lines:
        mark = "~" if line.estimated_replies else ""
        tokens_in, tokens_out = f"{mark}{line.prompt_tokens}", f"{mark}{line.completion_tokens}"
        rows.append(
            f"{line.day.isoformat():<10}  {line.bot[:14]:<14} {line.provider[:14]:<14} "
            f"{line.replies:>7} {tokens_in:>11} {tokens_out:>11} {line.cost_usd:>10.4f}"
        )
    return rows


def format_report(lines: Sequence[UsageLine], *, days: int) -> str:
    """Plain-text tables (fit a chat message); ``~`` marks estimated tokens.

    Replies first, then background memory extraction calls in their own
    table; the total cost covers both (both count against budgets).
    """
    if not lines:
        return f"No usage recorded in the last {days} day(s)."
    replies = [line for line in lines if line.kind == "reply"]
    extraction = [line for line in lines if line.kind == "extraction"]
    rows = _table(replies, "replies") if replies else []
    if extraction:
        rows.append("memory extraction (background, not replies):")
        rows += _table(extraction, "calls")
    total = sum(line.cost_usd for line in lines)
    spent_on = f" (memory extraction: ${sum(line.cost_usd for line in extraction):.4f})" \
        if extraction else ""
    rows.append(f"total cost: ${total:.4f} over the last {days} day(s){spent_on}")
    if any(line.estimated_replies for line in lines):
        rows.append("~ some token counts are estimated (~4 characters per token): "
                    "the provider did not report usage")
    return "\n".join(rows)


async def usage_report(
    store: UsageStore, *, bot: str | None = None, days: int = 7, now: datetime | None = None,
) -> str:
    """Usage per bot, provider and UTC day for the last ``days`` days (today included)."""
    days = max(1, days)
    since = day_start(now or utcnow()) - timedelta(days=days - 1)
    return format_report(await store.summary(since=since, bot=bot), days=days)
