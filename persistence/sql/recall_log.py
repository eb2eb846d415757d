"""Which memories the last reply in each (bot, chat) recalled (the ``RecallLog`` port).

One row per (bot, chat), overwritten by every reply (an upsert, safe when two
replies race), so the table stays as small as the number of chats. The
recalled facts are a JSON list in one column: the row is only ever read
whole, by ``boternity memory why``, possibly from another process.
Table created by revision ``0004_recall_log``.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Collection
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import DateTime, Index, String, Table, Text, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from engine.errors import StorageError
from engine.types import RecalledFact, RecallRecord
from persistence.sql.database import Database
from persistence.sql.tables import Base, utcnow


class RecallRow(Base):
    __tablename__ = "recall_log"

    bot: Mapped[str] = mapped_column(String(100), primary_key=True)
    chat: Mapped[str] = mapped_column(String(200), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(200), default="", server_default="")
    query: Mapped[str] = mapped_column(Text, default="", server_default="")
    facts: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_recall_log_bot_created", "bot", "created_at"),)


@functools.cache
def _upsert(postgres: bool) -> Any:
    """The one-row-per-chat upsert, built once per dialect (the writer batches by
    it), at its first use: importing SQLAlchemy's PostgreSQL dialect takes
    0.1-0.2 s that a SQLite deployment (the demo's start) never needs."""
    dialect = importlib.import_module(
        f"sqlalchemy.dialects.{'postgresql' if postgres else 'sqlite'}")
    statement = dialect.insert(cast(Table, RecallRow.__table__))
    return statement.on_conflict_do_update(
        index_elements=["bot", "chat"],
        set_={k: statement.excluded[k] for k in ("message_id", "query", "facts", "created_at")},
    )


def _record(row: RecallRow) -> RecallRecord:
    created = row.created_at
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)  # SQLite drops the zone; we store UTC
    items: list[dict[str, Any]] = json.loads(row.facts or "[]")
    return RecallRecord(
        bot=row.bot, chat=row.chat, message_id=row.message_id, query=row.query,
        created_at=created, facts=tuple(RecalledFact(**item) for item in items),
    )


_FIELDS = tuple(field.name for field in fields(RecalledFact))


def _item(fact: RecalledFact) -> dict[str, Any]:
    """``asdict(fact)`` without its deep copies (every field is a str or a float)
    nor its ``fields()`` call per fact: this runs on the loop for every reply that
    recalled."""
    return {name: getattr(fact, name) for name in _FIELDS}


class SqlRecallLog:
    """``RecallLog`` on the shared relational database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def record(self, record: RecallRecord) -> None:
        values = {
            "bot": record.bot, "chat": record.chat, "message_id": record.message_id,
            "query": record.query, "created_at": record.created_at or utcnow(),
            "facts": json.dumps([_item(fact) for fact in record.facts], ensure_ascii=False),
        }
        try:
            # Keyed by the row it overwrites: of two records of one chat in a
            # batch, only the later runs (one statement can't update a row twice).
            await self._db.execute(_upsert(self._db.dialect == "postgresql"), values,
                                   key=(record.bot, record.chat))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not record recall: {type(exc).__name__}") from exc

    async def last(self, bot: str, chat: str) -> RecallRecord | None:
        try:
            async with self._db.sessions() as session:
                row = await session.get(RecallRow, (bot, chat))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read recall log: {type(exc).__name__}") from exc
        return None if row is None else _record(row)

    async def scrub(self, bot: str, fact_ids: Collection[str]) -> int:
        """Forgotten means forgotten: ``memory why`` must not show a deleted fact's text."""
        gone = set(fact_ids)
        if not gone:
            return 0
        changed = 0
        try:
            async with self._db.sessions.begin() as session:
                rows = (await session.scalars(
                    select(RecallRow).where(RecallRow.bot == bot))).all()
                for row in rows:
                    items: list[dict[str, Any]] = json.loads(row.facts or "[]")
                    kept = [item for item in items if item.get("id") not in gone]
                    if len(kept) != len(items):
                        row.facts = json.dumps(kept, ensure_ascii=False)
                        changed += 1
        except SQLAlchemyError as exc:
            raise StorageError(f"could not scrub recall log: {type(exc).__name__}") from exc
        return changed

    async def chats(self, bot: str, *, limit: int = 20) -> list[RecallRecord]:
        query = (
            select(RecallRow).where(RecallRow.bot == bot)
            .order_by(RecallRow.created_at.desc()).limit(limit)
        )
        try:
            async with self._db.sessions() as session:
                rows = (await session.scalars(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read recall log: {type(exc).__name__}") from exc
        return [_record(row) for row in rows]
