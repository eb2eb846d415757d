"""The declarative base every table shares, and the conversation tables.

Each owning module declares its own table classes on ``Base`` (files, usage,
...); Alembic revisions under ``persistence/migrations/versions/`` create them.
ORM rows never leave ``persistence/``: stores return ``engine.types`` values.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Shared metadata: one schema, one linear migration history."""


class MessageRow(Base):
    """One message of a conversation (revision ``0001_messages``)."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bot: Mapped[str] = mapped_column(String(100))
    chat: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    user: Mapped[str] = mapped_column(String(200), default="", server_default="")
    platform: Mapped[str] = mapped_column(String(16), default="", server_default="")
    served_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # 0005: who spoke (last, where the migration added it)
    user_name: Mapped[str] = mapped_column(String(200), default="", server_default="")

    # 0007: the platform is part of a conversation's key (a Telegram chat and a
    # Discord channel may share an id)
    __table_args__ = (Index("ix_messages_bot_platform_chat_id", "bot", "platform", "chat", "id"),)
