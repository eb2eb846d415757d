"""Per-bot file storage on real SQLite and a real directory tree in tmp dirs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from adapters.chat import documents
from engine.errors import FileRejected
from engine.types import Attachment, StoredFile
from persistence.sql.database import Database
from persistence.sql.files import SqlFileStore, sanitize_name

MB = 1024 * 1024


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[SqlFileStore]:
    # database_url: every test runs on SQLite and on PostgreSQL (tests/conftest.py)
    async with Database(database_url) as db:
        yield SqlFileStore(db, tmp_path / "data", max_file_bytes=1 * MB, max_bot_bytes=3 * MB)


async def save(store: SqlFileStore, data: bytes, name: str = "notes.txt", *,
               bot: str = "demo", chat: str = "c1", mime: str = "text/plain",
               declared: int | None = None):  # type: ignore[no-untyped-def]
    return await store.save(bot=bot, platform="telegram", chat=chat, uploader="telegram:7",
                            name=name, mime_type=mime, chunks=chunks(data),
                            declared_size=declared)


async def read(store: SqlFileStore, stored: StoredFile, **kw: int) -> Attachment:
    """What a prompt gets of a stored file: the chat room's reader over the store's bytes."""
    return await documents.attachment(stored, store.path(stored), **kw)


async def test_save_is_content_addressed_with_metadata(store: SqlFileStore, tmp_path: Path) -> None:
    data = b"hello world\n" * 100
    first = await save(store, data)
    second = await save(store, data, "copy.txt", chat="c2")
    sha = hashlib.sha256(data).hexdigest()
    assert first.sha256 == second.sha256 == sha
    path = tmp_path / "data" / "bots" / "demo" / "files" / sha[:2] / sha
    assert path.read_bytes() == data
    # stored once; two metadata rows
    assert len(list((tmp_path / "data" / "bots" / "demo" / "files").rglob("*"))) == 2
    assert await store.bot_bytes("demo") == len(data)
    listed = await store.recent("demo")
    assert [(f.name, f.chat, f.platform, f.uploader, f.size, f.mime_type) for f in listed] == [
        ("copy.txt", "c2", "telegram", "telegram:7", len(data), "text/plain"),
        ("notes.txt", "c1", "telegram", "telegram:7", len(data), "text/plain"),
    ]
    assert listed[0].created_at is not None and listed[0].created_at.tzinfo is not None
    # no temp file left behind
    assert not list(path.parent.parent.glob(".upload-*"))


async def test_delete_frees_bytes_only_at_last_reference(store: SqlFileStore) -> None:
    a = await save(store, b"same bytes")
    b = await save(store, b"same bytes", "other.txt")
    path = store.path(a)
    assert await store.delete("demo", a.id) and path.exists()
    assert not await store.delete("other-bot", b.id)  # another bot cannot delete it
    assert await store.delete("demo", b.id) and not path.exists()
    assert not await store.delete("demo", b.id)


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
        ("evil\u202egpj.exe", "evilgpj.exe"),  # right-to-left override removed
        ("a\x00b\nc\td.txt", "abcd.txt"),
        ("...", "file"),
        ("", "file"),
        ("/", "file"),
        ("x" * 500 + ".pdf", "x" * 196 + ".pdf"),  # capped at 200, extension kept
    ],
)
def test_hostile_names_are_sanitized(hostile: str, expected: str) -> None:
    assert sanitize_name(hostile) == expected


async def test_hostile_name_never_becomes_a_path(store: SqlFileStore, tmp_path: Path) -> None:
    stored = await save(store, b"payload", "../../../../outside.txt")
    assert stored.name == "outside.txt"
    assert not (tmp_path / "outside.txt").exists()
    assert store.path(stored).is_relative_to(tmp_path / "data" / "bots" / "demo" / "files")


async def test_oversized_file_is_rejected_before_download(store: SqlFileStore) -> None:
    downloaded = False

    async def never() -> AsyncIterator[bytes]:
        nonlocal downloaded
        downloaded = True
        yield b"x"

    with pytest.raises(FileRejected, match="too large"):
        await store.save(bot="demo", platform="telegram", chat="c", uploader="u",
                         name="big.bin", mime_type="", chunks=never(), declared_size=5 * MB)
    assert not downloaded


async def test_oversized_stream_is_rejected_and_leaves_nothing(
    store: SqlFileStore, tmp_path: Path
) -> None:
    with pytest.raises(FileRejected, match=r"too large .*1\.0 MB per file"):
        await save(store, b"x" * (MB + 1), "big.bin")  # no declared size: caught mid-stream
    files_dir = tmp_path / "data" / "bots" / "demo" / "files"
    assert [p for p in files_dir.rglob("*") if p.is_file()] == []
    assert await store.recent("demo") == []


async def test_per_bot_cap(store: SqlFileStore) -> None:
    for i in range(3):
        await save(store, bytes([i]) * (MB - 10), f"f{i}.bin")
    with pytest.raises(FileRejected, match="storage is full"):
        await save(store, b"one more" * 100, "last.txt")
    # the same content again is free (dedup) and still accepted
    await save(store, bytes([0]) * (MB - 10), "again.bin")
    # another bot has its own budget
    await save(store, b"fine", bot="other")


async def test_empty_file_is_rejected(store: SqlFileStore) -> None:
    with pytest.raises(FileRejected, match="empty"):
        await save(store, b"", "empty.txt")


async def test_text_extraction_with_budget(store: SqlFileStore) -> None:
    stored = await save(store, ("é" * 5000).encode(), "accents.md", mime="")
    assert stored.mime_type == "text/markdown"
    att = await read(store, stored, text_budget=1000)
    assert att.text is not None and att.text.startswith("é" * 1000)
    assert "truncated" in att.text and att.data is None
    csv = await save(store, b"a,b\n1,2\n", "t.csv", mime="text/csv")
    assert (await read(store, csv)).text == "a,b\n1,2\n"


def _pdf(text: str) -> bytes:
    writer = PdfWriter()
    page = writer.add_blank_page(width=300, height=300)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    stream = DecodedStreamObject()
    stream.set_data(f"BT /F1 12 Tf 20 150 Td ({text}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(stream)
    import io
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def test_pdf_extraction_and_broken_pdf(store: SqlFileStore) -> None:
    good = await save(store, _pdf("Quarterly revenue grew"), "report.pdf", mime="application/pdf")
    att = await read(store, good)
    assert att.text is not None and "Quarterly revenue grew" in att.text
    bad = await save(store, b"%PDF-1.4 this is not really a pdf", "bad.pdf",
                     mime="application/pdf")
    assert "could not read" in ((await read(store, bad)).text or "") or \
        "no extractable text" in ((await read(store, bad)).text or "")


async def test_images_are_passed_as_bytes(store: SqlFileStore) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    stored = await save(store, png, "photo.png", mime="image/png")
    att = await read(store, stored)
    assert att.data == png and att.text is None

