"""The group writer: writes that arrive together commit in one transaction.

Structural proofs, no clocks: how many transactions a burst took, what a
failing job does to its neighbours, what a caller that gives up leaves behind.
On SQLite and PostgreSQL (the ``database_url`` fixture).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from engine.errors import StorageError
from engine.types import RecallRecord
from engine.usage import UsageRecord
from persistence.sql.conversations import _HISTORY, _INSERT, SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.recall_log import SqlRecallLog
from persistence.sql.usage import SqlUsageStore
from persistence.sql.writer import prepare


async def test_a_burst_of_writes_commits_in_few_transactions(database_url: str) -> None:
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        before = db.writer.batches
        ids = await asyncio.gather(*(
            store.add(bot="demo", chat=f"telegram:{n % 4}", role="user", content=f"m{n}",
                      user=f"telegram:{n}", platform="telegram")
            for n in range(40)))
        batches = db.writer.batches - before
        # 40 writes queued in one loop turn: far fewer commits than writes.
        assert batches < 10, f"{batches} transactions for 40 writes"
        assert len(set(ids)) == 40
        histories = [await store.history("demo", f"telegram:{c}", limit=100) for c in range(4)]
        assert sorted(m.content for h in histories for m in h) == sorted(f"m{n}" for n in range(40))


async def test_a_failing_write_fails_alone(database_url: str) -> None:
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        results = await asyncio.gather(
            store.add(bot="demo", chat="c", role="user", content="before"),
            db.execute(text("INSERT INTO no_such_table VALUES (1)"), {}),
            store.add(bot="demo", chat="c", role="user", content="after"),
            return_exceptions=True)
        assert isinstance(results[1], SQLAlchemyError)
        assert isinstance(results[0], int) and isinstance(results[2], int)
        assert [m.content for m in await store.history("demo", "c")] == ["before", "after"]


async def test_every_hot_path_write_goes_through_one_writer(database_url: str) -> None:
    """Message, usage row and recall log of one reply: one transaction when they meet."""
    async with Database(database_url) as db:
        before = db.writer.jobs
        await asyncio.gather(
            SqlConversationStore(db).add(bot="demo", chat="c", role="assistant", content="a"),
            SqlUsageStore(db).add(UsageRecord(
                at=datetime.now(UTC), bot="demo", user="telegram:42", chat="c", platform="telegram",
                provider="p", model="m", prompt_tokens=3, completion_tokens=4,
                estimated=False, cost_usd=0.0)),
            SqlRecallLog(db).record(RecallRecord(bot="demo", chat="c", message_id="1",
                                                 query="q", facts=())))
        assert db.writer.jobs - before == 3


async def test_a_caller_that_gives_up_still_has_its_write_committed(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/w.db"
    async with Database(url) as db:
        store = SqlConversationStore(db)
        task = asyncio.create_task(
            store.add(bot="demo", chat="c", role="user", content="kept"))
        await asyncio.sleep(0)  # queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with Database(url) as db:  # close() drained the queue first
        assert [m.content for m in await SqlConversationStore(db).history("demo", "c")] == ["kept"]


async def test_writes_after_close_are_refused_clearly(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    async with db:
        pass
    with pytest.raises(StorageError, match="not started"):
        await SqlConversationStore(db).add(bot="demo", chat="c", role="user", content="x")


async def test_a_unique_violation_reaches_its_caller(database_url: str) -> None:
    """As SQLAlchemy's error on both backends, without the parameters in its text."""
    async with Database(database_url) as db:
        insert = text("INSERT INTO recall_log (bot, chat, message_id, query, facts, created_at) "
                      "VALUES ('b', 'c', '', :query, '[]', CURRENT_TIMESTAMP)")
        await db.execute(insert, {"query": "q"})
        with pytest.raises(IntegrityError) as caught:
            await db.execute(insert, {"query": "what Ann said in private"})
        if db.dialect == "sqlite":  # PostgreSQL's engine shows them (SQLAlchemy's default)
            assert "Ann" not in str(caught.value)


async def test_writes_of_one_statement_run_as_one_statement(database_url: str) -> None:
    """40 message inserts queued together: a handful of executemany, not 40 statements."""
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        await store.add(bot="demo", chat="warm", role="user", content="w")
        before = db.writer.statements
        ids = await asyncio.gather(*(
            store.add(bot="demo", chat="c", role="user", content=f"m{n}") for n in range(40)))
        assert db.writer.statements - before < 10
        # Each caller got its own row's id, in the order the writes were queued.
        assert ids == sorted(ids) and len(set(ids)) == 40
        rows = await store.history("demo", "c", limit=100)
        assert [(m.id, m.content) for m in rows] == [(i, f"m{n}") for n, i in enumerate(ids)]


