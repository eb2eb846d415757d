"""Conversation history in the relational database (the ``ConversationStore`` port)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from engine.admin.conversations import ChatSummary
from engine.errors import StorageError
from engine.types import Role, StoredMessage
from persistence.sql.database import Database, storable
from persistence.sql.tables import MessageRow, utcnow

_MESSAGES = cast(Table, MessageRow.__table__)
# Built once: each reply runs these, and building a statement (ORM insert,
# select with new literals) cost more of the loop than running it. One
# statement object per kind also lets the group writer batch the inserts.
_INSERT = insert(_MESSAGES).returning(_MESSAGES.c.id, sort_by_parameter_order=True)
_COLUMNS = [_MESSAGES.c[name] for name in ("id", "bot", "chat", "role", "content", "user",
                                          "created_at", "served_by", "user_name")]


def _history_query(by_platform: bool) -> Select[Any]:
    where = [_MESSAGES.c.bot == bindparam("bot"), _MESSAGES.c.chat == bindparam("chat")]
    if by_platform:
        where.append(_MESSAGES.c.platform == bindparam("platform"))
    return (select(*_COLUMNS).where(*where).order_by(_MESSAGES.c.id.desc())
            .limit(bindparam("limit")))


_HISTORY = {True: _history_query(True), False: _history_query(False)}


def _stored(row: tuple[Any, ...]) -> StoredMessage:
    """A row of ``_COLUMNS`` as the engine's ``StoredMessage``."""
    key, bot, chat, role, content, user, created, served_by, user_name = row
    if created is not None and created.tzinfo is None:
        # SQLite drops the zone; we store UTC. (Not replace(tzinfo=UTC): it
        # parses keywords, 4x the cost, and a reply reads 31 rows on the loop.)
        created = datetime.combine(created, created.time(), UTC)
    # Positional, in the fields' order (keywords cost twice as much).
    return StoredMessage(key, bot, chat, cast(Role, role), content, user, created, served_by,
                         user_name or "")


class SqlConversationStore:
    """Each ``add`` is committed before it returns (in a group commit: ``Database.execute``).

    History is read as Core rows, not ORM objects: a reply reads up to 31
    rows, and materializing them as ORM instances was the loop's top cost.
    """

    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(
        self,
        *,
        bot: str,
        chat: str,
        role: Role,
        content: str,
        user: str = "",
        platform: str = "",
        served_by: str | None = None,
        user_name: str = "",
    ) -> int:
        values = dict(
            bot=bot, chat=chat, role=role, content=storable(content, "message"), user=user,
            user_name=storable(user_name, "user name")[:200], platform=platform,
            served_by=served_by,
            created_at=utcnow(),
        )
        try:
            row = await self._db.execute(_INSERT, values)
            assert row is not None  # the INSERT returns its id
            key: int = row[0]
            return key
        except SQLAlchemyError as exc:
            raise StorageError(f"could not store a message: {type(exc).__name__}") from exc

    async def history(self, bot: str, chat: str, limit: int = 50, *,
                      platform: str | None = None) -> list[StoredMessage]:
        if limit <= 0:
            return []
        params: dict[str, Any] = {"bot": bot, "chat": chat, "limit": limit}
        if platform is not None:
            params["platform"] = platform
        try:
            rows = await self._db.read(_HISTORY[platform is not None], params)
        except (SQLAlchemyError, sqlite3.Error) as exc:
            raise StorageError(f"could not read history: {type(exc).__name__}") from exc
        return [_stored(row) for row in reversed(rows)]

    async def count(self, bot: str, chat: str, *, platform: str | None = None) -> int:
        """How many messages a chat holds (for tests and admin commands)."""
        return len(await self.history(bot, chat, limit=1_000_000, platform=platform))

    async def chats(self, bot: str, *, limit: int = 100) -> list[ChatSummary]:
        """The chats of a bot, most recently active first (the console's list)."""
        query = (
            select(MessageRow.chat, func.count(MessageRow.id), func.max(MessageRow.created_at))
            .where(MessageRow.bot == bot)
            .group_by(MessageRow.chat)
            .order_by(func.max(MessageRow.id).desc())
            .limit(limit)
        )
        try:
            async with self._db.sessions() as session:
                rows = (await session.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not list chats: {type(exc).__name__}") from exc
        return [ChatSummary(chat, int(count), last.replace(tzinfo=UTC)
                            if last is not None and last.tzinfo is None else last)
                for chat, count, last in rows]

    async def clear(self, bot: str, chat: str) -> int:
        """Delete a chat's history (a reset: the bot starts that chat afresh)."""
        try:
            async with self._db.sessions.begin() as session:
                result = await session.execute(
                    delete(MessageRow).where(MessageRow.bot == bot, MessageRow.chat == chat))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not reset a chat: {type(exc).__name__}") from exc
        return int(getattr(result, "rowcount", 0) or 0)
