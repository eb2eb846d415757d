"""The per-bot file cap holds under concurrent uploads, across two workers.

Two ``SqlFileStore`` on two ``Database`` engines over one database (two
workers), SQLite and PostgreSQL (the ``database_url`` fixture). Every upload's
stream is held at its first chunk until every upload has either started
reading or been refused: before the fix all of them passed the cap check
first (nothing stored yet), then all were stored. No timing is measured: the
order is forced by an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.errors import FileRejected
from engine.types import StoredFile
from persistence.sql.database import Database
from persistence.sql.files import ReservationRow, SqlFileStore

KB = 1024
MB = 1024 * KB
UPLOADS = 8
SIZE = 900 * KB  # three fit in 3 MiB, a fourth does not


class HeldUploads:
    """Chunk streams that wait at their first chunk until ``release``."""

    def __init__(self) -> None:
        self.entered = 0
        self.finished = 0
        self.release = asyncio.Event()
        self.all_in = asyncio.Event()  # every upload is held at its first chunk, or done

    def note(self, *, entered: int = 0, finished: int = 0) -> None:
        self.entered += entered
        self.finished += finished
        if self.entered + self.finished >= UPLOADS:
            self.all_in.set()

    async def stream(self, data: bytes) -> AsyncIterator[bytes]:
        self.note(entered=1)
        await self.release.wait()
        for i in range(0, len(data), 64 * KB):
            yield data[i:i + 64 * KB]


@pytest.mark.parametrize("declared", [True, False], ids=["declared-size", "unknown-size"])
async def test_concurrent_uploads_from_two_workers_never_pass_the_cap(
    database_url: str, tmp_path: Path, declared: bool
) -> None:
    async with Database(database_url) as one, Database(database_url) as two:
        stores = [SqlFileStore(db, tmp_path / "data", max_file_bytes=1 * MB,
                               max_bot_bytes=3 * MB) for db in (one, two)]
        held = HeldUploads()

        async def upload(i: int) -> StoredFile | FileRejected:
            data = bytes([i]) * SIZE  # distinct content: no dedup
            try:
                return await stores[i % 2].save(
                    bot="demo", platform="telegram", chat="c", uploader=f"telegram:{i}",
                    name=f"f{i}.bin", mime_type="", chunks=held.stream(data),
                    declared_size=SIZE if declared else None)
            except FileRejected as exc:
                return exc
            finally:
                held.note(finished=1)

        tasks = [asyncio.create_task(upload(i)) for i in range(UPLOADS)]
        await asyncio.wait_for(held.all_in.wait(), 120)  # a hang is a failure
        held.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        stored = [r for r in results if isinstance(r, StoredFile)]
        refused = [r for r in results if isinstance(r, FileRejected)]
        total = await stores[0].bot_bytes("demo")
        async with one.sessions() as session:
            left = await session.scalar(select(func.count()).select_from(ReservationRow))
    assert total <= 3 * MB, f"{total / MB:.1f} MB stored against a 3 MB cap"
    assert len(stored) == 3 and total == 3 * SIZE
    assert len(refused) == UPLOADS - 3 and all("storage is full" in str(r) for r in refused)
    if declared:
        assert held.entered == 3  # refused ones were refused before downloading a byte
    assert left == 0  # every reservation was released or replaced by its file


async def test_known_content_is_free_even_when_full(database_url: str, tmp_path: Path) -> None:
    async with Database(database_url) as db:
        store = SqlFileStore(db, tmp_path / "data", max_file_bytes=1 * MB, max_bot_bytes=2 * MB)

        async def once(data: bytes) -> AsyncIterator[bytes]:
            yield data

        for i in range(2):
            await store.save(bot="demo", platform="telegram", chat="c", uploader="u",
                             name=f"f{i}.bin", mime_type="", chunks=once(bytes([i]) * MB))
        again = await store.save(bot="demo", platform="telegram", chat="c2", uploader="u",
                                 name="copy.bin", mime_type="", chunks=once(bytes([0]) * MB))
        with pytest.raises(FileRejected, match="storage is full"):
            await store.save(bot="demo", platform="telegram", chat="c", uploader="u",
                             name="new.bin", mime_type="", chunks=once(b"new"))
        assert again.chat == "c2" and await store.bot_bytes("demo") == 2 * MB


async def test_a_failed_upload_frees_its_reservation_and_a_dead_workers_expires(
    database_url: str, tmp_path: Path
) -> None:
    async with Database(database_url) as db:
        store = SqlFileStore(db, tmp_path / "data", max_file_bytes=1 * MB, max_bot_bytes=2 * MB)

        async def broken() -> AsyncIterator[bytes]:
            yield b"x" * KB
            raise ConnectionResetError("the download dropped")

        with pytest.raises(ConnectionResetError):
            await store.save(bot="demo", platform="telegram", chat="c", uploader="u",
                             name="a.bin", mime_type="", chunks=broken(), declared_size=MB)
        # A worker killed mid-upload left 2 MB reserved two hours ago.
        async with db.sessions.begin() as session:
            session.add(ReservationRow(bot="demo", size=2 * MB,
                                       created_at=datetime.now(UTC) - timedelta(hours=2)))

        async def once() -> AsyncIterator[bytes]:
            yield b"y" * MB

        stored = await store.save(bot="demo", platform="telegram", chat="c", uploader="u",
                                  name="b.bin", mime_type="", chunks=once(), declared_size=MB)
        async with db.sessions() as session:
            left = await session.scalar(select(func.count()).select_from(ReservationRow))
    assert stored.size == MB and left == 0  # the stale one expired, the others were freed
