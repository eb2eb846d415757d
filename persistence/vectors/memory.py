"""Each bot's own long-term memories: one LanceDB table per bot.

``LanceMemoryStore`` implements ``engine.ports.MemoryStore``. It is an async
context manager (``async with await LanceMemoryStore.open(uri, embedder)``):
leaving it stops the background index maintenance.

Table ``memories_<sanitized bot>_<hash>``: the bot id is free text, so the
name keeps only safe characters plus a short hash of the real id (two ids
that sanitize alike never share a table); the real id is in the schema
metadata. Rows: id, text, user ("" = general), category, importance,
created_at, superseded_by ("" = current), metadata (JSON text), chat (where
a learned fact may be recalled, "" = bot-wide), vector. Tables written
before ``chat`` existed get it from ``persistence/vectors/rekey.py`` at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import pyarrow as pa

from engine.errors import StorageError
from engine.ports import Embedder, Progress
from engine.types import Fact
from persistence.vectors.recall.cache import CACHE_MB, RecallCache, new_generation
from persistence.vectors.recall.scan import Snapshot, scan_search
from persistence.vectors.tables import (
    ANN_THRESHOLD,
    EMBED_BATCH,
    FACT_FIELDS,
    Maintainer,
    ScalarIndex,
    check_model,
    connect,
    hybrid_search,
    in_list,
    now,
    owner_of,
    quote,
    rewrite_beside,
    storage_errors,
    table_names,
    with_model,
)

PREFIX = "memories_"
FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    *FACT_FIELDS,
    pa.field("superseded_by", pa.string(), nullable=False),
    pa.field("metadata", pa.string(), nullable=False),
    pa.field("chat", pa.string(), nullable=False),
]
COLUMNS = [f.name for f in FIELDS]
SCALAR_INDEXES: dict[str, ScalarIndex] = {"id": "btree", "user": "btree",
                                          "superseded_by": "bitmap", "chat": "btree"}


def table_name(bot: str) -> str:
    """``memories_<safe part>_<8 hex of sha256(bot)>``: valid, unique per id."""
    if not bot:
        raise StorageError("a memory needs a bot id")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", bot)[:40]
    return f"{PREFIX}{safe}_{hashlib.sha256(bot.encode()).hexdigest()[:8]}"


def _fact(bot: str, row: dict[str, Any], score: float = 0.0) -> Fact:
    return Fact(
        id=row["id"], text=row["text"], bot=bot, user=row["user"], category=row["category"],
        importance=row["importance"], created_at=row["created_at"],
        superseded_by=row["superseded_by"] or None, metadata=row["metadata"], score=score,
        chat=row.get("chat") or "",
    )


def scope_sql(users: Sequence[str], chats: Mapping[str, Sequence[str] | None] | None) -> str:
    """The filter for facts about ``users``, each limited to its allowed chats."""
    chats = chats or {}
    free = [u for u in users if chats.get(u) is None]
    parts = [in_list("user", free)] if free else []
    parts += [f"(user = {quote(u)} AND {in_list('chat', chats[u] or ())})"
              for u in sorted(set(users) - set(free))]
    return "(" + " OR ".join(parts) + ")" if parts else "false"


def in_scope(fact: Fact, users: Sequence[str],
             chats: Mapping[str, Sequence[str] | None] | None) -> bool:
    if fact.user not in users:
        return False
    allowed = (chats or {}).get(fact.user)
    return allowed is None or fact.chat in allowed


class LanceMemoryStore:
    """Per-bot memory tables in one LanceDB database (a directory or object store URI)."""

    def __init__(self, db: Any, embedder: Embedder, *, ann_threshold: int,
                 maintain_delay_s: float, hybrid: bool = True, cache_mb: float = CACHE_MB) -> None:
        self._db = db
        # The fast recall path (persistence/vectors/recall/); 0 MB: LanceDB only.
        self.cache = RecallCache(embedder.dimension, budget_bytes=int(cache_mb * 2**20),
                                 columns=COLUMNS, text=hybrid)
        self._hybrid = hybrid
        self._embedder = embedder
        self._ann_threshold = ann_threshold
        self._delay_s = maintain_delay_s
        self._tables: dict[str, Any] = {}
        self._maintainers: dict[str, Maintainer] = {}
        # Concurrent first writes of one bot would each create its table.
        self._open_lock = asyncio.Lock()

    @classmethod
    @storage_errors
    async def open(
        cls, uri: str, embedder: Embedder, *, storage_options: dict[str, str] | None = None,
        ann_threshold: int = ANN_THRESHOLD, maintain_delay_s: float = 2.0, hybrid: bool = True,
        cache_mb: float = CACHE_MB,
    ) -> LanceMemoryStore:
        """Connect; ``hybrid=False`` ranks by vector similarity only (the baseline);
        ``cache_mb``: the recall cache's budget (tables past it are searched in LanceDB)."""
        db = await connect(uri, storage_options)
        return cls(db, embedder, ann_threshold=ann_threshold, maintain_delay_s=maintain_delay_s,
                   hybrid=hybrid, cache_mb=cache_mb)

    async def __aenter__(self) -> LanceMemoryStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for maintainer in self._maintainers.values():
            await maintainer.close()
        await self.cache.close()

    # -- tables ---------------------------------------------------------

    def _schema(self, bot: str, *, new: bool = False) -> pa.Schema:
        """``new``: for a table being created or rewritten (a fresh generation)."""
        schema = with_model(FIELDS, self._embedder.model_name, self._embedder.dimension, bot)
        return new_generation(schema) if new else schema

    async def _table(self, bot: str, *, create: bool = False, check: bool = True) -> Any | None:
        if bot in self._tables:
            return self._tables[bot]
        async with self._open_lock:
            return await self._open_table(bot, create=create, check=check)

    async def _open_table(self, bot: str, *, create: bool, check: bool) -> Any | None:
        if bot in self._tables:
            return self._tables[bot]
        name = table_name(bot)
        if name in await self._names():
            table = await self._db.open_table(name)
        elif create:
            table = await self._db.create_table(name, schema=self._schema(bot, new=True),
                                                exist_ok=True)
        else:
            return None
        if check:
            check_model(name, await table.schema(), self._embedder.model_name,
                        self._embedder.dimension)
        self._tables[bot] = table
        maintainer = Maintainer(name, lambda: self._tables[bot], scalar=SCALAR_INDEXES,
                                ann_threshold=self._ann_threshold, delay_s=self._delay_s)
        await maintainer.refresh()
        self._maintainers[bot] = maintainer
        return table

    async def _names(self) -> list[str]:
        return await table_names(self._db)

    @storage_errors
    async def bots(self) -> list[str]:
        result = []
        for name in await self._names():
            if name.startswith(PREFIX):
                table = await self._db.open_table(name)
                result.append(owner_of(await table.schema()))
        return sorted(b for b in result if b)

    @storage_errors
    async def maintain(self, bot: str) -> None:
        """Run index maintenance for one bot now (import, tests, benchmarks)."""
        if await self._table(bot) is not None:
            await self._maintainers[bot].run_now()

    async def warm(self, bot: str) -> bool:
        """Load the bot's recall cache now (tests, benchmarks); whether searches use it."""
        table = await self._table(bot)
        if table is None:
            return False
        self.cache.reload(bot, table)
        await self.cache.wait(bot)
        return await self.cache.current(bot, table) is not None

    # -- writes ---------------------------------------------------------

    @storage_errors
    async def add(self, fact: Fact) -> Fact:
        return (await self.add_many([fact]))[0]

    @storage_errors
    async def add_many(self, facts: Sequence[Fact], *,
                       progress: Progress | None = None) -> list[Fact]:
        if not facts:
            return []
        bots = {f.bot for f in facts}
        if len(bots) != 1:
            raise StorageError("add_many takes facts of one bot")
        bot = bots.pop()
        if any(not f.text.strip() for f in facts):
            raise StorageError("a memory needs text")
        table = await self._table(bot, create=True)
        assert table is not None  # create=True always returns a table
        stored: list[Fact] = []
        for start in range(0, len(facts), EMBED_BATCH):
            batch = [replace(f, id=f.id or uuid.uuid4().hex, created_at=f.created_at or now())
                     for f in facts[start:start + EMBED_BATCH]]
            vectors = await self._embedder.embed([f.text for f in batch])
            data = pa.Table.from_pylist(
                [self._row(f, v) for f, v in zip(batch, vectors, strict=True)],
                schema=self._schema(bot))
            await self._add_rows(bot, table, data)
            stored.extend(batch)
            if progress is not None:
                progress(len(stored), len(facts))
        self._maintainers[bot].poke()
        return stored

    async def _add_rows(self, bot: str, table: Any, data: pa.Table) -> None:
        await self.cache.write(bot, table, lambda: table.add(data), lambda s, _: s.add(data))

    @staticmethod
    def _row(fact: Fact, vector: Sequence[float]) -> dict[str, Any]:
        return {"id": fact.id, "text": fact.text, "user": fact.user,
                "category": fact.category, "importance": float(fact.importance),
                "created_at": fact.created_at, "superseded_by": fact.superseded_by or "",
                "metadata": fact.metadata, "chat": fact.chat, "vector": list(vector)}

    @storage_errors
    async def supersede(self, bot: str, old_id: str, new_id: str) -> None:
        table = await self._table(bot)
        if table is None or await table.count_rows(f"id = {quote(old_id)}") == 0:
            raise StorageError(f"no memory {old_id!r} for bot {bot!r}")
        change, where = {"superseded_by": new_id}, f"id = {quote(old_id)}"
        await self.cache.write(bot, table, lambda: table.update(change, where=where),
                               lambda snap, _: snap.kill([old_id]))
        self._maintainers[bot].poke()  # an update rewrites the row: index it again

    @storage_errors
    async def promote(self, bot: str, fact_id: str) -> bool:
        table = await self._table(bot)
        where = f"id = {quote(fact_id)}"
        if table is None or await table.count_rows(where) == 0:
            return False
        await self.cache.write(bot, table, lambda: table.update(updates={"chat": ""}, where=where),
                               lambda snap, _: snap.move(fact_id, ""))
        self._maintainers[bot].poke()
        return True

    @storage_errors
    async def delete(self, bot: str, fact_id: str) -> bool:
        return await self._delete(bot, f"id = {quote(fact_id)}",
                                  lambda snap: snap.kill([fact_id])) > 0

    @storage_errors
    async def delete_user(self, bot: str, user: str) -> int:
        return await self._delete(bot, f"user = {quote(user)}", lambda snap: snap.kill_user(user))

    @storage_errors
    async def delete_ids(self, bot: str, fact_ids: Sequence[str]) -> int:
        """Forget many facts at once (retention); returns how many existed."""
        ids = list(dict.fromkeys(fact_ids))
        done = 0
        for start in range(0, len(ids), EMBED_BATCH):  # bounded filter strings
            batch = ids[start:start + EMBED_BATCH]
            done += await self._delete(bot, in_list("id", batch), functools.partial(
                Snapshot.kill, ids=batch))
        return done

    async def _delete(self, bot: str, where: str, apply: Callable[[Snapshot], None]) -> int:
        table = await self._table(bot)
        if table is None:
            return 0
        count: int = await table.count_rows(where)
        if count:
            await self.cache.write(bot, table, lambda: table.delete(where),
                                   lambda snap, _: apply(snap))
            # Indexes and compaction catch up with the deletion (see maintenance).
            self._maintainers[bot].poke()
        return count

    @storage_errors
    async def drop_bot(self, bot: str) -> None:
        maintainer = self._maintainers.pop(bot, None)
        if maintainer is not None:
            await maintainer.close()
        self._tables.pop(bot, None)
        self.cache.drop(bot)
        if table_name(bot) in await self._names():
            await self._db.drop_table(table_name(bot))

    @storage_errors
    async def reembed(self, bot: str, *, progress: Progress | None = None) -> int:
        """Read every row, embed again, and replace the table with the new schema.

        The old table stays whole until the new one is complete (``rewrite_beside``).
        """
        table = await self._table(bot, check=False)
        if table is None:
            return 0
        data = await table.query().select(COLUMNS).to_arrow()
        self.cache.drop(bot)
        rows = await rewrite_beside(self._db, table_name(bot), data, self._embedder,
                                    self._schema(bot, new=True), progress)
        self.cache.drop(bot)
        maintainer = self._maintainers.pop(bot, None)  # reopen: the new schema and version
        if maintainer is not None:
            await maintainer.close()
        self._tables.pop(bot, None)
        await self._table(bot)
        await self.maintain(bot)
        return rows

    # -- reads ----------------------------------------------------------

    @storage_errors
    async def get(self, bot: str, fact_id: str) -> Fact | None:
        table = await self._table(bot)
        if table is None:
            return None
        rows = await table.query().where(f"id = {quote(fact_id)}").select(COLUMNS).to_list()
        return _fact(bot, rows[0]) if rows else None

    @storage_errors
    async def list_facts(self, bot: str, *, user: str | None = None, history: bool = False,
                         limit: int = 100, offset: int = 0) -> list[Fact]:
        table = await self._table(bot)
        if table is None:
            return []
        clauses = [] if user is None else [f"user = {quote(user)}"]
        if not history:
            clauses.append("superseded_by = ''")
        query = table.query().select(COLUMNS)
        if clauses:
            query = query.where(" AND ".join(clauses))
        data = await query.to_arrow()

        def page() -> list[dict[str, Any]]:  # sorting a big table is CPU work: not on the loop
            rows: list[dict[str, Any]] = data.sort_by([("created_at", "descending")]).slice(
                offset, limit).to_pylist()
            return rows

        return [_fact(bot, r) for r in await asyncio.to_thread(page)]

    @storage_errors
    async def count(self, bot: str, *, history: bool = True) -> int:
        table = await self._table(bot)
        if table is None:
            return 0
        n: int = await table.count_rows(None if history else "superseded_by = ''")
        return n

    async def iterate(self, bot: str) -> AsyncIterator[Fact]:
        table = await self._table(bot)
        if table is None:
            return
        try:
            reader = await table.query().select(COLUMNS).to_batches()
            batches = [batch async for batch in reader]
        except Exception as exc:  # the edge, as in storage_errors
            raise StorageError(f"memory store: {exc}") from exc
        for batch in batches:
            for row in batch.to_pylist():
                yield _fact(bot, row)

    @storage_errors
    async def search(
        self, bot: str, query: str, *, users: Sequence[str], limit: int = 5,
        min_score: float | None = None, vector: Sequence[float] | None = None,
        chats: Mapping[str, Sequence[str] | None] | None = None,
    ) -> list[Fact]:
        if not users or limit <= 0:
            return []  # fail closed: no speaker, no personal facts
        table = await self._table(bot)
        if table is None:
            return []
        if vector is None:
            vector = await self._embedder.embed_query(query)
        where = f"{scope_sql(users, chats)} AND superseded_by = ''"
        fts = self._hybrid and self._maintainers[bot].fts
        snap = await self.cache.current(bot, table)
        if snap is None:
            result = await hybrid_search(table, vector, query, where, limit, fts=fts,
                                         min_score=min_score)
        else:
            result = await scan_search(snap, table, vector, query, where, snap.keys(users, chats),
                                       limit, fts=fts, min_score=min_score)
        facts = []
        for row in result:
            fact = _fact(bot, row, row["score"])
            # Second guard: the filter above is the rule; this never trusts it blindly.
            if not in_scope(fact, users, chats) or row["superseded_by"]:
                continue
            if min_score is not None and row["score"] < min_score:
                continue
            facts.append(fact)
        return facts
