"""Memories shared between bots, behind a trust-filtered repository.

``SharedMemory`` implements ``engine.ports.SharedMemoryStore`` and is the only
holder of the shared LanceDB table: no other code gets the raw table.

Visibility lives in ONE place, ``TrustRule`` (``persistence/vectors/trust.py``):
a reader bot sees ``public`` rows, ``trusted`` rows whose group is one of
its groups, and its own ``private`` rows; and only rows about the allowed
users (the speaker and "" for general; none when the speaker is unknown).
The rule renders the SQL predicate every query carries, and checks each
returned row again in Python, so an escaping mistake can never widen what a
reader sees.

Integrity: each row stores ``prev_hash`` (the previous row's hash) and
``write_hash`` = SHA-256 over its content (text, user, category, importance,
trust level and group, author id and name, created_at, metadata), its
sequence number and ``prev_hash``. Every read recomputes the hash and drops
(logs, counts) rows that fail: an edit made outside the API never reaches a
prompt, including one that would widen a row's trust level. ``verify()``
walks the chain by sequence number: a deleted row leaves a gap.

Writes go through one writer task (an asyncio queue), so concurrent bots
never lose a write and the chain stays linear. One process owns the writer;
``orphaned`` is the only mutable column and is outside the hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC
from types import TracebackType
from typing import Any, TypeVar

import pyarrow as pa
from lancedb.query import ColumnOrdering

from engine.errors import EmbeddingMismatch, StorageError
from engine.ports import Embedder, Progress
from engine.types import Fact, IntegrityReport, TrustLevel
from persistence.vectors.tables import (
    ANN_THRESHOLD,
    FACT_FIELDS,
    Maintainer,
    ScalarIndex,
    check_model,
    connect,
    hybrid_search,
    now,
    quote,
    rewrite_beside,
    storage_errors,
    table_names,
    with_model,
)
from persistence.vectors.trust import TrustRule, row_hash, split_rows, walk_chain

log = logging.getLogger(__name__)

WriterLock = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

TABLE = "shared_memories"
LEVELS: tuple[TrustLevel, ...] = ("public", "trusted", "private")
FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
    *FACT_FIELDS,
    pa.field("trust_level", pa.string(), nullable=False),
    pa.field("trust_group", pa.string(), nullable=False),
    pa.field("author_bot", pa.string(), nullable=False),
    pa.field("author_name", pa.string(), nullable=False),
    pa.field("metadata", pa.string(), nullable=False),
    pa.field("orphaned", pa.bool_(), nullable=False),
    pa.field("prev_hash", pa.string(), nullable=False),
    pa.field("write_hash", pa.string(), nullable=False),
]
COLUMNS = [f.name for f in FIELDS]
SCALAR_INDEXES: dict[str, ScalarIndex] = {
    "id": "btree", "user": "btree", "trust_level": "bitmap", "trust_group": "btree",
    "author_bot": "btree"}
T = TypeVar("T")


def _fact(row: dict[str, Any], score: float = 0.0) -> Fact:
    return Fact(
        id=row["id"], text=row["text"], bot=row["author_bot"], user=row["user"],
        category=row["category"], importance=row["importance"], created_at=row["created_at"],
        score=score, metadata=row["metadata"], trust_level=row["trust_level"],
        trust_group=row["trust_group"], author_bot=row["author_bot"],
        author_name=row["author_name"], orphaned=row["orphaned"],
    )


class SharedMemory:
    """The shared memory repository. ``async with await SharedMemory.open(uri, embedder)``."""

    def __init__(self, db: Any, table: Any, embedder: Embedder, *, ann_threshold: int,
                 maintain_delay_s: float, writer_lock: WriterLock | None = None) -> None:
        self._db = db
        # Several processes writing one table (scale-out): each append takes
        # this cross-process lock and re-reads the chain head under it.
        self._writer_lock = writer_lock
        self._raw = table
        self._embedder = embedder
        self._maintainer = Maintainer(TABLE, lambda: self._raw, scalar=SCALAR_INDEXES,
                                      ann_threshold=ann_threshold,
                                      delay_s=maintain_delay_s)
        self._queue: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = (
            asyncio.Queue())
        self._writer: asyncio.Task[None] | None = None
        self._head: tuple[int, str] = (0, "")  # last (seq, write_hash) written
        self.tampered_reads = 0
        # Set when the table was written with another embedding model: reads
        # and publishes raise it until ``reembed`` (the app still starts).
        self._mismatch: EmbeddingMismatch | None = None

    @classmethod
    @storage_errors
    async def open(
        cls, uri: str, embedder: Embedder, *, storage_options: dict[str, str] | None = None,
        ann_threshold: int = ANN_THRESHOLD, maintain_delay_s: float = 2.0,
        writer_lock: WriterLock | None = None,
    ) -> SharedMemory:
        db = await connect(uri, storage_options)
        schema = with_model(FIELDS, embedder.model_name, embedder.dimension, "")
        if TABLE in await table_names(db):
            table = await db.open_table(TABLE)
        else:
            table = await db.create_table(TABLE, schema=schema, exist_ok=True)
        store = cls(db, table, embedder, ann_threshold=ann_threshold,
                    maintain_delay_s=maintain_delay_s, writer_lock=writer_lock)
        try:
            check_model(TABLE, await table.schema(), embedder.model_name, embedder.dimension)
        except EmbeddingMismatch as exc:
            store._mismatch = exc
        return store

    def _check_model(self) -> None:
        if self._mismatch is not None:
            raise self._mismatch

    async def _read_head(self) -> None:
        # Top-1 by seq inside LanceDB: no full column goes through Python per append.
        last = await (self._raw.query().select(["seq", "write_hash"])
                      .order_by([ColumnOrdering(column_name="seq", ascending=False)])
                      .limit(1).to_list())
        if last:
            self._head = (last[0]["seq"], last[0]["write_hash"])

    async def __aenter__(self) -> SharedMemory:
        await self._read_head()
        await self._maintainer.refresh()
        self._writer = asyncio.create_task(self._write_loop(), name="shared memory writer")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._queue.join()  # every accepted write lands before we stop
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._maintainer.close()

    # -- the one writer -------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            job, done = await self._queue.get()
            try:
                result = await job()
            except Exception as exc:
                if not done.cancelled():
                    done.set_exception(exc)
            else:
                if not done.cancelled():
                    done.set_result(result)
            finally:
                self._queue.task_done()

    async def _serialized(self, job: Callable[[], Awaitable[T]]) -> T:
        if self._writer is None or self._writer.done():
            raise StorageError("shared memory is not open (use it as an async context manager)")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((job, done))
        return await done

    # -- writes ---------------------------------------------------------

    @storage_errors
    async def publish(self, fact: Fact, level: TrustLevel, group: str = "", *,
                      author_name: str = "") -> Fact:
        if level not in LEVELS:
            raise StorageError(f"unknown trust level {level!r} (public, trusted or private)")
        if level == "trusted" and not group:
            raise StorageError("a trusted fact needs a trust group")
        if not fact.bot:
            raise StorageError("a shared fact needs its author bot")
        if not fact.text.strip():
            raise StorageError("a memory needs text")
        self._check_model()
        # Embed before queueing: the writer only orders and hashes, so one
        # slow embedding never holds up other bots' writes.
        vector = (await self._embedder.embed([fact.text]))[0]
        created = fact.created_at or now()
        if created.tzinfo is None:  # naive times are UTC (as the tables store them)
            created = created.replace(tzinfo=UTC)
        shared = replace(fact, id=fact.id or uuid.uuid4().hex, created_at=created,
                         trust_level=level, trust_group=group if level == "trusted" else "",
                         author_bot=fact.bot, author_name=author_name or fact.author_name,
                         superseded_by=None, score=0.0, orphaned=False)

        async def append() -> Fact:
            if self._writer_lock is None:
                return await write()
            async with self._writer_lock():
                await self._read_head()  # another process may have appended
                return await write()

        async def write() -> Fact:
            # Under the writer (and lock): publishing one fact twice is refused.
            if await self._raw.count_rows(f"id = {quote(shared.id)}"):
                raise StorageError(f"memory {shared.id} is already shared")
            seq, prev = self._head
            row: dict[str, Any] = {
                "id": shared.id, "seq": seq + 1, "text": shared.text, "user": shared.user,
                "category": shared.category, "importance": float(shared.importance),
                "created_at": shared.created_at, "trust_level": level,
                "trust_group": shared.trust_group, "author_bot": shared.author_bot,
                "author_name": shared.author_name, "metadata": shared.metadata,
                "orphaned": False, "prev_hash": prev,
            }
            row["write_hash"] = row_hash(row)
            await self._raw.add(pa.Table.from_pylist([{**row, "vector": vector}],
                                                     schema=await self._raw.schema()))
            self._head = (row["seq"], row["write_hash"])
            self._maintainer.poke()
            return shared

        return await self._serialized(append)

    @storage_errors
    async def orphan_bot(self, bot: str) -> int:
        async def mark() -> int:
            where = f"author_bot = {quote(bot)} AND NOT orphaned"
            count: int = await self._raw.count_rows(where)
            if count:
                await self._raw.update(updates={"orphaned": True}, where=where)
            return count

        return await self._serialized(mark)

    @storage_errors
    async def reembed(self, *, progress: Progress | None = None) -> int:
        async def rewrite() -> int:
            data = await self._raw.query().select(COLUMNS).to_arrow()
            schema = with_model(FIELDS, self._embedder.model_name, self._embedder.dimension, "")
            rows = await rewrite_beside(self._db, TABLE, data, self._embedder, schema, progress)
            self._raw = await self._db.open_table(TABLE)
            self._mismatch = None
            await self._maintainer.run_now()
            return rows

        return await self._serialized(rewrite)

    async def maintain(self) -> None:
        """Run index maintenance now (tests, benchmarks, after an import)."""
        await self._maintainer.run_now()

    # -- reads (every one through TrustRule and the hash check) ---------

    def _verified(self, rows: list[dict[str, Any]], rule: TrustRule) -> list[dict[str, Any]]:
        return self._count_tampered(split_rows(rows, rule))

    async def _verified_many(self, data: pa.Table, rule: TrustRule) -> list[dict[str, Any]]:
        # Converting and hashing thousands of rows is CPU work: off the event loop.
        return self._count_tampered(
            await asyncio.to_thread(lambda: split_rows(data.to_pylist(), rule)))

    def _count_tampered(self, split: tuple[list[dict[str, Any]], list[str]]
                        ) -> list[dict[str, Any]]:
        good, bad = split
        for fact_id in bad:
            self.tampered_reads += 1
            log.warning("shared memory row %r fails its write hash: excluded", fact_id)
        return good

    @storage_errors
    async def search(
        self, reader_bot: str, groups: Sequence[str], query: str, *,
        users: Sequence[str], limit: int = 5, min_score: float | None = None,
        vector: Sequence[float] | None = None,
    ) -> list[Fact]:
        rule = TrustRule.of(reader_bot, groups, users)
        if not users or limit <= 0:
            return []  # fail closed
        self._check_model()
        if vector is None:
            vector = (await self._embedder.embed([query]))[0]
        # A few extra rows so that excluded (tampered) ones do not shorten the answer.
        result = await hybrid_search(self._raw, vector, query, rule.sql(), limit + 5,
                                     fts=self._maintainer.fts, min_score=min_score)
        facts = [_fact(r, r["score"]) for r in self._verified(result, rule)
                 if min_score is None or r["score"] >= min_score]
        return facts[:limit]

    @storage_errors
    async def list_facts(self, reader_bot: str, groups: Sequence[str], *,
                         users: Sequence[str] | None, limit: int = 100,
                         offset: int = 0) -> list[Fact]:
        rule = TrustRule.of(reader_bot, groups, users)
        data = await self._raw.query().where(rule.sql()).select(COLUMNS).to_arrow()
        rows = await self._verified_many(data, rule)
        rows.sort(key=lambda r: r["seq"], reverse=True)
        return [_fact(r) for r in rows[offset:offset + limit]]

    @storage_errors
    async def get(self, reader_bot: str, groups: Sequence[str], fact_id: str) -> Fact | None:
        rule = TrustRule.of(reader_bot, groups, None)
        where = f"id = {quote(fact_id)} AND {rule.sql()}"
        rows = self._verified(await self._raw.query().where(where).select(COLUMNS).to_list(),
                              rule)
        return _fact(rows[0]) if rows else None

    @storage_errors
    async def count(self) -> int:
        n: int = await self._raw.count_rows()
        return n

    @storage_errors
    async def verify(self) -> IntegrityReport:
        data = await self._raw.query().select(COLUMNS).to_arrow()
        report = await asyncio.to_thread(lambda: walk_chain(data.to_pylist(), self._head[0]))
        if not report.ok:
            log.warning("shared memory integrity: %d tampered, %d gap(s)",
                        len(report.tampered), len(report.missing))
        return report
