"""Per-bot attachment storage (the ``FileStore`` port).

Bytes live under ``data_dir/bots/<bot>/files/<aa>/<sha256>``: content
addressed, so the same file sent twice (or in two chats) is stored once per
bot. Metadata (bot, platform, chat, uploader, original name, MIME type, size,
hash, time) is one ``files`` row per upload (migration ``0002_files``).

``save`` streams the chunks into a temporary file in the same directory,
hashing as it writes (in a worker thread: hashing never blocks the loop),
then renames it into place atomically; a reader never sees half a file.
It raises ``FileRejected`` with a message fit for the user, leaving nothing
behind, when the file is empty, larger than ``max_file_bytes`` (checked
against the declared size before downloading, and again while streaming),
or would push the bot's stored bytes past ``max_bot_bytes``. Original names
are sanitized for display (no directories, no control or bidi characters,
at most 200 characters); they never become a path.

The per-bot cap holds under concurrent uploads, across workers too: an
upload RESERVES its size (a ``file_reservations`` row, migration
``0010_file_reservations``) before it writes a byte, growing the reservation
if the stream outgrows it, and the record that replaces the reservation by a
``files`` row is decided the same way. Each of these decisions runs in one
transaction holding a per-bot lock (PostgreSQL: an advisory transaction lock;
SQLite: the database's write lock, taken by the transaction's first
statement), so two uploads never both see the room only one of them fits.
Content the bot already stores costs nothing (dedup), even when full. A
reservation left by a killed worker stops counting after
``RESERVATION_TTL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from engine.errors import FileRejected, StorageError
from engine.types import StoredFile
from persistence.sql.database import Database
from persistence.sql.tables import Base, utcnow

log = logging.getLogger(__name__)

MAX_NAME = 200
RESERVATION_STEP = 1024 * 1024  # an upload of unknown size reserves (and grows) by this
RESERVATION_TTL = timedelta(hours=1)  # far longer than any download of one file
_LOCK_KEY = 0x66696C65  # "file": the advisory lock space of the per-bot cap (PostgreSQL)
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")


class FileRow(Base):
    """One stored upload (revision ``0002_files``)."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bot: Mapped[str] = mapped_column(String(100))
    platform: Mapped[str] = mapped_column(String(16))
    chat: Mapped[str] = mapped_column(String(200))
    uploader: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(255))
    mime_type: Mapped[str] = mapped_column(String(127))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_files_bot_id", "bot", "id"),
        Index("ix_files_bot_sha256", "bot", "sha256"),
    )


