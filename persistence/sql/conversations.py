"""Conversation history in the relational database (the ``ConversationStore`` port)."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from engine.errors import StorageError
from engine.types import Role, StoredMessage
from persistence.sql.database import Database, storable
from persistence.sql.tables import MessageRow, utcnow


def _stored(row: MessageRow) -> StoredMessage:
    role: Role = row.role  # type: ignore[assignment]  # only ever written from Role
    created = row.created_at
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)  # SQLite drops the zone; we store UTC
    return StoredMessage(
        id=row.id, bot=row.bot, chat=row.chat, role=role, content=row.content,
        user=row.user, created_at=created, served_by=row.served_by,
        user_name=row.user_name or "",
    )


class SqlConversationStore:
    """Each ``add`` is its own committed transaction: durable before it returns."""

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
        row = MessageRow(
            bot=bot, chat=chat, role=role, content=storable(content, "message"), user=user,
            user_name=storable(user_name, "user name")[:200], platform=platform,
            served_by=served_by,
            created_at=utcnow(),
        )
        try:
            async with self._db.sessions.begin() as session:
                session.add(row)
                await session.flush()
                return row.id
        except SQLAlchemyError as exc:
            raise StorageError(f"could not store a message: {type(exc).__name__}") from exc

    async def history(self, bot: str, chat: str, limit: int = 50) -> list[StoredMessage]:
        if limit <= 0:
            return []
        query = (
            select(MessageRow)
            .where(MessageRow.bot == bot, MessageRow.chat == chat)
            .order_by(MessageRow.id.desc())
            .limit(limit)
        )
        try:
            async with self._db.sessions() as session:
                rows = (await session.scalars(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read history: {type(exc).__name__}") from exc
        return [_stored(row) for row in reversed(rows)]

    async def count(self, bot: str, chat: str) -> int:
        """How many messages a chat holds (for tests and admin commands)."""
        return len(await self.history(bot, chat, limit=1_000_000))
