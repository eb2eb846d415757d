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
vector, its sequence number and ``prev_hash``; the chain's head lives
outside the table (``ChainHeadStore``: SQL in the app). Every read
recomputes the hash and checks the row is linked to the head
(``persistence/vectors/chain.py``): a row edited outside the API, one whose
hash was recomputed, or one appended past the head never reaches a prompt.
``verify()`` walks from the head: deleted rows, the newest ones included,
and a dropped table show. ``forget_user`` deletes a person's rows and chains
a tombstone recording what went (seq, id, hash), when and by whom.

Writes go through one writer task (an asyncio queue), so concurrent bots
never lose a write; across processes the writer lock (Redis, or a file lock
on one machine) serializes them and each re-reads the head under it.
``orphaned`` is the only mutable column and is outside the hash.
Searches scan a snapshot (``recall/cache.py``; whole reloads: an edit keeps the id)
over the partitions ``TrustRule`` admits, then run the same hash and chain checks.
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

from engine.errors import EmbeddingMismatch, StorageError
from engine.ports import ChainHeadStore, Embedder, Progress
from engine.types import Fact, IntegrityReport, TrustLevel
from persistence.vectors.chain import Chain, LocalHeads
from persistence.vectors.recall.cache import CACHE_MB, RecallCache, new_generation
from persistence.vectors.recall.scan import scan_search
from persistence.vectors.tables import (
    ANN_THRESHOLD,
    FACT_FIELDS,
    Maintainer,
    ScalarIndex,
    check_model,
    connect,
    hybrid_search,
    in_list,
    now,
    quote,
    rewrite_beside,
    storage_errors,
    table_names,
    with_model,
)
from persistence.vectors.trust import (
    TOMBSTONE,
    TrustRule,
    rows_of,
    snapshot_shape,
    split_rows,
    tombstone_metadata,
)

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
                 maintain_delay_s: float, writer_lock: WriterLock | None = None,
                 heads: ChainHeadStore | None = None, cache_mb: float = CACHE_MB) -> None:
        self._db = db
        self.cache = RecallCache(embedder.dimension, budget_bytes=int(cache_mb * 2**20),
                                 columns=COLUMNS, prepare=snapshot_shape, delta=False)
        self._chain = Chain(TABLE, lambda: self._raw, heads or LocalHeads(), COLUMNS)
        # Several processes writing one table (scale-out): each append takes
        # this cross-process lock and re-reads the chain head under it.
        self._writer_lock = writer_lock
        self._raw = table
        self._embedder = embedder
        self._maintainer = Maintainer(TABLE, lambda: self._raw, scalar=SCALAR_INDEXES,
                                      ann_threshold=ann_threshold, delay_s=maintain_delay_s)
        self._queue: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]]
        self._queue = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.tampered_reads = 0
        # Another embedding model wrote the table: reads and publishes raise it until reembed.
        self._mismatch: EmbeddingMismatch | None = None

    @classmethod
    @storage_errors
    async def open(
        cls, uri: str, embedder: Embedder, *, storage_options: dict[str, str] | None = None,
        ann_threshold: int = ANN_THRESHOLD, maintain_delay_s: float = 2.0,
        writer_lock: WriterLock | None = None, heads: ChainHeadStore | None = None,
        cache_mb: float = CACHE_MB,
    ) -> SharedMemory:
        """``heads``: where the chain head lives (the app passes the SQL store; without
        one it lives in this process only). ``writer_lock``: serializes writers
        across processes (Redis, or a file lock). ``cache_mb``: the recall cache's budget."""
        db = await connect(uri, storage_options)
        if TABLE in await table_names(db):
            table = await db.open_table(TABLE)
        else:
            table = await db.create_table(TABLE, schema=_schema(embedder), exist_ok=True)
        store = cls(db, table, embedder, ann_threshold=ann_threshold, cache_mb=cache_mb,
                    maintain_delay_s=maintain_delay_s, writer_lock=writer_lock, heads=heads)
        try:
            check_model(TABLE, await table.schema(), embedder.model_name, embedder.dimension)
        except EmbeddingMismatch as exc:
            store._mismatch = exc
        return store

    def _check_model(self) -> None:
        if self._mismatch is not None:
            raise self._mismatch

    async def _locked(self, job: Callable[[], Awaitable[T]]) -> T:
        # Another process may write too: take the cross-process lock around the job.
        if self._writer_lock is None:
            return await job()
        async with self._writer_lock():
            return await job()

    async def __aenter__(self) -> SharedMemory:
        try:
            await self._locked(self._chain.settle)  # finish a crashed write, migrate
        except StorageError as exc:
            log.error("%s", exc)  # reads exclude everything; writes say so again
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
        await self.cache.close()

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

        async def write() -> Fact:
            # Under the writer (and lock): publishing one fact twice is refused.
            if await self._raw.count_rows(f"id = {quote(shared.id)}"):
                raise StorageError(f"memory {shared.id} is already shared")
            row: dict[str, Any] = {
                "id": shared.id, "text": shared.text, "user": shared.user,
                "category": shared.category, "importance": float(shared.importance),
                "created_at": shared.created_at, "trust_level": level,
                "trust_group": shared.trust_group, "author_bot": shared.author_bot,
                "author_name": shared.author_name, "metadata": shared.metadata,
                "orphaned": False,
            }
            schema = await self._raw.schema()
            await self.cache.write(  # mirrored into the snapshot (when it is the next version)
                TABLE, self._raw, lambda: self._chain.append(row, vector, schema),
                lambda snap, new: snap.add(snapshot_shape(pa.Table.from_pylist([new], schema))))
            self._maintainer.poke()
            return shared

        return await self._serialized(lambda: self._locked(write))

    @storage_errors
    async def forget_user(self, user: str, *, actor: str) -> int:
        """Delete every row about ``user`` (written by any bot); returns how many.

        A tombstone is chained first, recording each deleted row's seq, id,
        hash and previous hash, the time and ``actor`` (never the text or the
        user), so ``verify`` steps over the gap; then the rows go. A crash in
        between leaves the rows and a tombstone for them: run it again.
        """
        if not user:
            raise StorageError("forget_user needs a user (\"\" is everyone's general facts)")

        async def erase() -> int:
            where = f"user = {quote(user)} AND trust_level <> '{TOMBSTONE}'"
            victims = await (self._raw.query().where(where)
                             .select(["id", "seq", "write_hash", "prev_hash"]).to_list())
            if not victims:
                return 0
            deleted = [{"seq": v["seq"], "id": v["id"], "hash": v["write_hash"],
                        "prev": v["prev_hash"]} for v in victims]
            schema = await self._raw.schema()
            dim = schema.field("vector").type.list_size
            await self._chain.append({
                "id": uuid.uuid4().hex, "text": "", "user": "", "category": TOMBSTONE,
                "importance": 0.0, "created_at": now(), "trust_level": TOMBSTONE,
                "trust_group": "", "author_bot": "", "author_name": actor,
                "metadata": tombstone_metadata(deleted, actor, "forget_user"),
                "orphaned": False,
            }, [1.0] + [0.0] * (dim - 1), schema)
            await self._raw.delete(in_list("id", [v["id"] for v in victims]))
            self._maintainer.poke()
            return len(victims)

        return await self._serialized(lambda: self._locked(erase))

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
            await self._chain.settle()
            await self._chain.check_intact()  # new vectors mean new hashes: a new chain
            data = await self._raw.query().select(COLUMNS).to_arrow()
            rows = await rewrite_beside(self._db, TABLE, data, self._embedder,
                                        _schema(self._embedder), progress,
                                        finish=self._chain.rehash)
            self._raw = await self._db.open_table(TABLE)
            await self._chain.commit()
            self._mismatch = None
            await self._maintainer.run_now()
            return rows

        return await self._serialized(lambda: self._locked(rewrite))

    async def maintain(self) -> None:
        """Run index maintenance now (tests, benchmarks, after an import)."""
        await self._maintainer.run_now()

    async def warm(self) -> bool:
        """Load the recall cache now (tests, benchmarks); whether searches use it."""
        self.cache.reload(TABLE, self._raw)
        await self.cache.wait(TABLE)
        return await self.cache.current(TABLE, self._raw) is not None

    # -- reads (every one through TrustRule and the hash check) ---------

    async def _verified(self, rows: list[dict[str, Any]], rule: TrustRule
                        ) -> list[dict[str, Any]]:
        good = self._count_tampered(split_rows(rows, rule), "fails its write hash")
        return self._count_tampered(await self._chain.linked(good),
                                    "is not linked to the chain head")

    async def _verified_many(self, data: pa.Table, rule: TrustRule) -> list[dict[str, Any]]:
        # Converting and hashing thousands of rows is CPU work: off the event loop.
        split = await asyncio.to_thread(lambda: split_rows(rows_of(data), rule))
        good = self._count_tampered(split, "fails its write hash")
        return self._count_tampered(await self._chain.linked(good),
                                    "is not linked to the chain head")

    def _count_tampered(self, split: tuple[list[dict[str, Any]], list[str]], why: str
                        ) -> list[dict[str, Any]]:
        good, bad = split
        for fact_id in bad:
            self.tampered_reads += 1
            log.warning("shared memory row %r %s: excluded", fact_id, why)
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
            vector = await self._embedder.embed_query(query)
        # A few extra rows so that excluded (tampered) ones do not shorten the answer.
        table, fts = self._raw, self._maintainer.fts
        snap = await self.cache.current(TABLE, table)
        if snap is None:
            result = await hybrid_search(table, vector, query, rule.sql(), limit + 5, fts=fts,
                                         min_score=min_score, digests=True)
        elif not (keys := rule.partitions(snap.chats)):
            return []  # nothing this reader may see (an empty table): no LanceDB query
        else:
            result = await scan_search(snap, table, vector, query, rule.sql(), keys, limit + 5,
                                       fts=fts, min_score=min_score)
        facts = [_fact(r, r["score"]) for r in await self._verified(result, rule)
                 if min_score is None or r["score"] >= min_score]
        return facts[:limit]

    @storage_errors
    async def list_facts(self, reader_bot: str, groups: Sequence[str], *,
                         users: Sequence[str] | None, limit: int = 100,
                         offset: int = 0) -> list[Fact]:
        rule = TrustRule.of(reader_bot, groups, users)
        data = await self._raw.query().where(rule.sql()).select(
            [*COLUMNS, "vector"]).to_arrow()
        rows = await self._verified_many(data, rule)
        rows.sort(key=lambda r: r["seq"], reverse=True)
        return [_fact(r) for r in rows[offset:offset + limit]]

    @storage_errors
    async def get(self, reader_bot: str, groups: Sequence[str], fact_id: str) -> Fact | None:
        rule = TrustRule.of(reader_bot, groups, None)
        where = f"id = {quote(fact_id)} AND {rule.sql()}"
        data = await self._raw.query().where(where).select([*COLUMNS, "vector"]).to_arrow()
        rows = await self._verified(rows_of(data), rule)
        return _fact(rows[0]) if rows else None

    @storage_errors
    async def count(self) -> int:
        n: int = await self._raw.count_rows(f"trust_level <> '{TOMBSTONE}'")
        return n

    @storage_errors
    async def verify(self) -> IntegrityReport:
        # Under the writer and its lock: no write lands between the head and the rows.
        report = await self._serialized(lambda: self._locked(self._chain.verify))
        if not report.ok:
            log.warning("shared memory integrity: %d tampered, %d gap(s)",
                        len(report.tampered), len(report.missing))
        return report


def _schema(embedder: Embedder) -> pa.Schema:  # a new table: a new generation (recall cache)
    return new_generation(with_model(FIELDS, embedder.model_name, embedder.dimension, ""))
