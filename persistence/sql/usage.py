"""Usage rows in the relational database (the ``engine.usage.UsageStore`` port).

One row per served reply or background extraction call (revision
``0003_usage``; ``kind`` since ``0006_usage_kind``). ``day`` is the UTC day as
``YYYY-MM-DD`` text: grouping by it is the same SQL on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from engine.errors import StorageError
from engine.usage import UsageKind, UsageLine, UsageRecord
from persistence.sql.database import Database
from persistence.sql.tables import Base


class UsageRow(Base):
    """What one served reply used and cost."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    day: Mapped[str] = mapped_column(String(10))
    bot: Mapped[str] = mapped_column(String(100))
    user: Mapped[str] = mapped_column(String(200), default="", server_default="")
    chat: Mapped[str] = mapped_column(String(200), default="", server_default="")
    platform: Mapped[str] = mapped_column(String(16), default="", server_default="")
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200), default="", server_default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    estimated: Mapped[bool] = mapped_column(Boolean)
    cost_usd: Mapped[float] = mapped_column(Float)
    # "reply" or "extraction"
    kind: Mapped[str] = mapped_column(String(16), default="reply", server_default="reply")

    __table_args__ = (
        Index("ix_usage_day_bot", "day", "bot"),
        Index("ix_usage_bot_day_user", "bot", "day", "user"),
    )


# Built once: the group writer batches the writes of one statement object.
_INSERT = insert(cast(Table, UsageRow.__table__))


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


class SqlUsageStore:
    """Each ``add`` is its own committed transaction."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, record: UsageRecord) -> None:
        values = dict(
            created_at=record.at, day=_day(record.at), bot=record.bot, user=record.user,
            chat=record.chat, platform=record.platform, provider=record.provider,
            model=record.model, prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, estimated=record.estimated,
            cost_usd=record.cost_usd, kind=record.kind,
        )

        try:
            await self._db.execute(_INSERT, values)
        except SQLAlchemyError as exc:
            raise StorageError(f"could not store usage: {type(exc).__name__}") from exc

    async def spent(self, *, bot: str, since: datetime) -> dict[str, float]:
        query = (
            select(UsageRow.user, func.sum(UsageRow.cost_usd))
            .where(UsageRow.bot == bot, UsageRow.created_at >= since)
            .group_by(UsageRow.user)
        )
        try:
            async with self._db.sessions() as session:
                rows = (await session.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read usage: {type(exc).__name__}") from exc
        return {user: float(total or 0.0) for user, total in rows}

    async def summary(self, *, since: datetime, bot: str | None = None) -> list[UsageLine]:
        estimated = func.sum(func.cast(UsageRow.estimated, Integer))
        query = (
            select(
                UsageRow.day, UsageRow.bot, UsageRow.provider, func.count(UsageRow.id),
                func.sum(UsageRow.prompt_tokens), func.sum(UsageRow.completion_tokens),
                estimated, func.sum(UsageRow.cost_usd), UsageRow.kind,
            )
            .where(UsageRow.day >= _day(since))
            .group_by(UsageRow.day, UsageRow.bot, UsageRow.provider, UsageRow.kind)
            .order_by(UsageRow.day, UsageRow.bot, UsageRow.provider, UsageRow.kind)
        )
        if bot is not None:
            query = query.where(UsageRow.bot == bot)
        try:
            async with self._db.sessions() as session:
                rows = (await session.execute(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read usage: {type(exc).__name__}") from exc
        return [
            UsageLine(
                day=date.fromisoformat(day), bot=bot_name, provider=provider,
                replies=int(replies), prompt_tokens=int(prompt or 0),
                completion_tokens=int(completion or 0), estimated_replies=int(est or 0),
                cost_usd=float(cost or 0.0), kind=_kind(kind),
            )
            for day, bot_name, provider, replies, prompt, completion, est, cost, kind in rows
        ]


def _kind(value: str) -> UsageKind:
    return "extraction" if value == "extraction" else "reply"
