"""Retention and bot deletion: old data goes on schedule, a deleted bot goes whole.

``Retention.purge()`` applies each bot's ``history_days`` (messages, files,
recall records older than that) and ``memory_days`` (facts, history
included, created longer ago); ``None`` keeps everything. ``dry_run``
counts without deleting (``boternity purge --dry-run``). ``run(every_s)``
purges in the background until cancelled, telling ``on_purged`` what went
(the composition root logs it and counts it in a metric).

``delete_bot(bot)`` drops the bot's memory table, orphans the shared facts
it wrote (they stay, marked), and deletes its messages, files and recall
records (``boternity bot delete``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from engine.errors import AdminError, BoternityError
from engine.types import Fact

log = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0


class BotRecords(Protocol):
    """The relational side (``persistence.sql.erasure.SqlErasure``)."""

    async def purge(self, bot: str, before: datetime, *,
                    dry_run: bool = False) -> dict[str, int]: ...

    async def delete_bot(self, bot: str) -> dict[str, int]: ...


class AgingMemory(Protocol):
    """What retention needs of a bot's memory table (``LanceMemoryStore``)."""

    def iterate(self, bot: str) -> AsyncIterator[Fact]: ...

    async def delete_ids(self, bot: str, fact_ids: Sequence[str]) -> int: ...

    async def drop_bot(self, bot: str) -> None: ...


class Scrubber(Protocol):
    async def scrub(self, bot: str, fact_ids: Collection[str]) -> int: ...


class Orphaner(Protocol):
    async def orphan_bot(self, bot: str) -> int: ...


@dataclass(frozen=True)
class Rule:
    """How long one bot keeps things (days; None = keep)."""

    history_days: int | None = None
    memory_days: int | None = None


@dataclass
class Retention:
    """See the module docstring. ``rules`` name every configured bot."""

    rules: Mapping[str, Rule]
    records: BotRecords
    memory: AgingMemory | None = None
    recall_log: Scrubber | None = None
    shared: Orphaner | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    async def purge(self, *, dry_run: bool = False) -> dict[str, dict[str, int]]:
        """Per bot with a rule, what went (or would go): messages, files, recall_log, memories."""
        now = self.clock()
        done: dict[str, dict[str, int]] = {}
        for bot, rule in self.rules.items():
            counts: dict[str, int] = {}
            if rule.history_days is not None:
                counts.update(await self.records.purge(
                    bot, now - timedelta(days=rule.history_days), dry_run=dry_run))
            if rule.memory_days is not None and self.memory is not None:
                counts["memories"] = await self._age_memory(
                    bot, now - timedelta(days=rule.memory_days), dry_run)
            if counts:
                done[bot] = counts
        return done

    async def _age_memory(self, bot: str, before: datetime, dry_run: bool) -> int:
        assert self.memory is not None
        old = [f.id async for f in self.memory.iterate(bot)
               if f.created_at is not None and f.created_at < before]
        if dry_run or not old:
            return len(old)
        count = await self.memory.delete_ids(bot, old)
        if self.recall_log is not None:
            await self.recall_log.scrub(bot, old)  # "why" must not show a purged fact
        return count

    async def run(self, every_s: float = PURGE_EVERY_S, *,
                  on_purged: Callable[[dict[str, dict[str, int]]], Awaitable[None] | None]
                  | None = None) -> None:
        """Purge now and then every ``every_s`` until cancelled; errors are logged."""
        while True:
            try:
                done = await self.purge()
                if on_purged is not None:
                    result = on_purged(done)
                    if result is not None:
                        await result
            except BoternityError as exc:
                log.error("retention purge failed (next try in %.0fs): %s", every_s, exc)
            await asyncio.sleep(every_s)

    async def delete_bot(self, bot: str) -> dict[str, int]:
        """Drop ``bot``'s memory table, orphan its shared facts, delete its records.

        The bot need not be configured any more: removing it from the config
        first, then deleting what it left, is the usual order.
        """
        if not bot.strip():
            raise AdminError("name the bot to delete")
        counts: dict[str, int] = {}
        if self.memory is not None:
            counts["memories"] = sum([1 async for _ in self.memory.iterate(bot)])
            await self.memory.drop_bot(bot)
        if self.shared is not None:
            counts["shared_orphaned"] = await self.shared.orphan_bot(bot)
        counts.update(await self.records.delete_bot(bot))
        return counts


def has_rules(rules: Mapping[str, Rule]) -> bool:
    """Whether any bot keeps something for a limited time (else no purge task runs)."""
    return any(r.history_days is not None or r.memory_days is not None for r in rules.values())