class ReservationRow(Base):
    """Bytes an upload in progress holds against its bot's cap (``0010_file_reservations``)."""

    __tablename__ = "file_reservations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bot: Mapped[str] = mapped_column(String(100), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def sanitize_name(name: str) -> str:
    """A display-safe file name: last path segment, no control/format chars, capped."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Cc: control characters; Cf: format characters (RTL override, zero width...).
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    name = " ".join(name.split()).strip(" .")
    if len(name) > MAX_NAME:
        stem, dot, suffix = name.rpartition(".")
        keep = suffix[:16] if dot and stem else ""
        name = name[: MAX_NAME - len(keep) - 1].rstrip() + ("." + keep if keep else "")
    return name or "file"


def _segment(value: str) -> str:
    """A safe directory name for a bot (names come from config, but be strict)."""
    cleaned = _UNSAFE_SEGMENT.sub("_", value).strip("._") or "bot"
    return cleaned[:100]


def _stored(row: FileRow) -> StoredFile:
    created = row.created_at
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=UTC)  # SQLite drops the zone; we store UTC
    return StoredFile(
        id=row.id, bot=row.bot, platform=row.platform, chat=row.chat, uploader=row.uploader,
        name=row.name, mime_type=row.mime_type, size=row.size, sha256=row.sha256,
        created_at=created,
    )


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


class SqlFileStore:
    """``FileStore`` on a directory tree plus the ``files`` table (see module docstring)."""

    def __init__(
        self, database: Database, data_dir: Path, *, max_file_bytes: int, max_bot_bytes: int
    ) -> None:
        self._db = database
        self._root = Path(data_dir) / "bots"
        self.max_file_bytes = max_file_bytes
        self.max_bot_bytes = max_bot_bytes

    def _dir(self, bot: str) -> Path:
        return self._root / _segment(bot) / "files"

    def path(self, stored: StoredFile) -> Path:
        """Where the bytes of ``stored`` are (shared by every record of the same content)."""
        return self.blob_path(stored.bot, stored.sha256)

    def blob_path(self, bot: str, sha256: str) -> Path:
        """Where a bot's bytes of content ``sha256`` are (erasure frees them by hash)."""
        return self._dir(bot) / sha256[:2] / sha256

    async def bot_bytes(self, bot: str) -> int:
        """Bytes a bot's distinct stored files take (dedup counted once)."""
        distinct = (
            select(FileRow.sha256, func.max(FileRow.size).label("size"))
            .where(FileRow.bot == bot).group_by(FileRow.sha256).subquery()
        )
        try:
            async with self._db.sessions() as session:
                total = await session.scalar(select(func.coalesce(func.sum(distinct.c.size), 0)))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read file sizes: {type(exc).__name__}") from exc
        return int(total or 0)

    async def _known(self, bot: str, sha256: str) -> bool:
        try:
            async with self._db.sessions() as session:
                found = await session.scalar(select(FileRow.id).where(
                    FileRow.bot == bot, FileRow.sha256 == sha256).limit(1))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read file records: {type(exc).__name__}") from exc
        return found is not None

    async def save(
        self,
        *,
        bot: str,
        platform: str,
        chat: str,
        uploader: str,
        name: str,
        mime_type: str,
        chunks: AsyncIterator[bytes],
        declared_size: int | None = None,
    ) -> StoredFile:
        clean = sanitize_name(name)
        mime = (mime_type or "").strip().lower()[:127] or (
            mimetypes.guess_type(clean)[0] or "application/octet-stream")
        if declared_size is not None and declared_size > self.max_file_bytes:
            raise FileRejected(
                f"'{clean}' is too large ({_mb(declared_size)}); the limit is "
                f"{_mb(self.max_file_bytes)} per file.")
        first = declared_size if declared_size else min(RESERVATION_STEP, self.max_file_bytes)
        reservation = await self._reserve(bot, first)
        if reservation is None and declared_size is not None:
            raise self._full(clean, await self.bot_bytes(bot))
        # Without a declared size and no room, the bytes may still be content
        # the bot stores already (free): it is decided once they are hashed.
        try:
            directory = self._dir(bot)
            await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
            sha, size, temp = await self._write(directory, chunks, clean, bot, reservation,
                                                first)
            try:
                if size == 0:
                    raise FileRejected(f"'{clean}' is empty.")
                row = FileRow(bot=bot, platform=platform, chat=chat, uploader=uploader[:200],
                              name=clean, mime_type=mime, size=size, sha256=sha,
                              created_at=utcnow())
                return await self._record(row, reservation, temp, directory / sha[:2] / sha)
            finally:
                await asyncio.to_thread(temp.unlink, missing_ok=True)
        finally:
            if reservation is not None:
                await self._release(reservation)

    # -- the per-bot cap: reservations, each decision under the bot's lock --------

    async def _lock(self, session: AsyncSession, bot: str) -> None:
        """Start a transaction no other cap decision for ``bot`` runs beside."""
        if self._db.dialect == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(:bot))"),
                                  {"key": _LOCK_KEY, "bot": bot})
        # On SQLite this write is the transaction's first statement: it takes the
        # database's write lock (a rival waits out the busy timeout), so what
        # the reads below see cannot change before commit. It also forgets
        # reservations a killed worker left behind.
        await session.execute(delete(ReservationRow).where(
            ReservationRow.created_at < utcnow() - RESERVATION_TTL))

    async def _used(self, session: AsyncSession, bot: str, *, but: int | None = None) -> int:
        """Stored bytes (dedup counted once) plus every live reservation except ``but``."""
        distinct = (
            select(FileRow.sha256, func.max(FileRow.size).label("size"))
            .where(FileRow.bot == bot).group_by(FileRow.sha256).subquery()
        )
        stored = await session.scalar(select(func.coalesce(func.sum(distinct.c.size), 0)))
        held = select(func.coalesce(func.sum(ReservationRow.size), 0)).where(
            ReservationRow.bot == bot, ReservationRow.id != (but or 0))
        return int(stored or 0) + int(await session.scalar(held) or 0)

    async def _reserve(self, bot: str, size: int) -> int | None:
        """A reservation of ``size`` bytes, or None when the cap has no room for it."""
        try:
            async with self._db.sessions.begin() as session:
                await self._lock(session, bot)
                if await self._used(session, bot) + size > self.max_bot_bytes:
                    return None
                row = ReservationRow(bot=bot, size=size, created_at=utcnow())
                session.add(row)
                await session.flush()
                return row.id
        except SQLAlchemyError as exc:
            raise StorageError(f"could not reserve file space: {type(exc).__name__}") from exc

    async def _grow(self, bot: str, reservation: int, size: int) -> bool:
        """Raise a reservation to ``size`` bytes if the cap has room (else leave it)."""
        try:
            async with self._db.sessions.begin() as session:
                await self._lock(session, bot)
                if await self._used(session, bot, but=reservation) + size > self.max_bot_bytes:
                    return False
                await session.execute(update(ReservationRow).where(
                    ReservationRow.id == reservation).values(size=size))
                return True
        except SQLAlchemyError as exc:
            raise StorageError(f"could not reserve file space: {type(exc).__name__}") from exc

    async def _release(self, reservation: int) -> None:
        try:
            async with self._db.sessions.begin() as session:
                await session.execute(
                    delete(ReservationRow).where(ReservationRow.id == reservation))
        except SQLAlchemyError as exc:  # it expires after RESERVATION_TTL anyway
            log.warning("could not release a file reservation: %s", type(exc).__name__)

    def _full(self, clean: str, used: int) -> FileRejected:
        return FileRejected(f"'{clean}' does not fit: this bot's file storage is full "
                            f"({_mb(used)} of {_mb(self.max_bot_bytes)}).")

    async def _record(
        self, row: FileRow, reservation: int | None, temp: Path, final: Path
    ) -> StoredFile:
        """Put the bytes in place and the row in, replacing the reservation, under the lock."""
        known = False
        try:
            async with self._db.sessions.begin() as session:
                await self._lock(session, row.bot)
                known = await session.scalar(select(FileRow.id).where(
                    FileRow.bot == row.bot, FileRow.sha256 == row.sha256).limit(1)) is not None
                used = await self._used(session, row.bot, but=reservation)
                if not known and used + row.size > self.max_bot_bytes:
                    raise self._full(row.name, used)  # rolls back: nothing recorded
                await asyncio.to_thread(_place, temp, final)
                session.add(row)
                if reservation is not None:
                    await session.execute(
                        delete(ReservationRow).where(ReservationRow.id == reservation))
                await session.flush()
                return _stored(row)
        except SQLAlchemyError as exc:
            # No row, no bytes: unless another upload of the same content has
            # recorded it meanwhile, the stored blob would be an orphan.
            with contextlib.suppress(StorageError):
                if not known and not await self._known(row.bot, row.sha256):
                    await asyncio.to_thread(final.unlink, missing_ok=True)
            raise StorageError(f"could not record a file: {type(exc).__name__}") from exc

    async def _write(
        self, directory: Path, chunks: AsyncIterator[bytes], clean: str, bot: str,
        reservation: int | None, reserved: int,
    ) -> tuple[str, int, Path]:
        """Stream into a temp file, hashing off the loop; enforce the per-file cap and
        grow the reservation ahead of the bytes while it fits."""
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=directory, prefix=".upload-")
        temp = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise FileRejected(
                            f"'{clean}' is too large (over {_mb(self.max_file_bytes)}); "
                            f"the limit is {_mb(self.max_file_bytes)} per file.")
                    if reservation is not None and size > reserved:
                        wanted = min(self.max_file_bytes, max(size, reserved + RESERVATION_STEP))
                        if await self._grow(bot, reservation, wanted):
                            reserved = wanted
                        else:
                            reservation = None  # no room: only known content can still fit
                    await asyncio.to_thread(_write_chunk, handle, digest, chunk)
                await asyncio.to_thread(_sync, handle)
        except BaseException:
            await asyncio.to_thread(temp.unlink, missing_ok=True)
            raise
        return digest.hexdigest(), size, temp

    async def recent(
        self, bot: str, *, chat: str | None = None, limit: int = 50
    ) -> list[StoredFile]:
        query = select(FileRow).where(FileRow.bot == bot)
        if chat is not None:
            query = query.where(FileRow.chat == chat)
        query = query.order_by(FileRow.id.desc()).limit(max(limit, 0))
        try:
            async with self._db.sessions() as session:
                rows = (await session.scalars(query)).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"could not list files: {type(exc).__name__}") from exc
        return [_stored(row) for row in rows]

    async def get(self, bot: str, file_id: int) -> StoredFile | None:
        try:
            async with self._db.sessions() as session:
                row = await session.get(FileRow, file_id)
        except SQLAlchemyError as exc:
            raise StorageError(f"could not read a file record: {type(exc).__name__}") from exc
        return _stored(row) if row is not None and row.bot == bot else None

    async def delete(self, bot: str, file_id: int) -> bool:
        stored = await self.get(bot, file_id)
        if stored is None:
            return False
        try:
            async with self._db.sessions.begin() as session:
                await session.execute(
                    delete(FileRow).where(FileRow.id == file_id, FileRow.bot == bot))
        except SQLAlchemyError as exc:
            raise StorageError(f"could not delete a file: {type(exc).__name__}") from exc
        if not await self._known(bot, stored.sha256):  # last reference: free the bytes
            await asyncio.to_thread(self.path(stored).unlink, missing_ok=True)
        return True


def _write_chunk(handle: IO[bytes], digest: hashlib._Hash, chunk: bytes) -> None:
    handle.write(chunk)
    digest.update(chunk)


def _sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _place(temp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():  # same content already stored: keep the first copy
        os.replace(temp, final)