async def test_a_failing_write_in_a_grouped_statement_fails_alone(database_url: str) -> None:
    """One bad row in an executemany: the batch is retried one by one, only it fails."""
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        good = [dict(bot="demo", chat="c", role="user", content=f"m{n}", user="", user_name="",
                     platform="", served_by=None, created_at=datetime.now(UTC))
                for n in range(3)]
        bad = {**good[0], "content": None}  # NOT NULL
        results = await asyncio.gather(
            db.execute(_INSERT, good[0]), db.execute(_INSERT, bad),
            db.execute(_INSERT, good[1]), db.execute(_INSERT, good[2]),
            return_exceptions=True)
        assert isinstance(results[1], IntegrityError)
        assert all(not isinstance(r, BaseException) for r in (results[0], *results[2:]))
        assert [m.content for m in await store.history("demo", "c")] == ["m0", "m1", "m2"]


async def test_keyed_writes_in_one_batch_keep_the_last(database_url: str) -> None:
    """Two recall records of one chat in a batch: both callers answered, the later kept."""
    async with Database(database_url) as db:
        log = SqlRecallLog(db)
        before = db.writer.statements
        await asyncio.gather(*(
            log.record(RecallRecord(bot="demo", chat="c", message_id=str(n), query=f"q{n}",
                                    facts=()))
            for n in range(5)))
        assert db.writer.statements - before <= 2
        last = await log.last("demo", "c")
        assert last is not None and last.message_id == "4"


async def test_the_hot_read_gives_what_sqlalchemy_gives(database_url: str) -> None:
    """``Database.read`` (one driver call on SQLite) converts values like SQLAlchemy."""
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        for n in range(4):
            await store.add(bot="demo", chat="c", role="user" if n % 2 else "assistant",
                            content=f"m{n}", platform="telegram", user_name="Ann" * (n % 2),
                            served_by=None if n % 2 else "p")
        params = {"bot": "demo", "chat": "c", "platform": "telegram", "limit": 3}
        async with db.engine.connect() as connection:
            expected = [tuple(r) for r in await connection.execute(_HISTORY[True], params)]
        rows = await db.read(_HISTORY[True], params)
        assert rows == expected and len(rows) == 3
        assert all(isinstance(r[6], datetime) for r in rows)  # created_at parsed
        assert [m.created_at is not None and m.created_at.tzinfo is not None
                for m in await store.history("demo", "c", platform="telegram")] == [True] * 4


async def test_on_sqlite_a_batch_runs_whole_on_the_writer_thread(tmp_path: Path) -> None:
    """Structural: every statement of a SQLite write runs off the event loop's thread,
    in the writer's one thread (a batch costs the loop one wake-up, not one per call)."""
    async with Database(f"sqlite+aiosqlite:///{tmp_path}/t.db") as db:
        ran: list[tuple[int, str]] = []
        engine = db._writer_engine
        assert engine is not None

        def trace(dbapi_connection: sqlite3.Connection, _record: object) -> None:
            dbapi_connection.set_trace_callback(
                lambda sql: ran.append((threading.get_ident(), sql.split()[0])))

        event.listen(engine, "connect", trace)  # the writer connects at its first write
        await asyncio.gather(
            SqlConversationStore(db).add(bot="demo", chat="c", role="user", content="x"),
            SqlUsageStore(db).add(UsageRecord(
                at=datetime.now(UTC), bot="demo", provider="p", prompt_tokens=1,
                completion_tokens=1, estimated=False, cost_usd=0.0)))
        assert [sql for _, sql in ran] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
        threads = {thread for thread, _ in ran}
        assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_statement_that_needs_a_python_default_is_refused_on_sqlite() -> None:
    """The SQLite writer runs compiled SQL: a column left to a Python-side default
    (``created_at``'s ``utcnow``) would be stored NULL, so it is refused instead."""
    with pytest.raises(ValueError, match="every column"):
        prepare(_INSERT, sqlite.dialect(), ["bot", "chat", "role", "content"])


async def test_concurrent_reads_reuse_pooled_connections(database_url: str) -> None:
    """A burst of history reads opens no connection once the pool is warm (the default
    pool's overflow opened and closed one per read past five: a login each)."""
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        await store.add(bot="demo", chat="c", role="user", content="x")
        opened: list[object] = []
        event.listen(db.engine.sync_engine, "connect", lambda *_: opened.append(1))

        async def burst() -> None:
            await asyncio.gather(*(store.history("demo", "c") for _ in range(32)))

        await burst()
        warm = len(opened)
        await burst()
        await burst()
        assert len(opened) == warm
