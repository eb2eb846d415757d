"""Memory admin, platform-neutral: what ``boternity memory ...``, ``shared ...`` and ``/memory`` do.

Like every admin operation (``engine/admin/``), a small class that receives
its dependencies (ports and plain values) in its constructor; the CLI and
platform commands only parse arguments and render results. Errors are
``AdminError`` (``engine.errors``) with a message fit to show to an admin.

``MemoryAdmin`` (memory and shared memory):
  list / search / add / forget / why / import / export / reembed, and
  shared list / publish / verify.

Import format (JSON Lines, one fact per line)::

    {"text": "Alice is vegetarian", "user": "telegram:42", "category": "personal",
     "importance": 0.8, "metadata": {"source": "crm"}}

``text`` is required; the rest is optional. ``user`` is a user key,
``platform:id`` (``engine/memory/scope.py``; a bare id is refused: which
platform is it?); ``chat`` (from an export) keeps a learned fact in the chat it
was learned in, and without it an imported fact is bot-wide (an admin's).
Every user an admin names (list, search, add, forget, import) goes through
``parse_user``. ``export`` writes the same shape
plus ``id``, ``created_at`` and ``superseded_by``, and ``import`` keeps those
when present, so export -> import restores the history; a line whose ``id``
already exists is skipped, and a line without ``id`` whose text the bot
already holds for that user (same words, case and spacing aside) is skipped
too: importing twice, or re-running an interrupted import, adds nothing. A
bad line is reported with its number and skipped; every other line is still
imported.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import AdminError
from engine.memory.scope import parse_user
from engine.ports import MemoryStore, Progress, RecallLog, SharedMemoryStore
from engine.types import (
    Fact,
    IntegrityReport,
    RecallRecord,
    TrustLevel,
)

IMPORT_BATCH = 256


@dataclass(frozen=True)
class BotInfo:
    """What admin operations need to know about one bot."""

    name: str = ""
    trust_level: TrustLevel = "public"
    trust_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportReport:
    added: int = 0
    skipped: int = 0  # already present (same id, or same user and text)
    errors: tuple[tuple[int, str], ...] = ()  # (line number, what is wrong)
    lines: int = 0


class ImportedFact(BaseModel):
    """One JSON Lines record of ``memory import`` (unknown keys are an error)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4000)
    user: str = Field(default="", max_length=200)
    category: str = Field(default="general", min_length=1, max_length=32)
    importance: float = Field(default=0.5, ge=0, le=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    id: str = Field(default="", max_length=64)
    created_at: datetime | None = None
    superseded_by: str | None = None
    chat: str = Field(default="", max_length=200)

    @field_validator("user")
    @classmethod
    def _user_key(cls, value: str) -> str:
        try:
            return parse_user(value)
        except AdminError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value.strip()

    def to_fact(self, bot: str) -> Fact:
        created = self.created_at
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return Fact(
            id=self.id, text=self.text, bot=bot, user=self.user, category=self.category,
            importance=self.importance, created_at=created, superseded_by=self.superseded_by,
            metadata=json.dumps(self.metadata, ensure_ascii=False) if self.metadata else "",
            chat=self.chat,
        )


def fact_record(fact: Fact) -> dict[str, Any]:
    """A fact as one export record (the import shape plus id, time, history link)."""
    try:
        metadata = json.loads(fact.metadata) if fact.metadata else {}
    except ValueError:
        metadata = {"raw": fact.metadata}
    return {
        "id": fact.id, "text": fact.text, "user": fact.user, "category": fact.category,
        "importance": fact.importance, "metadata": metadata,
        "created_at": fact.created_at.isoformat() if fact.created_at else None,
        "superseded_by": fact.superseded_by, "chat": fact.chat,
    }


def _same(user: str, text: str) -> tuple[str, str]:
    """The key two facts share when they say the same about the same person."""
    return user, " ".join(text.split()).casefold()


def _line_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item["loc"])
            parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
        return "; ".join(parts)
    return str(exc)


