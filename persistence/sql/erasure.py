"""Erasing from the relational database: one person, old rows, a whole bot.

``SqlErasure`` implements the SQL side of ``engine.admin.people``:

- ``person(bots, user)`` / ``forget_person(bots, user)``: what we hold about
  ``user`` (the stored key, ``telegram:42``) and its deletion. A chat where
  nobody else ever spoke is that person's DM: the whole chat goes, the bot's
  answers included. In other chats only their own messages go. Their files
  (rows they uploaded; the bytes once no other row shares them), the recall
  log of their DMs and every record whose query was their message, recalled
  facts about them in any record, and their key on usage rows (the costs
  stay, as the bot's).
- ``purge(bot, before, dry_run)``: messages, files and recall records older
  than ``before`` (retention, ``history_days``).
- ``delete_bot(bot)``: every message, file and recall record of a bot.

Each deletion is one transaction; file bytes are removed after it commits
(a crash between leaves an orphan blob, never a row without its bytes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from engine.errors import StorageError
from persistence.sql.database import Database
from persistence.sql.files import FileRow, SqlFileStore
from persistence.sql.recall_log import RecallRow
from persistence.sql.tables import MessageRow
from persistence.sql.usage import UsageRow

QUERY_CHARS = 500  # the recall log keeps the first 500 characters of a query


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class SqlErasure:
    """See the module docstring. ``files`` frees the bytes of deleted file rows."""

    def __init__(self, database: Database, files: SqlFileStore | None = None) -> None:
        self._db = database
        self._files = files

    # --- one person ---

    async def _dm_chats(self, session: AsyncSession, bots: Sequence[str],
                        user: str) -> set[tuple[str, str]]:
        """(bot, chat) pairs where ``user`` spoke and nobody else did."""
        spoke = (await session.execute(
            select(MessageRow.bot, MessageRow.chat).where(
                MessageRow.bot.in_(bots), MessageRow.user == user,
                MessageRow.role == "user").distinct())).all()
        pairs = {(row[0], row[1]) for row in spoke}
        if not pairs:
            return set()
        others = (await session.execute(
            select(MessageRow.bot, MessageRow.chat).where(
                MessageRow.bot.in_(bots), MessageRow.chat.in_({c for _, c in pairs}),
                MessageRow.role == "user", MessageRow.user != user).distinct())).all()
        return pairs - {(row[0], row[1]) for row in others}

    @staticmethod
    def _theirs(bots: Sequence[str], user: str,
                dms: set[tuple[str, str]]) -> ColumnElement[bool]:
        """Their messages anywhere, and every message of their DMs."""
        clause: ColumnElement[bool] = MessageRow.user == user
        for bot, chat in dms:
            clause = clause | ((MessageRow.bot == bot) & (MessageRow.chat == chat))
        return MessageRow.bot.in_(bots) & clause

    async def person(self, bots: Sequence[str], user: str) -> dict[str, Any]:
        """Everything held about ``user``: messages, files, recall records, usage rows."""
        try:
            async with self._db.sessions() as session:
                dms = await self._dm_chats(session, bots, user)
                messages = (await session.scalars(
                    select(MessageRow).where(self._theirs(bots, user, dms))
                    .order_by(MessageRow.id))).all()
                files = (await session.scalars(select(FileRow).where(
                    FileRow.bot.in_(bots), FileRow.uploader == user))).all()
                recalls = await self._recall_rows(session, bots, user, dms, messages)
                usage = await session.scalar(select(func.count()).select_from(UsageRow).where(
                    UsageRow.bot.in_(bots), UsageRow.user == user))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read a person's data: {type(exc).__name__}") from exc
        return {
            "messages": [{"bot": m.bot, "chat": m.chat, "role": m.role, "text": m.content,
                          "at": _iso(m.created_at)} for m in messages],
            "dm_chats": sorted(f"{bot}/{chat}" for bot, chat in dms),
            "files": [{"id": f.id, "bot": f.bot, "chat": f.chat, "name": f.name,
                       "mime_type": f.mime_type, "size": f.size, "sha256": f.sha256,
                       "at": _iso(f.created_at)} for f in files],
            "recall_log": [{"bot": r.bot, "chat": r.chat, "query": r.query,
                            "facts": json.loads(r.facts or "[]"), "at": _iso(r.created_at)}
                           for r, _ in recalls],
            "usage_rows": int(usage or 0),
        }

    async def _recall_rows(
        self, session: AsyncSession, bots: Sequence[str], user: str,
        dms: set[tuple[str, str]], messages: Sequence[MessageRow],
    ) -> list[tuple[RecallRow, bool]]:
        """Records holding something of ``user``: (row, whole row is theirs)."""
        said = {m.content[:QUERY_CHARS] for m in messages if m.role == "user" and m.user == user}
        found = []
        for row in (await session.scalars(select(RecallRow).where(
                RecallRow.bot.in_(bots)))).all():
            whole = (row.bot, row.chat) in dms or row.query in said
            about = any(item.get("user") == user for item in json.loads(row.facts or "[]"))
            if whole or about:
                found.append((row, whole))
        return found

    async def forget_person(self, bots: Sequence[str], user: str,
                            fact_ids: Collection[str] = ()) -> dict[str, int]:
        """Delete what ``person`` shows; ``fact_ids``: forgotten facts to scrub from records."""
        gone_ids = set(fact_ids)
        counts = {"messages": 0, "files": 0, "recall_log": 0, "usage_rows": 0}
        try:
            async with self._db.sessions.begin() as session:
                dms = await self._dm_chats(session, bots, user)
                theirs = self._theirs(bots, user, dms)
                messages = (await session.scalars(select(MessageRow).where(theirs))).all()
                for row, whole in await self._recall_rows(session, bots, user, dms, messages):
                    counts["recall_log"] += 1
                    if whole:
                        await session.delete(row)
                        continue
                    items: list[dict[str, Any]] = json.loads(row.facts or "[]")
                    row.facts = json.dumps(
                        [i for i in items if i.get("user") != user and i.get("id") not in gone_ids],
                        ensure_ascii=False)
                counts["messages"] = len(messages)
                await session.execute(delete(MessageRow).where(theirs))
                files = (await session.scalars(select(FileRow).where(
                    FileRow.bot.in_(bots), FileRow.uploader == user))).all()
                counts["files"] = len(files)
                await session.execute(delete(FileRow).where(
                    FileRow.bot.in_(bots), FileRow.uploader == user))
                usage = await session.execute(update(UsageRow).where(
                    UsageRow.bot.in_(bots), UsageRow.user == user).values(user=""))
                counts["usage_rows"] = int(usage.rowcount or 0)  # type: ignore[attr-defined]
        except SQLAlchemyError as exc:
            raise StorageError(f"could not forget a person: {type(exc).__name__}") from exc
        await self._free([(f.bot, f.sha256) for f in files])
        return counts

    # --- retention and bot deletion ---

    async def purge(self, bot: str, before: datetime, *, dry_run: bool = False) -> dict[str, int]:
        """Messages, files and recall records of ``bot`` older than ``before``."""
        return await self._erase(bot, before, dry_run=dry_run)

    async def delete_bot(self, bot: str) -> dict[str, int]:
        """Every message, file and recall record of ``bot``."""
        return await self._erase(bot, None, dry_run=False)

    async def _erase(self, bot: str, before: datetime | None, *,
                     dry_run: bool) -> dict[str, int]:
        tables: list[tuple[str, Any]] = [
            ("messages", MessageRow), ("files", FileRow), ("recall_log", RecallRow)]
        counts: dict[str, int] = {}
        try:
            async with self._db.sessions.begin() as session:
                freed: list[tuple[str, str]] = []
                for name, table in tables:
                    where = [table.bot == bot]
                    if before is not None:
                        where.append(table.created_at < before)
                    counts[name] = int(await session.scalar(
                        select(func.count()).select_from(table).where(*where)) or 0)
                    if dry_run or not counts[name]:
                        continue
                    if table is FileRow:
                        freed = [(bot, sha) for sha in (await session.scalars(
                            select(FileRow.sha256).where(*where).distinct())).all()]
                    await session.execute(delete(table).where(*where))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not delete old rows: {type(exc).__name__}") from exc
        await self._free(freed)
        return counts

    async def _free(self, blobs: Sequence[tuple[str, str]]) -> None:
        """Remove the bytes of files no remaining row refers to."""
        if self._files is None or not blobs:
            return
        for bot, sha in set(blobs):
            try:
                async with self._db.sessions() as session:
                    kept = await session.scalar(select(FileRow.id).where(
                        FileRow.bot == bot, FileRow.sha256 == sha).limit(1))
            except SQLAlchemyError as exc:
                raise StorageError(f"could not read file records: {type(exc).__name__}") from exc
            if kept is None:
                path = self._files.blob_path(bot, sha)
                await asyncio.to_thread(path.unlink, missing_ok=True)
