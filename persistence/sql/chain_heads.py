"""Hash-chain heads, kept in SQL apart from the chained LanceDB table (``ChainHeadStore``).

One row per chain (``shared_memories``): the last sequence number and hash,
and a write announced before it lands (``pending_*``). Someone who can edit
the LanceDB files but not the database cannot hide deleting the newest rows
or dropping the table: a fresh ``verify`` compares the table with this row.
Table created by revision ``0009_chain_head``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from engine.errors import StorageError
from engine.types import ChainHead
from persistence.sql.database import Database
from persistence.sql.tables import Base, utcnow


class ChainHeadRow(Base):
    __tablename__ = "chain_heads"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    pending_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pending_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 onupdate=utcnow)


class SqlChainHeads:
    """``ChainHeadStore`` on the shared relational database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def get(self, name: str) -> ChainHead | None:
        try:
            async with self._db.sessions() as session:
                row = await session.get(ChainHeadRow, name)
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read chain head: {type(exc).__name__}") from exc
        if row is None:
            return None
        return ChainHead(row.seq, row.hash, row.pending_seq, row.pending_hash)

    async def put(self, name: str, head: ChainHead) -> None:
        try:
            async with self._db.sessions.begin() as session:
                await session.merge(ChainHeadRow(
                    name=name, seq=head.seq, hash=head.hash, pending_seq=head.pending_seq,
                    pending_hash=head.pending_hash, updated_at=utcnow()))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not write chain head: {type(exc).__name__}") from exc
