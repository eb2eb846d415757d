"""What a prompt can carry of a stored file: text of documents, bytes of images.

``await attachment(stored, path, text_budget=...)`` turns a file the
``FileStore`` keeps at ``path`` into an ``Attachment``: extracted text for
text files and PDFs, bytes for images, neither for anything else. Reading
is not storage: the store keeps bytes and metadata, this module reads them
for every platform's handler.

The readers are synchronous and run in a worker thread (PDF parsing and file
reads are CPU and disk work). Text is cut at ``budget`` characters with a
visible marker; a document that cannot be read says so instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from engine.types import Attachment, StoredFile

log = logging.getLogger(__name__)

TEXT_TYPES = {"application/json", "application/x-ndjson", "application/csv",
              "application/xml", "application/x-yaml", "application/yaml"}
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".csv", ".tsv", ".json", ".jsonl", ".log",
                 ".yaml", ".yml", ".xml", ".ini", ".toml"}
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
TRUNCATED = "\n[... truncated: the file is longer than I can read at once]"


def kind_of(name: str, mime_type: str) -> str:
    """"text", "pdf", "image" or "other"."""
    suffix = Path(name).suffix.lower()
    if mime_type == "application/pdf" or suffix == ".pdf":
        return "pdf"
    if mime_type in IMAGE_TYPES:
        return "image"
    if mime_type.startswith("text/") or mime_type in TEXT_TYPES or suffix in TEXT_SUFFIXES:
        return "text"
    return "other"


def _cut(text: str, budget: int) -> str:
    return text if len(text) <= budget else text[:budget] + TRUNCATED


def read_text(path: Path, budget: int) -> str:
    # Read at most ~4 bytes per character of budget: a huge file is never loaded whole.
    with path.open("rb") as handle:
        raw = handle.read(budget * 4 + 4)
    return _cut(raw.decode("utf-8", errors="replace"), budget)


def read_pdf(path: Path, budget: int) -> str:
    # Imported here, in the worker thread, when a PDF arrives: pypdf (with PIL
    # and cryptography) costs every command's start-up otherwise.
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            return "(this PDF is encrypted; I cannot read it)"
        parts: list[str] = []
        used = 0
        for page in reader.pages:
            text = page.extract_text() or ""
            parts.append(text)
            used += len(text)
            if used > budget:
                break
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        log.info("unreadable PDF %s: %s", path.name, exc)
        return "(I could not read this PDF)"
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    return _cut(text, budget) if text else "(this PDF has no extractable text)"


async def attachment(stored: StoredFile, path: Path, *, text_budget: int = 20_000) -> Attachment:
    """What a prompt can carry of ``stored``, whose bytes are at ``path``."""
    kind = kind_of(stored.name, stored.mime_type)
    text: str | None = None
    data: bytes | None = None
    if kind == "text":
        text = await asyncio.to_thread(read_text, path, text_budget)
    elif kind == "pdf":
        text = await asyncio.to_thread(read_pdf, path, text_budget)
    elif kind == "image":
        data = await asyncio.to_thread(path.read_bytes)
    return Attachment(name=stored.name, mime_type=stored.mime_type, size=stored.size,
                      sha256=stored.sha256, text=text, data=data)