@dataclass
class MemoryAdmin:
    """Memory administration over the stores; ``bots`` are the configured bots."""

    store: MemoryStore
    bots: Mapping[str, BotInfo]
    shared: SharedMemoryStore | None = None
    recall_log: RecallLog | None = None

    def _bot(self, bot: str) -> BotInfo:
        if bot not in self.bots:
            known = ", ".join(sorted(self.bots)) or "none"
            raise AdminError(f"unknown bot '{bot}' (configured: {known})")
        return self.bots[bot]

    def _shared(self) -> SharedMemoryStore:
        if self.shared is None:
            raise AdminError("shared memory is not configured")
        return self.shared

    # --- own memories ---

    async def list_facts(
        self, bot: str, *, user: str | None = None, history: bool = False,
        limit: int = 50, offset: int = 0,
    ) -> list[Fact]:
        self._bot(bot)
        return await self.store.list_facts(
            bot, user=None if user is None else parse_user(user), history=history,
            limit=limit, offset=offset,
        )

    async def count(self, bot: str, *, user: str | None = None, history: bool = False) -> int:
        """How many facts ``list_facts`` with these filters would page through."""
        self._bot(bot)
        if user is None:
            return await self.store.count(bot, history=history)
        return sum([1 async for fact in self.store.iterate(bot)
                    if fact.user == user and (history or not fact.superseded_by)])

    async def users(self, bot: str) -> list[str]:
        """Every user a bot holds facts about ("" = general), sorted."""
        self._bot(bot)
        found = {fact.user async for fact in self.store.iterate(bot)}
        return sorted(found)

    async def search(
        self, bot: str, query: str, *, user: str | None = None, limit: int = 10
    ) -> list[Fact]:
        """Nearest facts; ``user`` given: that user's and general facts, else every user's."""
        self._bot(bot)
        user = parse_user(user) if user else None
        users = [user, ""] if user else await self.users(bot)
        if not users:
            return []
        return await self.store.search(bot, query, users=users, limit=limit, min_score=-1.0)

    async def add(
        self, bot: str, text: str, *, user: str = "", category: str = "general",
        importance: float = 0.5, metadata: Mapping[str, Any] | None = None,
    ) -> Fact:
        self._bot(bot)
        try:
            record = ImportedFact(
                text=text, user=user, category=category, importance=importance,
                metadata=dict(metadata or {}),
            )
        except ValidationError as exc:
            raise AdminError(_line_error(exc)) from None
        return await self.store.add(record.to_fact(bot))

    async def promote(self, bot: str, fact_id: str) -> bool:
        """Make a learned fact bot-wide: recalled in every chat (for its user, if any).

        Learned facts stay where they were said; only an admin widens one.
        """
        self._bot(bot)
        return await self.store.promote(bot, fact_id)

    async def forget(self, bot: str, fact_id: str) -> bool:
        """Delete one fact, and its text from the recall log."""
        self._bot(bot)
        done = await self.store.delete(bot, fact_id)
        if done and self.recall_log is not None:
            await self.recall_log.scrub(bot, [fact_id])
        return done

    async def forget_user(self, bot: str, user: str) -> int:
        """Delete every fact about ``user`` (history included), and from the recall log."""
        self._bot(bot)
        user = parse_user(user)
        if not user:
            raise AdminError("name a user to forget (general facts are forgotten one by one)")
        ids = [fact.id async for fact in self.store.iterate(bot) if fact.user == user]
        count = await self.store.delete_user(bot, user)
        if ids and self.recall_log is not None:
            await self.recall_log.scrub(bot, ids)
        return count

    async def why(self, bot: str, chat: str | None = None) -> RecallRecord | None:
        """What the last reply in ``chat`` recalled (``chat=None``: the bot's latest reply)."""
        self._bot(bot)
        if self.recall_log is None:
            raise AdminError("the recall log is not configured")
        if chat is not None:
            return await self.recall_log.last(bot, chat)
        latest = await self.recall_log.chats(bot, limit=1)
        return latest[0] if latest else None

    async def import_lines(
        self, bot: str, lines: Iterable[str], *, progress: Progress | None = None
    ) -> ImportReport:
        """Import JSON Lines; bad lines are reported by number and skipped."""
        self._bot(bot)
        numbered = list(enumerate(lines, start=1))
        total = len(numbered)
        errors: list[tuple[int, str]] = []
        added = skipped = 0
        batch: list[Fact] = []
        # Ids and (user, text) already stored, read once (a store round trip per
        # line would make restoring a 100k-line export take minutes).
        seen: set[str] | None = None
        held: set[tuple[str, str]] | None = None

        async def flush(done: int) -> None:
            nonlocal added
            if batch:
                added += len(await self.store.add_many(batch))
                batch.clear()
            if progress is not None:
                progress(done, total)

        for number, line in numbered:
            if not line.strip():
                continue
            try:
                record = ImportedFact.model_validate_json(line)
            except ValidationError as exc:
                errors.append((number, _line_error(exc)))
                continue
            if record.id:
                if seen is None:
                    seen = {fact.id async for fact in self.store.iterate(bot)}
                if record.id in seen:
                    skipped += 1
                    continue
                seen.add(record.id)
            else:
                if held is None:
                    held = {_same(fact.user, fact.text) async for fact in self.store.iterate(bot)}
                if _same(record.user, record.text) in held:
                    skipped += 1
                    continue
                held.add(_same(record.user, record.text))
            batch.append(record.to_fact(bot))
            if len(batch) >= IMPORT_BATCH:
                await flush(number)
        await flush(total)
        return ImportReport(added=added, skipped=skipped, errors=tuple(errors), lines=total)

    async def export_lines(self, bot: str) -> AsyncIterator[str]:
        """Every fact of a bot, history included, as JSON Lines (no trailing newline)."""
        self._bot(bot)
        async for fact in self.store.iterate(bot):
            yield json.dumps(fact_record(fact), ensure_ascii=False)

    async def reembed(
        self, bots: Sequence[str], *, shared: bool = True, progress: Progress | None = None
    ) -> dict[str, int]:
        """Re-embed the named bots' tables (and the shared one): rows rewritten per table."""
        done: dict[str, int] = {}
        for bot in bots:
            self._bot(bot)
            done[bot] = await self.store.reembed(bot, progress=progress)
        if shared and self.shared is not None:
            done["(shared)"] = await self.shared.reembed(progress=progress)
        return done

    # --- shared memories ---

    async def shared_list(
        self, reader_bot: str, *, user: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Fact]:
        """What ``reader_bot`` may read (any user unless ``user`` is given)."""
        info = self._bot(reader_bot)
        return await self._shared().list_facts(
            reader_bot, info.trust_groups, users=None if user is None else [parse_user(user)],
            limit=limit, offset=offset,
        )

    async def publish(
        self, bot: str, fact_id: str, *, level: TrustLevel | None = None, group: str = ""
    ) -> Fact:
        """Share one of ``bot``'s own facts at ``level`` (default: the bot's level)."""
        info = self._bot(bot)
        fact = await self.store.get(bot, fact_id)
        if fact is None:
            raise AdminError(f"bot '{bot}' has no memory '{fact_id}'")
        level = level or info.trust_level
        if level == "trusted" and not group:
            if len(info.trust_groups) != 1:
                raise AdminError(
                    "trusted facts need a group: pass one of "
                    f"{', '.join(info.trust_groups) or '(the bot has no trust groups)'}"
                )
            group = info.trust_groups[0]
        if level == "trusted" and group not in info.trust_groups:
            raise AdminError(f"bot '{bot}' is not in trust group '{group}'")
        return await self._shared().publish(
            fact, level, group if level == "trusted" else "", author_name=info.name or bot
        )

    async def verify(self) -> IntegrityReport:
        return await self._shared().verify()
